"""Scaled dot-product attention and multi-head attention.

Each token asks a question (its query q), advertises what it holds (its key k) and offers content
(its value v). A token's output is the average of all values, weighted by how well its query
matches each key (Vaswani et al. 2017, eq. 1):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

Multi-head attention runs h such attentions side by side on h slices of the model width, then
mixes their outputs with one more projection. Here:

- `attention()`          the formula, one function, with a fast and an explicit path;
- `SelfAttention`        Q, K, V all come from the same sequence (bidirectional or causal);
- `CrossAttention`       Q from the decoder, K and V from the encoder's output;
- `KVCache`              keys and values of past tokens, so generation does not recompute them.

Grouped-query attention (GQA, Ainslie et al. 2023): n_kv_heads < n_heads key/value heads, each
shared by a group of query heads; n_kv_heads = 1 is multi-query attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .position import apply_rotary


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale) v, over heads.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv (GQA).
    mask: bool, broadcastable to (B, H, Tq, Tk); True where a query may look at a key.
    causal: query i may only look at keys <= i; when Tk > Tq (a KV cache holds the past), the
        queries are the *last* Tq positions.
    Returns (output (B, H, Tq, D), weights (B, H, Tq, Tk) or None).

    The fast path is PyTorch's fused scaled_dot_product_attention (flash / memory-efficient
    kernels); the explicit path computes the same numbers step by step and also returns the
    attention weights, for learning and for visualisation.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if k.shape[1] != q.shape[1]:  # GQA: each key/value head serves a group of query heads
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, D)
        v = v.repeat_interleave(group, dim=1)
    if causal and (mask is not None or Tq != Tk or return_weights):
        if Tq > 1:  # one new query sees everything in the cache: no mask needed
            allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
            mask = allowed if mask is None else mask & allowed
        causal = False

    if not return_weights:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale
        )
        return out, None

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1).to(q.dtype)  # each row sums to 1
    dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights  # (B, H, Tq, D)


class KVCache:
    """Keys and values of the positions already seen by one attention layer.

    During generation each new token only needs its own query; the keys and values of earlier
    tokens never change, so they are kept here instead of being recomputed at every step.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # (B, Hkv, T_past, D): views into the buffers
        self.v: torch.Tensor | None = None
        self._k: torch.Tensor | None = None  # (B, Hkv, capacity, D) with room to grow
        self._v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the keys and values of new positions; return those of all positions so far.

        The cache is a buffer with spare room, written in place: a new token costs a copy of its
        own keys and values, not of the whole past (as `torch.cat` would). When the buffer is
        full it is reallocated with twice the room, so copies stay rare.
        """
        past, new = len(self), k.shape[-2]
        if self._k is None or past + new > self._k.shape[-2]:
            capacity = max(64, 2 * (past + new))
            grown_k = k.new_empty(*k.shape[:-2], capacity, k.shape[-1])
            grown_v = v.new_empty(*v.shape[:-2], capacity, v.shape[-1])
            if past:
                grown_k[..., :past, :] = self.k
                grown_v[..., :past, :] = self.v
            self._k, self._v = grown_k, grown_v
        self._k[..., past:past + new, :] = k
        self._v[..., past:past + new, :] = v
        self.k, self.v = self._k[..., :past + new, :], self._v[..., :past + new, :]
        return self.k, self.v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reorders hypotheses)."""
        if self._k is not None:
            n = len(self)
            self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)
            self.k, self.v = self._k[..., :n, :], self._v[..., :n, :]


class _Heads(nn.Module):
    """What self- and cross-attention share: head bookkeeping and the output projection."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads  # default: one key/value head per query head
        self.head_dim = head_dim or d_model // n_heads
        self.dropout = dropout
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.recorded: list[torch.Tensor] | None = None  # set by `record_attention`

    def split(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, head_dim)

    def attend(self, q, k, v, mask, causal) -> torch.Tensor:
        want = self.recorded is not None
        p = self.dropout if self.training else 0.0
        out, weights = attention(q, k, v, mask, causal, dropout_p=p, return_weights=want)
        if want:
            self.recorded.append(weights.detach())
        B, _, T, _ = out.shape
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # concat heads
        return self.out(out)  # (B, T, d_model)


class SelfAttention(_Heads):
    """Multi-head self-attention: one fused projection makes Q, K and V from the same tokens."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = True, dropout: float = 0.0):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, bias, dropout)
        rows = (n_heads + 2 * self.n_kv_heads) * self.head_dim  # [q; k; v]
        self.qkv = nn.Linear(d_model, rows, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split((H * D, Hkv * D, Hkv * D), dim=-1)
        q, k, v = self.split(q, H), self.split(k, Hkv), self.split(v, Hkv)  # (B, heads, T, D)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, Hkv, T_past + T, D)
        return self.attend(q, k, v, mask, causal)


class CrossAttention(_Heads):
    """Queries from the decoder; keys and values from the encoder output ("memory")."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = True, dropout: float = 0.0):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, bias, dropout)
        self.q = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.kv = nn.Linear(d_model, 2 * self.n_kv_heads * self.head_dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        q = self.split(self.q(x), self.n_heads)
        if cache is not None and len(cache):  # the source does not change while decoding
            k, v = cache.k, cache.v
        else:
            k, v = self.kv(memory).chunk(2, dim=-1)
            k, v = self.split(k, self.n_kv_heads), self.split(v, self.n_kv_heads)
            if cache is not None:
                cache.append(k, v)
        return self.attend(q, k, v, memory_mask, causal=False)


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Inside this block, every attention layer of `model` keeps its weights.

        with record_attention(model) as maps:
            model(tokens)
        maps["decoder.layers.0.self_attn"][0]   # (B, n_heads, T, T)

    Only the layers switch to the explicit path while recording; nothing else changes. Any
    module with a `recorded` attribute takes part: the additive attention of the recurrent
    baselines (qkv.baselines) records its (B, 1, T, S) weights the same way.
    """
    layers: dict[str, Any] = {name: m for name, m in model.named_modules()
                              if isinstance(m, _Heads) or hasattr(m, "recorded")}
    maps: dict[str, list[torch.Tensor]] = {}
    for name, m in layers.items():
        m.recorded = maps.setdefault(name, [])
    try:
        yield maps
    finally:
        for m in layers.values():
            m.recorded = None
