"""Training: the loop, the optimizer and its schedule, precision, checkpoint and resume.

    from qkv.train import TrainConfig, train
    result = train(TrainConfig(data="my.txt", max_steps=1000, out="runs/mine"))
    result.best_val_loss, result.model, result.tokenizer
    train(TrainConfig(out="runs/mine", max_steps=2000), resume=True)   # continue exactly
"""

from .config import TrainConfig
from .loop import TrainResult, evaluate, read_log, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "read_log", "train"]
