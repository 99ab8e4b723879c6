"""Training: one loop for every objective, its optimizer and schedule, checkpoint and resume.

    from qkv.train import TrainConfig, train
    result = train(TrainConfig(data="my.txt", max_steps=1000, out="runs/mine"))
    result.best_val_loss, result.model, result.tokenizer
    train(TrainConfig(out="runs/mine", max_steps=2000), resume=True)   # continue exactly

    train/objective.py   Objective: batches, loss, evaluation, the metric that picks the best
    train/loop.py        fit(model, optimizer, objective, loop, out): the loop
    train/lm.py          train(cfg): pre-training a language model (the recipe around fit)
    train/loss.py        cross_entropy over a large vocabulary, a slice of rows at a time
    train/optim.py       AdamW groups, the learning-rate schedules, optimizer state on disk
    train/checkpoint.py  the atomic training/ folder; train/log.py: log.jsonl, progress, signals
    train/distributed.py several processes under torchrun: sharded batches, DDP or FSDP2
"""

from .config import TrainConfig
from .lm import LMData, TrainResult, evaluate, next_token_loss, next_token_objective, train
from .log import read_log
from .loop import FitResult, LoopConfig, fit
from .loss import cross_entropy
from .objective import Objective
from .optim import Schedule, make_optimizer

__all__ = ["FitResult", "LMData", "LoopConfig", "Objective", "Schedule", "TrainConfig",
           "TrainResult", "cross_entropy", "evaluate", "fit", "make_optimizer", "next_token_loss",
           "next_token_objective", "read_log", "train"]
