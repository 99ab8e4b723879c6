"""An objective: everything the training loop needs to know about what is being learned.

The loop (train/loop.py) never asks which model family it trains or which task it serves. It is
handed an Objective, built by the code that knows the task:

    batches    an iterator of micro-batches (tuples of tensors), resumable: state_dict() gives a
               JSON-safe position, load_state_dict() returns to it
    loss       loss(model, batch) -> the mean loss of one micro-batch (a scalar tensor); called
               under the run's autocast, so it may compute in bf16
    evaluate   evaluate(model) -> {"metric": value}, on held-out data (the loop puts the model in
               eval mode and switches autograd off around it)
    best       the metrics that pick the best model, in order, with their direction:
               [("val_loss", "min")], or [("dev_accuracy", "max"), ("dev_loss", "min")]
    count      count(batch) -> how many `unit`s a micro-batch holds (for throughput: tokens/s)
    weight     optional: weight(batch) -> how many targets the loss of a micro-batch averages
               over (default: its rows). Several processes take shares of a micro-batch and
               weight their losses by it, so the mean is over the whole batch's targets
               (train/distributed.py); a loss averaged over tokens must say so here.
    eval_due   optional: eval_due(step) -> True where an evaluation is due besides every
               `eval_every` updates (the end of an epoch)
    progress   optional: progress() -> {"epoch": 1.5}, added to every log line

Next-token language modelling (train/lm.py), masked language modelling (tasks/mlm.py) and
classification fine-tuning (tasks/classify.py) are three objectives for the one loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Batches(Protocol):
    """A resumable stream of micro-batches."""

    def __iter__(self) -> Iterator[Any]: ...

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Objective:
    batches: Batches
    loss: Callable[[Any, Any], torch.Tensor]  # (model, batch) -> mean loss
    evaluate: Callable[[Any], dict[str, float]]  # model -> metrics
    best: Sequence[tuple[str, str]]
    unit: str = "tokens"
    count: Callable[[Any], int] = lambda batch: int(batch[0].numel())
    eval_due: Callable[[int], bool] | None = None
    weight: Callable[[Any], float] | None = None
    progress: Callable[[], dict[str, float]] | None = None

    def __post_init__(self) -> None:
        for metric, direction in self.best:
            if direction not in ("min", "max"):
                raise ValueError(f"best metric {metric!r}: direction {direction!r} is not "
                                 "min or max")

    def score(self, metrics: dict[str, float]) -> tuple[float, ...]:
        """A key that is larger for a better model (compare with >)."""
        return tuple(metrics[m] if d == "max" else -metrics[m] for m, d in self.best)
