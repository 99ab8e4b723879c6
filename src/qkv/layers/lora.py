"""LoRA: fine-tune a frozen linear layer through a small low-rank update (Hu et al. 2021).

A pretrained weight W (out x in) stays fixed; what is learned is a product B A of two thin
matrices, A (r x in) and B (out x r), with the rank r much smaller than in and out:

    y = x W^T + b + (alpha / r) * x A^T B^T

B starts at zero, so before training the layer computes exactly what the base layer computed;
A starts random, so that the first gradient step moves B. Only r * (in + out) numbers per layer
are trained instead of in * out, and after training the update can be folded into W
(`merged()`), so the fine-tuned model costs nothing extra to run.

qkv fuses the query, key and value projections into one matrix whose rows are [q; k; v]. A LoRA
update may cover only some row blocks of such a matrix ("parts"): each part has its own A and B
and adds to its own rows, which is what a separate LoRA on a separate q or v projection does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from .dropout import Dropout


@dataclass(frozen=True)
class Part:
    """One low-rank update: it adds to output rows [start, start + size), at rank `rank`, with
    the scale alpha / rank."""

    start: int
    size: int
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """A drop-in `nn.Linear` whose weight and bias are the base layer's (frozen), plus LoRA
    updates on some of its output rows.

        layer = LoRALinear.wrap(nn.Linear(64, 192), [Part(0, 64, 8, 16.0)])

    The state dict keeps the base layer's `weight` and `bias` under their own names, and adds
    `lora_A.i` (rank x in) and `lora_B.i` (size x rank) for part i.
    """

    def __init__(self, in_features: int, out_features: int, parts: list[Part],
                 bias: bool = True, dropout: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if not parts:
            raise InputError("a LoRA layer needs at least one part")
        parts = sorted(parts, key=lambda p: p.start)
        for p, q in zip(parts, parts[1:], strict=False):
            if q.start < p.start + p.size:
                raise InputError(f"LoRA parts overlap: rows {p.start}:{p.start + p.size} and "
                                 f"{q.start}:{q.start + q.size}")
        for p in parts:
            if p.rank < 1:
                raise InputError(f"LoRA rank {p.rank} must be at least 1")
            if p.start < 0 or p.size < 1 or p.start + p.size > out_features:
                raise InputError(f"LoRA part rows [{p.start}, {p.start + p.size}) fall outside "
                                 f"the layer's {out_features} output rows")
            if p.rank > min(in_features, p.size):
                raise InputError(f"LoRA rank {p.rank} is larger than the layer it adapts "
                                 f"({p.size} x {in_features}); choose a rank of at most "
                                 f"{min(in_features, p.size)}")
        self.parts = list(parts)
        self.lora_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"device": device if device != "meta" else None, "dtype": dtype}
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.empty(p.rank, in_features, **kw)) for p in parts)
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(p.size, p.rank, **kw)) for p in parts)
        for a in self.lora_A:  # as nn.Linear initialises its weight (and as PEFT does)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    @classmethod
    def wrap(cls, base: nn.Linear, parts: list[Part], dropout: float = 0.0) -> LoRALinear:
        """A LoRA layer that shares `base`'s weight and bias (no copy), frozen."""
        w = base.weight
        layer = cls(base.in_features, base.out_features, parts, bias=base.bias is not None,
                    dropout=dropout, device="meta", dtype=w.dtype)
        layer.weight = w
        layer.bias = base.bias
        layer.lora_A.to(w.device)
        layer.lora_B.to(w.device)
        w.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        return layer

    def delta(self) -> torch.Tensor:
        """The whole update (out x in), scales included: what `merged()` adds to the weight."""
        d = torch.zeros_like(self.weight, dtype=torch.float32)
        for p, a, b in zip(self.parts, self.lora_A, self.lora_B, strict=True):
            d[p.start:p.start + p.size] += p.scale * (b.float() @ a.float())
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # (..., out)
        a = torch.cat(list(self.lora_A), dim=0) if len(self.parts) > 1 else self.lora_A[0]
        h = self.lora_dropout(x) @ a.to(x.dtype).t()  # (..., sum of ranks)
        if len(self.parts) == 1 and self.parts[0].size == self.out_features:
            p = self.parts[0]
            return y + p.scale * (h @ self.lora_B[0].to(x.dtype).t())
        pieces, row, col = [], 0, 0
        for p, b in zip(self.parts, self.lora_B, strict=True):  # parts sorted by row
            if p.start > row:  # rows without an update
                pieces.append(h.new_zeros(*h.shape[:-1], p.start - row))
            pieces.append(p.scale * (h[..., col:col + p.rank] @ b.to(x.dtype).t()))
            row, col = p.start + p.size, col + p.rank
        if row < self.out_features:
            pieces.append(h.new_zeros(*h.shape[:-1], self.out_features - row))
        return y + torch.cat(pieces, dim=-1)  # (..., out)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the update folded into its weight: W + sum of scale * B A."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        weight = (self.weight.float() + self.delta()).to(self.weight.dtype)
        linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        parts = ", ".join(f"rows {p.start}:{p.start + p.size} r={p.rank}" for p in self.parts)
        return f"{super().extra_repr()}, lora=[{parts}]"
