"""The optimizer (AdamW), its learning-rate schedule, and its state as safetensors.

AdamW (Loshchilov & Hutter 2019) keeps, for every weight, running averages of its gradient
(`exp_avg`, the momentum) and of its squared gradient (`exp_avg_sq`), and moves the weight by
their ratio. Weight decay pulls weights toward zero, separately from the gradient step. As in
nanoGPT, every matrix (2-D or more: linear layers and embeddings) is decayed, and the vectors
(biases, norm gains) are not: shrinking a norm's gain or a bias only hurts.

The schedule: a linear warm-up to the peak learning rate (the first steps have noisy gradients
and an optimizer that knows nothing yet), then a decay: a cosine down to `min_lr` (pre-training,
as GPT-2 and nanoGPT), or a straight line down to 0 (fine-tuning, as BERT).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.95),
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with two parameter groups: matrices (decayed) and vectors (not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each update: `warmup` updates of linear warm-up to `lr`, then a
    decay that reaches `min_lr` at the last update.

    decay="cosine": the warm-up reaches lr at update `warmup` - 1, then half a cosine wave.
    decay="inverse_sqrt": the Transformer paper's (eq. 3): after the warm-up, lr * sqrt(warmup /
    (step + 1)), whatever the number of updates (min_lr is not used).
    decay="linear": BERT's fine-tuning schedule (as Hugging Face's linear schedule with
    warm-up): update k of the warm-up gets lr * k / warmup, so update 0 moves only AdamW's
    moments, then a straight line to min_lr (0 by default) at the last update.
    """

    lr: float
    warmup: int
    min_lr: float = 0.0
    decay: str = "cosine"

    def __post_init__(self) -> None:
        if self.decay not in ("cosine", "linear", "inverse_sqrt"):
            raise ValueError(f"decay={self.decay!r} is not cosine, linear or inverse_sqrt")

    def at(self, step: int, total: int) -> float:
        """The learning rate of update number `step` (0-based) of `total`."""
        if self.decay == "linear":
            if step < self.warmup:
                return self.min_lr + (self.lr - self.min_lr) * (step / self.warmup)
            left = max(0.0, (total - step) / max(1, total - self.warmup))  # 1 -> 0
            return self.min_lr + (self.lr - self.min_lr) * left
        if self.decay == "inverse_sqrt":  # Vaswani et al. 2017, eq. 3: no end to reach
            return self.lr * min((step + 1) / max(1, self.warmup),
                                 (max(1, self.warmup) / (step + 1)) ** 0.5)
        return lr_at(step, self.lr, self.min_lr, self.warmup, total)


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The learning rate of update number `step` (0-based): warm-up, then cosine to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


#: With a time limit and no step count: time this many updates, then fit the schedule.
CALIBRATION_STEPS = 12


def fit_schedule(step: int, seconds: float, time_limit: float, eval_cost: float,
                 eval_every: int | None, calibration_start: tuple[int, float] | None,
                 refit: bool = False) -> tuple[int | None, tuple[int, float] | None]:
    """With only a time limit: choose how many updates fill the time.

    `step` counts the updates of this process and `seconds` its time so far; an evaluation
    costs about `eval_cost` updates and comes every `eval_every`. The first fit comes after a
    few timed updates. With `refit` (called just after an evaluation, `calibration_start` then
    the (step, seconds) of the previous fit), the fit is made again from the time per update
    since then, evaluations included, so a wrong guess of their cost, or a machine that got
    busier or quieter, is corrected while the schedule still has time to reach its end.
    Returns (the total number of updates, or None while still timing; the calibration start
    to pass back next time)."""
    if step == 2:  # the first updates are slow (memory allocation, kernel selection)
        return None, (step, seconds)
    if calibration_start is None or step < calibration_start[0] + CALIBRATION_STEPS:
        return None, calibration_start
    per_step = (seconds - calibration_start[1]) / (step - calibration_start[0])
    eval_seconds = 0.0 if refit else per_step * eval_cost  # a refit's average holds them
    remaining = max(0.0, time_limit - seconds)
    more = int(0.97 * remaining / (per_step + eval_seconds / (eval_every or 10**12)))
    return step + max(1, more), calibration_start


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------- state <-> safetensors

def optimizer_tensors(optimizer: torch.optim.Optimizer,
                      names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten the optimizer's state into named tensors plus JSON metadata.

    `names` maps id(parameter) -> its name in the model, so the file reads like the weights file:
    "decoder.layers.0.ffn.up.weight/exp_avg". The hyperparameters of each parameter group (and
    which parameters it holds) go to the metadata as JSON.
    """
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append({
            **{k: v for k, v in group.items() if k != "params"},
            "params": [names[id(p)] for p in group["params"]],
        })
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{names[id(p)]}/{key}"] = value.detach().cpu().contiguous()
                else:
                    other.setdefault(names[id(p)], {})[key] = value
    metadata = {"param_groups": json.dumps(groups), "other_state": json.dumps(other)}
    return tensors, metadata


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str],
                           tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The inverse of `optimizer_tensors`: restore the state into `optimizer`."""
    try:
        groups = json.loads(metadata["param_groups"])
        other = json.loads(metadata.get("other_state", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"the optimizer state has no readable metadata ({e})") from None
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"the optimizer state has {len(groups)} parameter groups, but the "
                              f"optimizer has {len(optimizer.param_groups)}")
    per_param: dict[str, dict] = {}
    for key, tensor in tensors.items():
        name, field = key.rsplit("/", 1)
        per_param.setdefault(name, {})[field] = tensor
    index = 0  # torch's state_dict numbers parameters in group order
    state: dict[int, dict] = {}
    saved_groups = []
    for saved, group in zip(groups, optimizer.param_groups, strict=True):
        mine = [names[id(p)] for p in group["params"]]
        if saved["params"] != mine:
            raise CheckpointError("the optimizer state was saved for different parameters")
        for name in mine:
            entry = {**per_param.get(name, {}), **other.get(name, {})}
            if entry:
                state[index] = entry
            index += 1
        ids = list(range(index - len(mine), index))
        saved_groups.append({**saved, "params": ids, "betas": tuple(saved["betas"])})
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups})
