"""Position-wise feed-forward network: the same two-layer MLP applied to every token.

Attention mixes information *between* tokens; the feed-forward layer then transforms each token
*on its own*. The paper's version: FFN(x) = max(0, x W1 + b1) W2 + b2, with an inner width d_ff
(4 x d_model). Later models swapped ReLU for GELU (BERT, GPT-2) or for a gated unit, SwiGLU
(Shazeer 2020; Llama): FFN(x) = (SiLU(x W_gate) * (x W_up)) W_down.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact, with erf (BERT)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "silu": F.silu,  # also called swish
}


class FeedForward(nn.Module):
    """up-project -> activation -> down-project."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))  # (B, T, d_model)


class GatedFeedForward(nn.Module):
    """SwiGLU / GeGLU: a gate branch, through the activation, scales an up branch elementwise."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.act = F.silu if activation == "swiglu" else ACTIVATIONS["gelu_tanh"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


def make_feedforward(d_model: int, d_ff: int, activation: str, bias: bool) -> nn.Module:
    if activation in ("swiglu", "geglu"):
        return GatedFeedForward(d_model, d_ff, activation, bias)
    return FeedForward(d_model, d_ff, activation, bias)


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """GELU written out: x * Phi(x), Phi the standard normal CDF (for tests and readers)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
