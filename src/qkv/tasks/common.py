"""What the tasks share: loading a model by a directory, a name or a (model, tokenizer) pair."""

from __future__ import annotations

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
