"""Heads: what turns the last layer's vectors into an answer.

- the output layer (an `nn.Linear` to the vocabulary) gives next-token or masked-token scores;
  BERT puts `MLMTransform` (dense -> activation -> norm) before it;
- `pool` makes one vector per sequence (a sentence embedding): the mean of the token vectors,
  the first ([CLS]) or last one, or the maximum of each dimension;
- `Pooler` is BERT's dense + tanh on the [CLS] vector, read by its classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from .feedforward import ACTIVATIONS


class MLMTransform(nn.Module):
    """BERT's masked-LM head before the output layer: dense -> activation -> norm."""

    def __init__(self, d_model: int, activation: str, norm: nn.Module):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.act = ACTIVATIONS.get(activation, ACTIVATIONS["gelu"])  # a gated FFN's: GELU
        self.norm = norm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(h)))  # (..., d_model)


class Pooler(nn.Module):
    """BERT's pooler: the first ([CLS]) token through dense + tanh."""

    def __init__(self, d_model: int):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))  # (B, d_model)


def pool(h: torch.Tensor, padding_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, d) -> (B, d): one vector per sequence, ignoring padding."""
    if padding_mask is None:
        padding_mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    m = padding_mask.to(h.dtype)[..., None]  # (B, T, 1)
    if how == "cls":
        return h[:, 0]
    if how == "last":  # the last real token, whichever side the padding is on
        last = (padding_mask.long() * torch.arange(h.shape[1], device=h.device)).argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    if how == "max":
        return h.masked_fill(m == 0, float("-inf")).amax(1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean
