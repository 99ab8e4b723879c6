"""The training loop, written out once for every objective.

    fit(model, optimizer, objective, loop, out)

    1. resume       weights, optimizer moments, step, random states, data position (or a fresh
                    run directory)
    2. loop         for each update:  grad_accum x (batch -> forward -> loss -> backward)
                                      -> clip -> step, at the scheduled learning rate
                    every log_every:   a line in log.jsonl and the progress bar
                    every eval_every (and where the objective says): evaluate; the best model
                    is kept; a checkpoint is written
    3. finish       a last evaluation and checkpoint

What is learned comes from the Objective (train/objective.py): batches, a loss, an evaluation
and the metric that picks the best model. The loop never looks at the model's family or the
task. Ctrl-C (SIGINT) and SIGTERM do not kill the run: the loop finishes its step, writes a
checkpoint and returns; `fit(..., resume=True)` then continues exactly, with the very losses an
uninterrupted run would have had. Without `out`, nothing is written and the best weights are
kept in memory.

Under torchrun the same loop runs in every process: train/distributed.py shards each micro-batch,
weights the losses by the global target count, synchronises the gradients (DDP or FSDP2), and
lets rank 0 alone log and write; all ranks agree on when to stop.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..batching import evaluating
from ..checkpoint import WEIGHTS, load_weights
from ..errors import CheckpointError
from ..hardware import autocast, hold_frozen_weights, restore_weights, training_attention
from ..io import atomic_write_safetensors
from .checkpoint import (
    STATE,
    damaged,
    find_training_checkpoint,
    read_optimizer,
    read_state,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from .config import FitResult, LoopConfig
from .distributed import (
    Parallel,
    is_main,
    rank,
    rank_rng_states,
    set_rank_rng_state,
    world_size,
)
from .log import LOG, ProgressBar, StopRequest, append_log, printer, truncate_log
from .objective import Objective
from .optim import fit_schedule, load_optimizer_tensors, optimizer_tensors, set_lr


def fit(model: Any, optimizer: torch.optim.Optimizer, objective: Objective, loop: LoopConfig,
        out: str | Path | None = None, resume: bool = False, extra_state: dict[str, Any] | None
        = None, callback: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    """Train `model` with `optimizer` on `objective` (see the module docstring).

    `out` receives log.jsonl, the best weights (model.safetensors) and training/ (the state to
    resume from, with `extra_state` added to its state.json); `callback` receives every log
    record as it is written."""
    job = _Fit(model, optimizer, objective, loop, Path(out) if out is not None else None,
               extra_state or {}, callback)
    try:
        return job.run(resume)
    finally:
        restore_weights(model, job.held)


class _Fit:
    """The state of one call of fit; `run` is the loop."""

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, objective: Objective,
                 loop: LoopConfig, out: Path | None, extra_state: dict[str, Any],
                 callback: Callable[[dict[str, Any]], None] | None) -> None:
        self.model, self.optimizer, self.objective, self.loop = model, optimizer, objective, loop
        self.out, self.extra_state, self.callback = out, extra_state, callback
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.step, self.seen, self.elapsed, self.max_steps = 0, 0, 0.0, loop.max_steps
        self.best: dict[str, float] | None = None  # the metrics of the best model (at best_step)
        self.metrics: dict[str, float] | None = None  # of the last evaluation
        self.best_step, self.history = 0, []
        self.best_state: dict[str, torch.Tensor] | None = None
        # frozen weights (LoRA's base) in bf16 once, not at every forward pass; `held` keeps
        # their fp32 originals, which are saved, and which fit() puts back at the end
        self.held = {} if loop.fsdp else hold_frozen_weights(model, loop.precision)
        self.par: Parallel

    # ---- 1. resume, or start a fresh run directory ---------------------------------------------
    def resume(self) -> None:
        folder = find_training_checkpoint(self.out) if self.out is not None else None
        if self.out is None or folder is None:
            raise CheckpointError(f"{self.out} holds no training checkpoint to resume from")
        state = read_state(folder)
        load_weights(self.model, folder / WEIGHTS)
        load_optimizer_tensors(self.optimizer, self.names, *read_optimizer(folder))
        try:
            self.objective.batches.load_state_dict(state["sampler"])
        except (KeyError, TypeError, ValueError, IndexError):
            raise damaged(folder / STATE, "the data position does not fit this data") from None
        set_rng_state(state["rng"])
        set_rank_rng_state(state.get("rng_ranks", []), self.loop.device)  # several processes
        self.step, self.elapsed, self.seen = state["step"], state["elapsed"], state["seen"]
        self.best, self.best_step = state["best"], state["best_step"]
        if self.max_steps is None and self.loop.time_limit is None:
            self.max_steps = state["max_steps"]
        if is_main():  # lines written after the checkpoint (a half-written one: a warning)
            truncate_log(self.out / LOG, self.step)

    def fresh(self) -> None:
        """Nothing of an earlier run in `out` may be resumed or loaded."""
        if world_size() > 1:  # the ranks' dropout differs (the data is sharded by rows)
            torch.manual_seed(torch.initial_seed() + rank())
        if self.out is None or not is_main():
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for old in ("training", "training.old", "training.tmp"):
            shutil.rmtree(self.out / old, ignore_errors=True)
        (self.out / WEIGHTS).unlink(missing_ok=True)
        (self.out / LOG).unlink(missing_ok=True)

    def checkpoint(self) -> None:
        """Every rank takes part (the state is gathered); rank 0 writes."""
        if self.out is None:
            return
        weights, rng = self.weights(), rng_state(self.loop.device)
        ranks = rank_rng_states(self.loop.device)
        with self.par.optimizer_full(self.optimizer):
            optimizer = optimizer_tensors(self.optimizer, self.names)
        if self.par.main:
            if not (self.out / WEIGHTS).exists():  # no evaluation yet: the current one is best
                atomic_write_safetensors(self.out / WEIGHTS, weights)
            save_training_checkpoint(self.out, weights, optimizer, {
                "step": self.step, "max_steps": self.max_steps, "best": self.best,
                "best_step": self.best_step, "elapsed": self.elapsed, "seen": self.seen,
                "sampler": self.objective.batches.state_dict(), "rng": rng,
                **({"rng_ranks": ranks} if ranks else {}),
                "precision": self.loop.precision, "qkv_version": __version__,
                **self.extra_state})
        self.par.barrier()

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's weights as saved: whole, without wrapper prefixes, tied ones once."""
        tied = self.model.tied_weights()
        return {k: self.held.get(k, v) for k, v in self.par.weights().items() if k not in tied}

    # ---- 2. the loop ----------------------------------------------------------------------------
    def run(self, resume: bool) -> FitResult:
        loop, objective = self.loop, self.objective
        self.resume() if resume else self.fresh()
        self.par = Parallel(self.model, self.optimizer, loop.device, loop.fsdp)
        self.names = {id(p): name for name, p in self.model.named_parameters()}  # FSDP's new ones
        loss_fn = self.compiled_loss() if loop.compile else objective.loss
        loss_sum, counted = torch.zeros((), device=loop.device), 0
        start = last_log_time = time.perf_counter()
        elapsed_before, first_step = self.elapsed, self.step
        last_log_seen = self.seen
        calibration: tuple[int, float] | None = None
        stopped_by, train_loss, per_s, evaluated = None, None, 0.0, False
        self.bar = ProgressBar(loop.progress and self.par.main, self.step, self.max_steps,
                               "training" if loop.name == "train" else loop.name,
                               {"tokens": "tok", "examples": "ex"}.get(objective.unit,
                                                                       objective.unit))
        with StopRequest(loop.name) as stop:
            while self.max_steps is None or self.step < self.max_steps:
                lr = loop.schedule.at(self.step, self.max_steps or 10**12)
                set_lr(self.optimizer, lr)
                for i in range(loop.grad_accum):  # their gradients add up
                    batch = next(objective.batches)
                    self.seen += objective.count(batch)
                    batch, scale = self.par.shard(batch, objective.weight)  # this rank's rows
                    loss = self.forward_backward(loss_fn, batch, scale, i + 1 < loop.grad_accum)
                    loss_sum += loss.detach() * scale
                    counted += 1
                if loop.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), loop.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1

                now = time.perf_counter()
                self.elapsed = elapsed_before + (now - start)
                out_of_time = loop.time_limit is not None and now - start >= loop.time_limit
                if loop.time_limit is not None and self.max_steps is None:  # fit the schedule
                    more, calibration = fit_schedule(self.step - first_step, now - start,
                                                     loop.time_limit, loop.eval_cost,
                                                     loop.eval_every, calibration)
                    self.max_steps = None if more is None else first_step + more
                signal, out_of_time, self.max_steps = self.par.agree(stop.signal, out_of_time,
                                                                     self.max_steps)
                last = self.step == self.max_steps or out_of_time or signal is not None
                evaluated = self.eval_due() or (last and signal is None)
                if not (evaluated or last or (loop.log_every and self.step % loop.log_every == 0)):
                    self.bar.advance_to(self.step)
                    continue

                train_loss = self.par.mean(loss_sum).item() / counted
                loss_sum.zero_()
                counted = 0
                per_s = (self.seen - last_log_seen) / max(now - last_log_time, 1e-9)
                self.report(train_loss, lr, per_s, evaluated)
                last_log_time = time.perf_counter()
                if loop.time_limit is not None and evaluated and not last and self.max_steps:
                    # fit again from the time per update since the last fit, evaluations
                    # included: they cost more early (an untrained translator decodes to the
                    # length limit) than later; every rank takes the same (largest) count
                    now = last_log_time - start
                    more = fit_schedule(self.step - first_step, now, loop.time_limit,
                                        loop.eval_cost, loop.eval_every, calibration,
                                        refit=True)[0]
                    if more is not None:
                        self.max_steps = self.par.agree(None, False, first_step + more)[2]
                        calibration = (self.step - first_step, now)
                last_log_seen = self.seen
                # a Ctrl-C during the report stops the run now (on every rank)
                signal = self.par.agree(stop.signal, out_of_time, self.max_steps)[0]
                if signal is not None or out_of_time:
                    stopped_by = signal or "time limit"
                    break
            self.bar.close()
            if stopped_by is not None and not evaluated:
                self.checkpoint()
            self.par.barrier()  # every file is written before any rank goes on

        # ---- 3. finish -------------------------------------------------------------------------
        if stopped_by in ("SIGINT", "SIGTERM") and self.out is not None and self.par.main:
            printer(True, loop.name)(f"{stopped_by}: saved a checkpoint at step {self.step} in "
                                     f"{self.out / 'training'}", warning=True)
        return FitResult(
            step=self.step, max_steps=self.max_steps or self.step, train_loss=train_loss,
            metrics=self.metrics, best=self.best, best_step=self.best_step, per_s=per_s,
            elapsed=self.elapsed, stopped_by=stopped_by, history=self.history,
            best_state=self.best_state)

    def forward_backward(self, loss_fn: Callable[..., torch.Tensor], batch: Any,
                         scale: float = 1.0, accumulating: bool = False) -> torch.Tensor:
        """The loss of one micro-batch, whose gradient (times `scale`) is added to the
        parameters' .grad (and, unless `accumulating`, synchronised across the ranks)."""
        device, precision = self.loop.device, self.loop.precision
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        length = batch[0].shape[-1] if batch and batch[0].dim() >= 2 else None  # tokens per row
        with training_attention(device, precision, length), self.par.accumulating(accumulating):
            with autocast(device, precision):
                loss = self.par.call(loss_fn, batch)
            (loss * scale / self.loop.grad_accum).backward()
        return loss

    def eval_due(self) -> bool:
        every, due = self.loop.eval_every, self.objective.eval_due
        return bool((every and self.step % every == 0) or (due is not None and due(self.step)))

    def report(self, train_loss: float, lr: float, per_s: float, evaluated: bool) -> None:
        """A log line (and, after an evaluation, the best model and a checkpoint)."""
        unit = self.objective.unit
        record: dict[str, Any] = {
            "step": self.step, "train_loss": round(train_loss, 6), "lr": lr,
            f"{unit}_per_s": round(per_s, 1), "elapsed": round(self.elapsed, 3), unit: self.seen,
            **(self.objective.progress() if self.objective.progress else {})}
        metrics = self.evaluate() if evaluated else None
        if metrics is not None:
            record.update({k: round(v, 6) for k, v in metrics.items()})
            first = self.objective.best[0][0]
            record[f"best_{first}"] = round((self.best or metrics)[first], 6)
        if self.out is not None and self.par.main:
            append_log(self.out / LOG, record)
        if self.callback is not None and self.par.main:
            self.callback(record)
        self.history.append(record)
        self.bar.update(self.step, train_loss, per_s, lr, self.max_steps)
        if metrics is not None:
            shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
            self.bar.write(f"step {self.step}: train loss {train_loss:.4f}, {shown}, "
                           f"{per_s:,.0f} {unit}/s")
            self.checkpoint()

    def evaluate(self) -> dict[str, float]:
        """The objective's metrics; the best model so far is saved (or kept in memory)."""
        with evaluating(self.model), autocast(self.loop.device, self.loop.precision):
            metrics = self.metrics = self.par.evaluate(self.objective.evaluate)
        if self.best is None or self.objective.score(metrics) > self.objective.score(self.best):
            self.best, self.best_step = dict(metrics), self.step
            if self.out is not None:
                weights = self.weights()  # every rank: FSDP gathers
                if self.par.main:
                    atomic_write_safetensors(self.out / WEIGHTS, weights)
            else:
                self.best_state = {k: self.held.get(k, v).detach().clone()
                                   for k, v in self.par.weights().items()}
        return metrics

    def compiled_loss(self) -> Callable[..., torch.Tensor]:
        """The objective's loss compiled by torch.compile, tried once on a batch; the eager loss
        (and a one-line warning) if compiling fails. The trial leaves no trace: gradients,
        random state and the data position are restored."""
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break notices
        rng, position = torch.get_rng_state(), self.objective.batches.state_dict()
        try:
            compiled = torch.compile(self.objective.loss)
            batch, scale = self.par.shard(next(self.objective.batches), self.objective.weight)
            self.forward_backward(compiled, batch, scale)
            return compiled
        except Exception as e:  # any failure inside the compiler stack
            first_line = (str(e).strip().splitlines() or [""])[0][:120]
            print(f"qkv: warning: torch.compile failed ({type(e).__name__}: {first_line}); "
                  "training without it", file=sys.stderr)
            return self.objective.loss
        finally:
            self.model.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)
            self.objective.batches.load_state_dict(position)
