"""Positional encoding: attention itself ignores order, so each token must be told where it is.

Three ways, all in use:
- learned (GPT-2, BERT): a trainable row per position, added to the token vector.
- sinusoidal (Vaswani et al. 2017, section 3.5): a fixed table, added to the token vector,
      PE(pos, 2i)   = sin(pos / 10000^(2i / d_model))
      PE(pos, 2i+1) = cos(pos / 10000^(2i / d_model))
- rotary, RoPE (Su et al. 2021; Llama): nothing is added; instead queries and keys are rotated
  by an angle proportional to their position, so that q . k depends only on the *distance*
  between the two tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class LearnedPositions(nn.Module):
    def __init__(self, max_len: int, d_model: int, offset: int = 0):
        super().__init__()
        self.offset = offset  # BART keeps `offset` unused rows before position 0
        self.weight = nn.Parameter(torch.empty(max_len + offset, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        limit = self.weight.shape[0] - self.offset
        if positions.numel() and int(positions.max()) >= limit:
            raise InputError(
                f"a sequence of {int(positions.max()) + 1} tokens is longer than "
                f"max_seq_len={limit} of this model's learned positions"
            )
        return F.embedding(positions + self.offset, self.weight)  # (B|1, T, d_model)


def sinusoidal_table(n_positions: int, d_model: int, layout: str = "interleaved") -> torch.Tensor:
    """The paper's fixed encoding as an (n_positions, d_model) table.

    "interleaved" is the paper's layout (sin in even dims, cos in odd dims); "halves" holds the
    same numbers with every sine first and every cosine after (the Marian/fairseq layout).
    """
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (d/2,)
    angle = pos / torch.pow(10000.0, two_i / d_model)  # (P, d/2)
    table = torch.empty(n_positions, d_model, dtype=torch.float64)
    if layout == "interleaved":
        table[:, 0::2] = torch.sin(angle)
        table[:, 1::2] = torch.cos(angle)
    else:
        table[:, : d_model // 2] = torch.sin(angle)
        table[:, d_model // 2 :] = torch.cos(angle)
    return table.float()


class SinusoidalPositions(nn.Module):
    table: torch.Tensor  # (max_len, d_model), a buffer

    def __init__(self, max_len: int, d_model: int, layout: str = "interleaved"):
        super().__init__()
        self.d_model, self.layout = d_model, layout
        # A buffer, not a parameter: fixed, and not saved in checkpoints (it is a formula).
        self.register_buffer("table", sinusoidal_table(max_len, d_model, layout), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.table.shape[0]:  # the formula extends to any length
            self.table = sinusoidal_table(needed, self.d_model, self.layout).to(self.table.device)
        return self.table[positions]  # (B|1, T, d_model)


class RotaryEmbedding(nn.Module):
    """Computes the rotation angles; `apply_rotary` rotates queries and keys with them.

    Dimension pairs (i, i + d/2) of each head are rotated by pos * theta^(-2i/d): the
    "rotate half" arrangement that Llama's checkpoints use.
    """

    inv_freq: torch.Tensor  # (head_dim / 2,), a buffer

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B|1, T) -> cos, sin of shape (B|1, 1, T, head_dim), in fp32."""
        angles = positions[..., None].float() * self.inv_freq  # (B, T, d/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, d)
        return angles.cos()[:, None], angles.sin()[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, head_dim) by the angles of its positions."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
