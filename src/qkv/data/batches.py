"""Language-model batches: windows of a long stream of token ids.

A causal language model learns to predict every next token, so one window of T + 1 ids gives
T training examples at once:

    window  = [t0, t1, t2, ..., tT]
    inputs  = [t0, t1, ..., tT-1]      (x)
    targets = [t1, t2, ..., tT]        (y: each input's next token)

Training windows start at random positions (a fresh mix every step); evaluation windows are
fixed and evenly spread over the held-out text, so two evaluations measure the same thing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InputError


def windows(tokens: np.ndarray, starts: np.ndarray, context: int) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """x, y of shape (len(starts), context) from the windows beginning at `starts`."""
    index = starts[:, None] + np.arange(context + 1)  # (B, T + 1)
    w = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))  # reads only these ids
    return w[:, :-1], w[:, 1:]


class LMBatches:
    """An endless stream of random (x, y) batches from `tokens`, reproducible from `seed`.

    Its state (the random generator's state and the number of batches drawn) is plain JSON, so a
    checkpoint can store the exact position in the stream and a resumed run sees the very
    batches it would have seen without the interruption.
    """

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int, seed: int = 0):
        if len(tokens) < context + 1:
            raise InputError(f"{len(tokens)} tokens cannot fill a window of {context + 1}")
        self.tokens, self.context, self.batch_size = tokens, context, batch_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.drawn = 0

    def __iter__(self) -> LMBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        last_start = len(self.tokens) - self.context - 1
        starts = self.rng.integers(0, last_start + 1, size=self.batch_size)
        self.drawn += 1
        return windows(self.tokens, starts, self.context)  # (B, T), (B, T)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.drawn = int(state["drawn"])


def eval_batches(tokens: np.ndarray, context: int, batch_size: int,
                 max_windows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: up to `max_windows` windows spread evenly over `tokens`."""
    last_start = len(tokens) - context - 1
    n = max(1, min(max_windows, last_start // context + 1))  # no more than non-overlapping
    starts = np.linspace(0, last_start, n).round().astype(np.int64)
    return [windows(tokens, starts[i:i + batch_size], context)
            for i in range(0, n, batch_size)]
