"""Normalisation: keep each token vector at a stable scale so deep stacks train.

LayerNorm (Ba et al. 2016), used by the original Transformer, GPT-2 and BERT:
    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias
RMSNorm (Zhang & Sennrich 2019), used by Llama: no centring, no bias:
    y = x / sqrt(mean(x^2) + eps) * weight
Both act on the last dimension (d_model) of each token separately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares is taken in fp32 even when x is bf16: small sums lose precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """The norm the config asks for: "layernorm" or "rmsnorm"."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return LayerNorm(dim, eps, bias=bias)
