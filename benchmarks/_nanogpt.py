"""A nanoGPT-style GPT, the fp32 peer of bench_train.py, written here for the comparison.

It follows the architecture of Karpathy's nanoGPT (model.py): learned token and position
embeddings, pre-norm blocks of LayerNorm -> causal self-attention through one fused c_attn
projection and `F.scaled_dot_product_attention(is_causal=True)` -> LayerNorm -> MLP (4x, exact
GELU), a final LayerNorm and an output layer tied to the token embedding; `bias=False` drops
every bias (nanoGPT's option, which its Shakespeare "baby GPT" is usually run with). Weights
start as nanoGPT's: normal(0, 0.02), residual projections scaled by 1/sqrt(2 * layers). It is
trained as nanoGPT trains on a CPU without a GPU: fp32, fused AdamW (matrices decayed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Norm(nn.Module):
    """LayerNorm whose bias may be absent (PyTorch's LayerNorm has no bias-only switch in old
    releases; nanoGPT writes the same small class)."""

    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class _Block(nn.Module):
    def __init__(self, d: int, n_heads: int, bias: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = _Norm(d, bias), _Norm(d, bias)
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.attn_proj = nn.Linear(d, d, bias=bias)
        self.c_fc = nn.Linear(d, 4 * d, bias=bias)
        self.mlp_proj = nn.Linear(4 * d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)  # (B, T, d) each
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for t in (q, k, v))  # (B, n_heads, T, d_head)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n_heads, T, d_head)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, d))  # (B, T, d)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab_size: int, context: int, d_model: int, n_layers: int,
                 n_heads: int, bias: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, bias) for _ in range(n_layers))
        self.ln_f = _Norm(d_model, bias)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2 and nanoGPT
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean next-token cross-entropy of `targets` (B, T) given `idx` (B, T)."""
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def nanogpt_adamw(model: nn.Module, lr: float, weight_decay: float,
                  betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """nanoGPT's configure_optimizers: matrices decayed, vectors not, fused AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
