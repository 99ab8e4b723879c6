"""The training loop of a GPT-style language model (or, with family="encoder", of a BERT-style
masked language model), written out in one place.

    1. hardware     device, number format (bf16 / fp32), threads
    2. data         corpus -> tokenizer -> token ids (cached) -> train / validation split
    3. model        a preset + overrides, sized to the tokenizer's vocabulary
    4. optimizer    AdamW, warm-up + cosine learning rate
    5. resume       weights, optimizer moments, step, random states, data position
    6. loop         for each update:  batch -> forward -> loss -> backward -> clip -> step
                    every log_every:   a line in log.jsonl and the progress bar
                    every eval_every:  validation loss; best model kept; checkpoint written
    7. finish       a last evaluation and checkpoint

Ctrl-C (SIGINT) and SIGTERM do not kill the run: the loop finishes its step, writes a checkpoint,
and returns; `train(cfg, resume=True)` then continues exactly, with the very losses an
uninterrupted run would have had.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import __version__, presets
from ..checkpoint import CONFIG, TOKENIZER, WEIGHTS, load_weights, save_weights
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
from ..model import Transformer
from ..tasks.mlm import MLMBatches, mask_fixed_batches, masked_logits
from ..tokenizer import Tokenizer
from .checkpoint import (
    find_training_checkpoint,
    read_optimizer,
    read_state,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from .config import TrainConfig
from .hardware import (
    autocast,
    resolve_device,
    resolve_precision,
    set_threads,
    training_attention,
)
from .optim import load_optimizer_tensors, lr_at, make_optimizer, optimizer_tensors, set_lr

LOG = "log.jsonl"
CALIBRATION_STEPS = 12  # with a time limit and no max_steps, time this many updates first


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


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          callback: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train (or with `resume`, continue training) the language model that `cfg` describes.

    The run directory `cfg.out_dir` receives the best model (config.json, model.safetensors,
    tokenizer.json), log.jsonl and training/ (the state to resume from). `callback`, if given,
    receives every log record (a dict) as it is written.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, resume, overwrite, callback)
    finally:
        torch.set_num_threads(threads)  # `cfg.threads` is for this run only


def _train(cfg: TrainConfig, resume: bool, overwrite: bool,
           callback: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    out = Path(cfg.out_dir)
    say = _printer(cfg.progress)

    # ---- 1. hardware ------------------------------------------------------------------------
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    threads = set_threads(cfg.threads) if device.type == "cpu" else torch.get_num_threads()

    # ---- 2. data ----------------------------------------------------------------------------
    folder = find_training_checkpoint(out)
    if resume and folder is None:
        raise CheckpointError(f"{out} holds no training checkpoint to resume from "
                              f"(no {out / 'training' / 'state.json'})")
    if not resume and not overwrite and (folder is not None or (out / WEIGHTS).exists()):
        raise ConfigError(f"{out} already holds a trained model; resume it with --resume, "
                          "or pick another --out (or pass --overwrite)")
    state = read_state(folder) if resume else None

    files = corpus_files(cfg.data)
    corpus_hash = fingerprint(files)  # also checks the files are UTF-8 text and not empty
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out.resolve().parent / ".qkv-cache"
    if resume:
        tokenizer = Tokenizer.load(out / TOKENIZER)
        if state["data"]["corpus_sha256"] != corpus_hash:
            say(f"warning: the data differs from the checkpoint's ({cfg.data or 'bundled'}); "
                "training goes on with the new data", warning=True)
    else:
        tokenizer = fit_tokenizer(files, cfg.tokenizer, cfg.vocab_size, cache_dir, corpus_hash)
    tokens = tokenize_corpus(files, tokenizer, cache_dir, corpus_hash, progress=cfg.progress)

    # ---- 3. model ---------------------------------------------------------------------------
    if resume:
        model_cfg = ModelConfig.from_json(out / CONFIG)
    else:
        model_cfg = presets.get(cfg.preset, vocab_size=tokenizer.vocab_size,
                                **cfg.model_overrides())
    if model_cfg.family != cfg.family:
        raise ConfigError(f"the model in {out} has family {model_cfg.family}, not {cfg.family}")
    context = model_cfg.max_seq_len
    train_ids, val_ids = split(tokens, cfg.val_fraction, context)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * context

    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    model = Transformer(model_cfg)
    if resume:
        load_weights(model, folder / WEIGHTS)
    model.to(device).train()

    # ---- 4. optimizer and data stream --------------------------------------------------------
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                               fused=device.type in ("cpu", "cuda"))  # one kernel, not dozens
    names = {id(p): name for name, p in model.named_parameters()}
    batches = LMBatches(train_ids, context, cfg.batch_size, seed=cfg.seed)
    val_batches = eval_batches(val_ids, context, cfg.batch_size, cfg.eval_windows)
    if cfg.family == "encoder":  # masked LM: the labels are -100 except at the hidden tokens
        batches = MLMBatches(batches, tokenizer, seed=cfg.seed)
        val_batches = mask_fixed_batches(val_batches, tokenizer, seed=cfg.seed)
    hidden = (_compiled(model, val_batches[0], device, precision) if cfg.compile
              else model.hidden_states)  # tokens (B, T) -> last layer's vectors (B, T, d)

    # ---- 5. resume, or start a fresh run directory -------------------------------------------
    step, best, elapsed_before, tokens_seen = 0, math.inf, 0.0, 0
    max_steps = cfg.max_steps
    if resume:
        load_optimizer_tensors(optimizer, names, *read_optimizer(folder))
        batches.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step, elapsed_before = state["step"], state["elapsed"]
        tokens_seen = state["tokens_seen"]
        best = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf
        if max_steps is None and cfg.time_limit is None:
            max_steps = state["max_steps"]
        _truncate_log(out / LOG, step)  # lines an interrupted run wrote after its checkpoint
        say(f"resuming {out} at step {step}")
    else:  # a fresh run: nothing of an overwritten one may be resumed or loaded
        out.mkdir(parents=True, exist_ok=True)
        for old in ("training", "training.old", "training.tmp"):
            shutil.rmtree(out / old, ignore_errors=True)
        (out / WEIGHTS).unlink(missing_ok=True)
        (out / LOG).unlink(missing_ok=True)
        model_cfg.to_json(out / CONFIG)
        tokenizer.save(out / TOKENIZER)
        n = model.num_parameters()
        say(f"training a {n / 1e6:.2f}M-parameter {cfg.preset} on {len(train_ids):,} tokens "
            f"({tokenizer.kind} tokenizer, {tokenizer.vocab_size} ids) on {device.type} "
            f"({precision}, {threads} thread{'s' if threads > 1 else ''}); run dir {out}")

    def checkpoint() -> None:
        if not (out / WEIGHTS).exists():  # no evaluation yet: the current model is the best
            save_weights(model, out / WEIGHTS, model.tied_weights())
        save_training_checkpoint(out, model, optimizer_tensors(optimizer, names), {
            "step": step, "max_steps": max_steps, "best_val_loss": None if best == math.inf
            else best, "elapsed": elapsed, "tokens_seen": tokens_seen,
            "sampler": batches.state_dict(), "rng": rng_state(device),
            "config": cfg.to_dict(), "precision": precision, "qkv_version": __version__,
            "data": {"corpus_sha256": corpus_hash, "files": [str(f) for f in files],
                     "train_tokens": len(train_ids), "val_tokens": len(val_ids)},
        })

    # ---- 6. the loop ------------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    stopped_by, train_loss, val_loss, tok_s = None, None, None, 0.0
    loss_sum, losses_counted = torch.zeros((), device=device), 0
    start = time.perf_counter()
    elapsed = elapsed_before
    bar = _ProgressBar(cfg.progress, step, max_steps)
    first_step, last_log_time, last_log_step, calibration_start = step, start, step, None
    with _StopRequest() as stop:
        while max_steps is None or step < max_steps:
            lr = lr_at(step, cfg.lr, cfg.final_lr, cfg.warmup_steps, max_steps or 10**12)
            set_lr(optimizer, lr)

            # One update = grad_accum micro-batches whose gradients add up.
            for _ in range(cfg.grad_accum):
                x, y = next(batches)  # (B, T) inputs and (B, T) next-token (or masked) targets
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with training_attention(device, precision):
                    with autocast(device, precision):
                        loss = lm_loss(model, hidden, x, y)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach()
                losses_counted += 1
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step

            now = time.perf_counter()
            elapsed = elapsed_before + (now - start)
            out_of_time = cfg.time_limit is not None and now - start >= cfg.time_limit
            if max_steps is None:  # time-limited: fit the schedule to the time, once
                max_steps, calibration_start = _fit_schedule(
                    cfg, step - first_step, now - start, calibration_start)
                max_steps = None if max_steps is None else first_step + max_steps
            last = step == max_steps or out_of_time or stop.signal is not None
            evaluate_now = step % cfg.eval_every == 0 or (last and stop.signal is None)
            if step % cfg.log_every and not evaluate_now and not last:
                continue

            # ---- log: mean training loss since the last line, speed, learning rate
            train_loss = loss_sum.item() / losses_counted
            loss_sum.zero_()
            losses_counted = 0
            tok_s = (step - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
            record = {"step": step, "train_loss": round(train_loss, 6), "lr": lr,
                      "tokens_per_s": round(tok_s, 1), "elapsed": round(elapsed, 3),
                      "tokens": tokens_seen}
            if evaluate_now:
                val_loss = evaluate(model, val_batches, device, precision)
                record.update(val_loss=round(val_loss, 6), val_ppl=round(math.exp(val_loss), 4))
                if val_loss < best:
                    best = val_loss
                    save_weights(model, out / WEIGHTS, model.tied_weights())
                record["best_val_loss"] = round(best, 6)
            _append_log(out / LOG, record)
            history.append(record)
            if callback is not None:
                callback(record)
            bar.update(step - last_log_step, train_loss, tok_s, lr, max_steps)
            if evaluate_now:
                bar.write(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
                          f"(perplexity {math.exp(val_loss):.2f}), {tok_s:,.0f} tokens/s")
                checkpoint()
            last_log_time, last_log_step = time.perf_counter(), step
            if stop.signal is not None or out_of_time:
                stopped_by = stop.signal or "time limit"
                break
        bar.close()
        if stopped_by is not None and not evaluate_now:
            checkpoint()

    # ---- 7. finish --------------------------------------------------------------------------
    if stopped_by in ("SIGINT", "SIGTERM"):
        say(f"{stopped_by}: saved a checkpoint at step {step} in {out / 'training'}")
    return TrainResult(
        out=out, model=model, tokenizer=tokenizer, step=step, max_steps=max_steps or step,
        train_loss=train_loss, val_loss=val_loss, best_val_loss=None if best == math.inf
        else best, tokens_per_s=tok_s, elapsed=elapsed, precision=precision,
        stopped_by=stopped_by, history=history)


@torch.inference_mode()
def evaluate(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, precision: str = "fp32") -> float:
    """Mean cross-entropy (nats per token) of `model` over fixed batches: next-token targets,
    or masked-LM labels, where only the labels that are not -100 count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            total += lm_loss(model, model.hidden_states, x, y, reduction="sum").item()
        count += int((y != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------- helpers of the loop

def _fit_schedule(cfg: TrainConfig, step: int, seconds: float,
                  calibration_start: tuple | None) -> tuple[int | None, tuple | None]:
    """With only a time limit: after a few timed updates, choose how many updates fill the time.

    `step` counts the updates of this process and `seconds` its time so far."""
    if step == 2:  # the first updates are slow (memory allocation, kernel selection)
        return None, (step, seconds)
    if calibration_start is None or step < calibration_start[0] + CALIBRATION_STEPS:
        return None, calibration_start
    per_step = (seconds - calibration_start[1]) / (step - calibration_start[0])
    # An evaluation reads eval_windows windows forward only: about a third of the cost of
    # training on as many tokens.
    eval_seconds = per_step * cfg.eval_windows / (3 * cfg.batch_size * cfg.grad_accum)
    remaining = max(0.0, cfg.time_limit - seconds)
    more = int(0.97 * remaining / (per_step + eval_seconds / cfg.eval_every))
    return step + max(1, more), calibration_start


def lm_loss(model: Transformer, hidden: Callable[[torch.Tensor], torch.Tensor],
            x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean (or, with reduction="sum", summed) cross-entropy of the targets `y` (B, T) that are
    not -100, given inputs `x` (B, T).

    `hidden` maps tokens to the last layer's vectors (model.hidden_states, or a compiled stack).
    Only the positions with a target go through the output layer: for next-token training that
    is all of them; for masked-LM training about 15%, which skips most of the cost of the
    largest matrix (d_model x vocab) and of BERT's MLM transform before it.
    """
    h = hidden(x)  # (B, T, d)
    if model.config.family == "encoder":
        return F.cross_entropy(*masked_logits(model, h, y), reduction=reduction)
    logits = model.logits(h)  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction=reduction)


def compiled_forward(model: Transformer) -> Callable[[torch.Tensor], torch.Tensor]:
    """tokens (B, T) -> last layer's vectors (B, T, d), with the decoder (or encoder) stack
    compiled by torch.compile (the token lookup, which checks ids on the host, stays eager;
    so does the output layer, applied by the caller).

    The position table also checks its ids on the host, which splits the compiled graph in two
    ("graph break"); that is expected, so dynamo's multi-line notice about it is silenced.
    """
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    stack = torch.compile(model.decoder if model.encoder is None else model.encoder)

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        return stack(model.token_embedding(tokens))  # (B, T, d)

    return forward


def _compiled(model: Transformer, batch: tuple[torch.Tensor, torch.Tensor],
              device: torch.device, precision: str):
    """The compiled stack (tokens -> last hidden states), tried once on a batch; the eager
    model.hidden_states (and a one-line warning) if compiling fails. The trial leaves no
    trace: gradients and random state are restored."""
    rng = torch.get_rng_state()
    try:
        compiled = compiled_forward(model)
        x, y = batch[0].to(device), batch[1].to(device)
        with training_attention(device, precision):
            with autocast(device, precision):
                loss = lm_loss(model, compiled, x, y)
            loss.backward()
        return compiled
    except Exception as e:  # any failure inside the compiler stack
        first_line = (str(e).strip().splitlines() or [""])[0][:120]
        print(f"qkv: warning: torch.compile failed ({type(e).__name__}: {first_line}); "
              "training without it", file=sys.stderr)
        return model.hidden_states
    finally:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to `step`: a resumed run rewrites what came after."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _printer(enabled: bool) -> Callable[..., None]:
    """Progress messages on stderr (only with `enabled`); warnings always."""

    def say(message: str, warning: bool = False) -> None:
        if enabled or warning:
            print(f"qkv train: {message}", file=sys.stderr)
    return say


class _StopRequest:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a request the loop sees after its current step.

    A second Ctrl-C gives up waiting and raises KeyboardInterrupt at once.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\nqkv train: {self.signal} received: saving a checkpoint after this step "
              "(press Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _ProgressBar:
    """A tqdm bar showing step, loss, tokens/s, learning rate and the time left (or nothing)."""

    def __init__(self, enabled: bool, step: int, max_steps: int | None):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True,
                            desc="training", file=sys.stderr)

    def update(self, n: int, loss: float, tok_s: float, lr: float, total: int | None) -> None:
        if self.bar is None:
            return
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.set_postfix_str(f"loss {loss:.3f}, {tok_s:,.0f} tok/s, lr {lr:.2e}",
                                 refresh=False)
        self.bar.update(n)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a log.jsonl (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]

