"""Token embedding: each token id picks one learned row of a (vocab_size, d_model) table.

The paper multiplies the looked-up vectors by sqrt(d_model) (section 3.4) so that they are not
drowned by the positional encoding that is added next; GPT-2 and BERT do not. BERT also adds a
*segment* (token-type) embedding that says whether a token belongs to sentence A or B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, scale: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.scale = math.sqrt(d_model) if scale else 1.0
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids(ids, self.weight.shape[0], "token id")
        x = F.embedding(ids, self.weight)  # (B, T) -> (B, T, d_model)
        return x * self.scale if self.scale != 1.0 else x


class TypeEmbedding(nn.Module):
    """BERT's segment embedding: token_types 0 for sentence A, 1 for sentence B."""

    def __init__(self, type_vocab_size: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(type_vocab_size, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, token_types: torch.Tensor) -> torch.Tensor:
        check_ids(token_types, self.weight.shape[0], "token type")
        return F.embedding(token_types, self.weight)


def check_ids(ids: torch.Tensor, size: int, what: str) -> None:
    """Raise InputError for an id outside [0, size): torch would fail with an opaque message."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"{what}s must be an integer tensor, got {ids.dtype}")
    if ids.numel():
        low, high = (int(v) for v in torch.aminmax(ids))  # one pass, one device sync
        if high >= size or low < 0:
            bad = high if high >= size else low
            raise InputError(f"{what} {bad} is outside the table of size {size}")
