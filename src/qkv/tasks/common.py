"""Small pieces the tasks share: loading a model by name, precision, padding, length-sorted batches.

Length-sorted batching is the single biggest speed-up for short, ragged text on a CPU: a batch
costs as much as its longest row times the batch size, so putting rows of similar length together
wastes almost nothing on padding.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError

if TYPE_CHECKING:
    from ..model import Transformer
    from ..tokenizer import Tokenizer

PRECISIONS = ("auto", "bf16", "fp32")


def load_model(model: str | Path | tuple | Transformer, tokenizer: Tokenizer | None = None,
               device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a directory, a name such as "all-MiniLM-L6-v2", or a pair."""
    from ..checkpoint import load
    from ..model import Transformer

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


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Switch dropout off (model.eval()) and gradients off, then restore the previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 matrix multiplies are fast here (AMX or AVX-512 BF16 on a CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    capability = torch.backends.cpu.get_cpu_capability()
    if "AMX" in capability:
        return True
    if "AVX512" not in capability:
        return False
    try:  # AVX-512 alone emulates bf16 slowly; oneDNN knows whether the BF16 instructions exist
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """ "auto" -> "bf16" where the hardware has it, else "fp32"."""
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def autocast(precision: str, device: str | torch.device = "cpu"):
    """A context in which matrix multiplies run in bf16 (weights stay fp32), or a no-op."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of ids into (ids (B, T), mask (B, T)); mask is 1 for a real token."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


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


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The id that fills padding: pad, else eos (GPT-2 has no pad token), else 0."""
    for token_id in (tokenizer.pad_id, tokenizer.eos_id):
        if token_id is not None:
            return token_id
    return 0
