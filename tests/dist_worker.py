"""One rank of the distributed tests (tests/test_distributed_ranks.py), and the run settings
that the tests share with it.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dist_worker.py ROOT

runs, in ROOT, every scenario the tests then compare with one-process runs (see `main`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qkv.checkpoint import save_weights
from qkv.data import BUNDLED
from qkv.train import TrainConfig, train

TEXT = BUNDLED.read_text(encoding="utf-8")[:20_000]


def lm_config(root: Path, name: str, **overrides: Any) -> TrainConfig:
    """A 2-layer, 32-wide char GPT: 5 updates of 2 micro-batches of 4 windows, the gradient
    clipped hard (0.05: clipping acts on every update), one evaluation batch (so that a second
    rank has none), no dropout (several processes draw other dropout masks than one)."""
    data = root / "data.txt"
    if not data.exists():
        data.write_text(TEXT, encoding="utf-8")
    options = dict(data=str(data), preset="gpt-char-tiny", n_layers=2, d_model=32, n_heads=2,
                   context=16, batch_size=4, grad_accum=2, max_steps=5, warmup_steps=2,
                   eval_every=3, eval_windows=4, log_every=1, out=str(root / name),
                   precision="fp32", device="cpu", progress=False, seed=0,
                   cache_dir=str(root / "cache"), dropout=0.0, threads=1, grad_clip=0.05)
    return TrainConfig(**{**options, **overrides})


def mlm_config(root: Path, name: str, **overrides: Any) -> TrainConfig:
    """The same for a masked-LM BERT: each rank's share of a batch holds a different number of
    masked tokens, so the losses must be weighted by the global count."""
    return lm_config(root, name, family="encoder", preset="bert-tiny", tokenizer="wordpiece",
                     vocab_size=300, **overrides)


def train_run(cfg: TrainConfig, **options: Any) -> Any:
    """train(cfg) with the objective of its family (masked LM for an encoder)."""
    from qkv.tasks.mlm import masked_lm_objective
    from qkv.train import next_token_objective

    objective = masked_lm_objective if cfg.family == "encoder" else next_token_objective
    return train(cfg, objective=objective, **options)


@contextlib.contextmanager
def recorded_norms() -> Iterator[list[float]]:
    """The gradient norms the loop's clip measures (before clipping), one per update."""
    from qkv.train.distributed import full_tensor

    norms: list[float] = []
    original = torch.nn.utils.clip_grad_norm_

    def clip(*args: Any, **kwargs: Any) -> torch.Tensor:
        norm = original(*args, **kwargs)
        norms.append(float(full_tensor(norm)))
        return norm
    torch.nn.utils.clip_grad_norm_ = clip
    try:
        yield norms
    finally:
        torch.nn.utils.clip_grad_norm_ = original


def interrupt_at(step: int):
    """A log callback (rank 0 only) that presses Ctrl-C after update `step`."""

    def callback(record: dict[str, Any]) -> None:
        if record["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)
    return callback


def resume_config(root: Path, name: str, **overrides: Any) -> TrainConfig:
    """With dropout: an exact resume needs each rank's random state back."""
    return lm_config(root, name, dropout=0.1, max_steps=8, eval_every=4, **overrides)


def classify(root: Path) -> Any:
    """Fine-tune a classifier on 5 texts in batches of 4: the last batch of each epoch has one
    row, so with two ranks one of them holds none."""
    from qkv import ModelConfig, Tokenizer, Transformer
    from qkv.tasks.classify import ClassifySettings, finetune_classifier

    tokenizer = Tokenizer.load(root / "lm-1" / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="decoder", vocab_size=tokenizer.vocab_size,
                                    d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                                    dropout=0.0))
    texts = ["to be or not", "the king is dead", "a horse, a horse", "my kingdom", "speak"]
    settings = ClassifySettings(epochs=2, batch_size=4, lr=1e-3, precision="fp32", seed=0,
                                eval_batch_size=2, progress=False, warmup=0.0)
    return finetune_classifier(model, tokenizer, (texts, ["a", "b", "a", "b", "a"]),
                               settings=settings).model


def main(root: Path) -> None:
    from qkv.train import distributed

    torch.set_num_threads(1)
    with recorded_norms() as ddp_norms:
        train(lm_config(root, "lm-2"))               # DDP: compared with lm-1 (one process)
    train_run(mlm_config(root, "mlm-2"))             # uneven masked-token counts per rank
    with recorded_norms() as fsdp_norms:
        train(lm_config(root, "lm-fsdp", fsdp=True))  # FSDP2 on gloo
    sums = distributed.fsdp_sums_gradients()
    distributed._FSDP_SUMS["gloo"] = True  # as if gloo summed: the workaround must still average
    train(lm_config(root, "lm-fsdp-sum", fsdp=True))
    distributed._FSDP_SUMS["gloo"] = sums
    train(resume_config(root, "exact-full"))         # bit-exact resume under DDP
    train(resume_config(root, "exact-cut"), callback=interrupt_at(3))
    train(resume_config(root, "exact-cut"), resume=True)
    train(resume_config(root, "fsdp-full", fsdp=True))  # FSDP: resume from gathered state
    train(resume_config(root, "fsdp-cut", fsdp=True), callback=interrupt_at(3))
    train(resume_config(root, "fsdp-cut", fsdp=True), resume=True)
    train(lm_config(root, "w1-cut", max_steps=8), resume=True)  # written by one process
    train(lm_config(root, "w2-cut", max_steps=8), callback=interrupt_at(4))  # one resumes it
    train(lm_config(root, "timed", max_steps=None, time_limit=3.0, eval_every=1000))
    model = classify(root)
    if distributed.is_main():
        save_weights(model, root / "classify-2.safetensors", model.tied_weights())
        found = {"fsdp_sums_gradients": sums, "norms_ddp": ddp_norms, "norms_fsdp": fsdp_norms}
        (root / "worker.json").write_text(json.dumps(found))
    distributed.finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
