"""Turning ragged rows of token ids into batches, and running a model for inference.

    pad_id(tokenizer)                  the id that fills padding: pad, else eos, else 0
    pad_rows(rows, pad_id, side)       ids (B, T) and mask (B, T), 1 for a real token
    evaluating(model)                  eval mode and no autograd, then the previous mode back
    eval_mode(model)                   eval mode only (for generators: see its docstring)
    model_device(model)                where the model's weights are
    sorted_batches(lengths, size)      index batches, longest first (inference)
    bucketed_batches(lengths, size)    shuffled index batches of similar lengths (training)

A batch costs as much as its longest row times its size, so batching rows of similar length
together is the single biggest speed-up for short, ragged text on a CPU. Padding goes on the
right for an encoder and for training; a decoder that generates pads on the left, so that every
row's last token is at the same place. This module depends on torch only.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def pad_id(tokenizer: Any) -> int:
    """The id that fills padding: the tokenizer's pad, else eos (GPT-2 has no pad), else 0."""
    for token_id in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None)):
        if token_id is not None:
            return int(token_id)
    return 0


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right",
             device: str | torch.device | None = None,
             length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists of ids to the longest: (ids LongTensor (B, T), mask LongTensor (B, T)).

    mask is 1 at a real token and 0 at padding; side="left" puts the padding first. length:
    pad to this many positions instead (at least the longest row)."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r} is not 'right' or 'left'")
    longest = max([len(r) for r in rows] + [length or 0])
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        n = len(row)
        if n == 0:
            continue
        where = slice(0, n) if side == "right" else slice(longest - n, longest)
        ids[i, where] = torch.as_tensor(row, dtype=torch.long)
        mask[i, where] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off (model.eval()); the previous mode is restored afterwards.

    A generator that yields inside this block keeps only the model's mode while it is paused;
    `evaluating` would also leave inference mode on in the caller's code between two yields
    (a thread-wide switch), so a generator decorates its model calls with
    `torch.inference_mode()` instead, which torch switches off at each yield."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off (model.eval()) and autograd off (inference mode); the mode is restored."""
    with eval_mode(model), torch.inference_mode():
        yield


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (a model lives on one device)."""
    return next(model.parameters()).device


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of indices, longest first, for evaluation and inference (order does not matter)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random,
                     bucket_batches: int = 50) -> list[list[int]]:
    """Shuffled training batches whose rows have similar lengths.

    Shuffle everything, cut it into buckets of `bucket_batches` batches, sort each bucket by length
    and cut it into batches, then shuffle the batches: every epoch sees a new random mix, yet
    each batch pads very little.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), size):
        bucket = sorted(order[start: start + size], key=lambda i: lengths[i])
        batches += [bucket[i: i + batch_size] for i in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches
