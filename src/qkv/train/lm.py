"""Pre-training a language model from a text corpus: the recipe around the loop.

    1. hardware     device, number format (bf16 / fp32), threads
    2. data         corpus -> tokenizer -> token ids (cached) -> train / validation split
    3. model        a preset + overrides, sized to the tokenizer's vocabulary
    4. objective    next-token prediction (a GPT) by default; `objective=` composes another,
                    such as masked language modelling (tasks/mlm.masked_lm_objective, a BERT)
    5. optimizer    AdamW, warm-up + cosine learning rate
    6. fit          train/loop.py: the loop, the best model, checkpoints, exact resume

`train(cfg, resume=True)` continues an interrupted run exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batching import evaluating
from ..checkpoint import CONFIG, TOKENIZER, WEIGHTS, load_weights
from ..config import ModelConfig
from ..data import (
    LMBatches,
    corpus_files,
    eval_batches,
    fingerprint,
    fit_tokenizer,
    split,
    tokenize_corpus,
)
from ..errors import CheckpointError, ConfigError
from ..hardware import autocast, resolve_device, resolve_precision, set_threads
from ..model import Transformer
from ..presets import get as get_preset
from ..tokenizer import Tokenizer
from . import distributed
from .checkpoint import STATE, damaged, find_training_checkpoint, read_state
from .config import TrainConfig
from .log import printer
from .loop import LoopConfig, fit
from .loss import cross_entropy
from .objective import Objective
from .optim import Schedule, make_optimizer

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LMData:
    """What an objective is built from: the tokenizer, the token streams, the run's settings."""

    tokenizer: Tokenizer
    train_ids: Any
    val_ids: Any
    context: int
    cfg: TrainConfig
    device: torch.device
    precision: str


#: Builds the objective of a run: (model, data) -> Objective.
ObjectiveFactory = Callable[[Transformer, LMData], Objective]


@dataclass
class TrainResult:
    """What a run did. `stopped_by` is "SIGINT"/"SIGTERM"/"time limit", or None if it ran to
    max_steps; `history` holds this process's log lines."""

    out: Path
    model: Transformer
    tokenizer: Tokenizer
    step: int
    max_steps: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float
    elapsed: float
    precision: str
    stopped_by: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def next_token_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the next-token targets `y` (B, T) (-100: ignored) given inputs x (B, T)."""
    logits = model.logits(model.hidden_states(x))  # (B, T, vocab)
    return cross_entropy(logits.flatten(0, 1), y.flatten(), reduction=reduction)


def mean_loss(model: torch.nn.Module, batches: list[Batch],
              loss: Callable[..., torch.Tensor], device: torch.device,
              precision: str = "fp32") -> float:
    """Mean loss per target over fixed (x, y) batches, where `loss(model, x, y, reduction=
    "sum")` sums a batch's loss; only the targets that are not -100 count. Under torchrun each
    rank takes its share of the batches and the sums are added up."""
    total, count = 0.0, 0.0
    with evaluating(model):
        for (x, y), counts in distributed.my_share(batches):
            x, y = x.to(device), y.to(device)
            with autocast(device, precision):
                batch_total = loss(model, x, y, reduction="sum").item()
            if counts:  # a rank short of batches runs a copy, to keep in step with the others
                total += batch_total
                count += float((y != -100).sum())
    total, count = distributed.sum_over_ranks(total, count)
    return total / max(count, 1)


def evaluate(model: Transformer, batches: list[Batch], device: torch.device,
             precision: str = "fp32") -> float:
    """Mean next-token cross-entropy (nats per token) of `model` over fixed batches."""
    return mean_loss(model, batches, next_token_loss, device, precision)


def loss_objective(batches: Any, val_batches: list[Batch], loss: Callable[..., torch.Tensor],
                   device: torch.device, precision: str) -> Objective:
    """An objective whose metric is the validation loss (and its perplexity), lower is better:
    `loss(model, x, y, reduction)` is the loss of one (x, y) batch."""

    def evaluate_val(model: torch.nn.Module) -> dict[str, float]:
        val = mean_loss(model, val_batches, loss, device, precision)
        return {"val_loss": val, "val_ppl": math.exp(val)}

    return Objective(batches=batches, loss=lambda model, batch: loss(model, *batch),
                     evaluate=evaluate_val, best=[("val_loss", "min")], weight=targets)


def targets(batch: Batch) -> float:
    """The number of targets of an (x, y) batch: the labels that are not -100."""
    return float((batch[-1] != -100).sum())


def next_token_objective(model: Transformer, data: LMData) -> Objective:
    """Next-token prediction (a GPT): random windows of the training stream."""
    if model.config.family != "decoder":
        raise ConfigError(f"next-token prediction trains a decoder, not an {model.config.family}"
                          "; an encoder learns by masked language modelling: pass objective="
                          "qkv.tasks.mlm.masked_lm_objective")
    cfg = data.cfg
    return loss_objective(
        LMBatches(data.train_ids, data.context, cfg.batch_size, seed=cfg.seed),
        eval_batches(data.val_ids, data.context, cfg.batch_size, cfg.eval_windows),
        next_token_loss, data.device, data.precision)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          callback: Callable[[dict[str, Any]], None] | None = None,
          objective: ObjectiveFactory = next_token_objective) -> TrainResult:
    """Train (or with `resume`, continue training) the language model that `cfg` describes.

    The run directory `cfg.out_dir` receives the best model (config.json, model.safetensors,
    tokenizer.json), log.jsonl and training/ (the state to resume from). `callback`, if given,
    receives every log record (a dict) as it is written. `objective` builds what is learned
    (default: next-token prediction).
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, resume, overwrite, callback, objective)
    finally:
        torch.set_num_threads(threads)  # `cfg.threads` is for this run only


def _train(cfg: TrainConfig, resume: bool, overwrite: bool,
           callback: Callable[[dict[str, Any]], None] | None,
           make_objective: ObjectiveFactory) -> TrainResult:
    assert cfg.preset and cfg.tokenizer and cfg.lr and cfg.warmup_steps is not None  # __post_init__
    out = Path(cfg.out_dir)
    say = printer(cfg.progress and distributed.is_main())
    device = distributed.start(resolve_device(cfg.device))  # under torchrun: join the others
    precision = resolve_precision(cfg.precision, device)
    threads = set_threads(cfg.threads) if device.type == "cpu" else torch.get_num_threads()

    folder = find_training_checkpoint(out)
    if resume and folder is None:
        raise CheckpointError(f"{out} holds no training checkpoint to resume from "
                              f"(no {out / 'training' / 'state.json'})")
    if not resume and not overwrite and (folder is not None or (out / WEIGHTS).exists()):
        raise ConfigError(f"{out} already holds a trained model; resume it with --resume, "
                          "or pick another --out (or pass --overwrite)")
    state = read_state(folder) if resume and folder is not None else None

    files = corpus_files(cfg.data)
    corpus_hash = fingerprint(files)  # also checks the files are UTF-8 text and not empty
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out.resolve().parent / ".qkv-cache"
    with distributed.main_first():  # rank 0 fills the cache, the others read it
        if resume and state is not None:
            tokenizer = Tokenizer.load(out / TOKENIZER)
            saved_data = state.get("data")
            if not isinstance(saved_data, dict) or "corpus_sha256" not in saved_data:
                raise damaged(Path(folder or out) / STATE, "the field 'data' is missing or "
                              "not an object")
            if saved_data["corpus_sha256"] != corpus_hash:
                say(f"warning: the data differs from the checkpoint's ({cfg.data or 'bundled'})"
                    "; training goes on with the new data", warning=True)
        else:
            tokenizer = fit_tokenizer(files, cfg.tokenizer, cfg.vocab_size, cache_dir,
                                      corpus_hash)
        tokens = tokenize_corpus(files, tokenizer, cache_dir, corpus_hash,
                                 progress=cfg.progress and distributed.is_main())

    if resume and state is not None:
        model_cfg = ModelConfig.from_json(out / CONFIG)
    else:
        model_cfg = get_preset(cfg.preset, vocab_size=tokenizer.vocab_size,
                                **cfg.model_overrides())
    if model_cfg.family != cfg.family:
        raise ConfigError(f"the model in {out} has family {model_cfg.family}, not {cfg.family}")
    context = model_cfg.max_seq_len
    train_ids, val_ids = split(tokens, cfg.val_fraction, context)

    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    model = Transformer(model_cfg).to(device).train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                               fused=device.type in ("cpu", "cuda"))  # one kernel, not dozens
    objective = make_objective(model, LMData(tokenizer, train_ids, val_ids, context, cfg,
                                                device, precision))
    loop = LoopConfig(
        max_steps=cfg.max_steps, schedule=Schedule(cfg.lr, cfg.warmup_steps, cfg.final_lr),
        time_limit=cfg.time_limit, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
        eval_every=cfg.eval_every, log_every=cfg.log_every,
        eval_cost=cfg.eval_windows / (3 * cfg.batch_size * cfg.grad_accum), device=device,
        precision=precision, compile=cfg.compile, progress=cfg.progress, fsdp=cfg.fsdp)
    if resume and state is not None:
        say(f"resuming {out} at step {state['step']}")
    elif distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        model_cfg.to_json(out / CONFIG)
        tokenizer.save(out / TOKENIZER)
        n = model.num_parameters()
        say(f"training a {n / 1e6:.2f}M-parameter {cfg.preset} on {len(train_ids):,} tokens "
            f"({tokenizer.kind} tokenizer, {tokenizer.vocab_size} ids) on {device.type} "
            f"({precision}, {threads} thread{'s' if threads > 1 else ''}"
            f"{f' x {distributed.world_size()} processes' if distributed.active() else ''}"
            f"); run dir {out}")
    extra = {"config": cfg.to_dict(),
             "data": {"corpus_sha256": corpus_hash, "files": [str(f) for f in files],
                      "train_tokens": len(train_ids), "val_tokens": len(val_ids)}}
    result = fit(model, optimizer, objective, loop, out, resume, extra, callback)
    if cfg.fsdp and distributed.active():  # the model is in shards: return the best one, whole
        model = Transformer(model_cfg).to(device).eval()
        load_weights(model, out / WEIGHTS)
    last = result.metrics or {}
    return TrainResult(
        out=out, model=model, tokenizer=tokenizer, step=result.step, max_steps=result.max_steps,
        train_loss=result.train_loss, val_loss=last.get("val_loss"),
        best_val_loss=(result.best or {}).get("val_loss"), tokens_per_s=result.per_s,
        elapsed=result.elapsed, precision=precision, stopped_by=result.stopped_by,
        history=result.history)
