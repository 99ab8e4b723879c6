"""Small pieces the tasks share: loading a model by name, and length-sorted batches.

Length-sorted batching is the single biggest speed-up for short, ragged text on a CPU: a batch
costs as much as its longest row times the batch size, so putting rows of similar length together
wastes almost nothing on padding.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import load
from ..errors import InputError
from ..model import Transformer
from ..tokenizer import Tokenizer


def load_model(model: str | Path | tuple | Transformer, tokenizer: Tokenizer | None = None,
               device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a directory, a name such as "all-MiniLM-L6-v2", or a pair."""
    if isinstance(model, tuple):
        if len(model) != 2:
            raise InputError("pass the model as a directory, a name, or a (model, tokenizer) pair")
        model, tokenizer = model
    elif isinstance(model, (str, Path)):
        source = str(model)
        model, loaded = load(model, device=device)
        tokenizer = tokenizer if tokenizer is not None else loaded
        if tokenizer is None:
            raise InputError(f"{source} has no tokenizer.json; pass a tokenizer too")
    if not isinstance(model, Transformer):
        raise InputError(f"expected a qkv Transformer, got {type(model).__name__}")
    if tokenizer is None:
        raise InputError("a tokenizer is needed to turn text into token ids")
    return model.to(device), tokenizer



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
