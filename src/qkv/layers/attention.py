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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
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
    k, v, mask, causal = _expand(q, k, v, mask, causal, explicit=return_weights)
    if not return_weights:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale
        )
        return out, None

    weights = _explicit(q, k, mask, scale)["weights"]
    dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights  # (B, H, Tq, D)


def attention_stages(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None, causal: bool = False,
                     scale: float | None = None) -> dict[str, torch.Tensor]:
    """Every intermediate of the explicit path, for explainers (qkv.explain), each (B, H, Tq, *):

    scores (q k^T), scaled (times scale), masked (-inf where a key is hidden), weights (the
    softmax; each row sums to 1) and output (weights v, (B, H, Tq, D)). Arguments as `attention`.
    """
    k, v, mask, _ = _expand(q, k, v, mask, causal, explicit=True)
    stages = _explicit(q, k, mask, scale)
    stages["output"] = stages["weights"] @ v  # (B, H, Tq, D)
    return stages


def _expand(q, k, v, mask, causal, explicit: bool):
    """GQA's shared key/value heads repeated per query head; the causal rule made a mask
    where the fused kernel's is_causal cannot express it (or the explicit path needs it)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if k.shape[1] != q.shape[1]:  # GQA: each key/value head serves a group of query heads
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, D)
        v = v.repeat_interleave(group, dim=1)
    if causal and (mask is not None or Tq != Tk or explicit):
        if Tq > 1:  # one new query sees everything in the cache: no mask needed
            allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
            mask = allowed if mask is None else mask & allowed
        causal = False
    return k, v, mask, causal


def _explicit(q, k, mask, scale) -> dict[str, torch.Tensor]:
    """softmax(q k^T * scale), step by step; every step is kept (see attention_stages)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)).float()  # (B, H, Tq, Tk)
    scaled = scores * scale
    masked = scaled if mask is None else scaled.masked_fill(~mask, float("-inf"))
    weights = masked.softmax(dim=-1).to(q.dtype)  # each row sums to 1
    return {"scores": scores, "scaled": scaled, "masked": masked, "weights": weights}


class KVCache:
    """Keys and values of the positions already seen by one attention layer.

    During generation each new token only needs its own query; the keys and values of earlier
    tokens never change, so they are kept here instead of being recomputed at every step.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity  # positions the first buffer holds; None: twice the first input
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
        full it is reallocated with twice the room, so copies stay rare; a cache made with the
        `capacity` the whole generation needs is never reallocated (a reallocation copies the
        past into fresh memory: at batch 8 of GPT-2 124M, about 50 ms, two decoding steps).
        """
        past, new = len(self), k.shape[-2]
        buffer_k, buffer_v = self._k, self._v
        if buffer_k is None or buffer_v is None or past + new > buffer_k.shape[-2]:
            first = buffer_k is None and self.capacity is not None
            capacity = max(self.capacity or 0, new) if first else max(64, 2 * (past + new))
            buffer_k = k.new_empty(*k.shape[:-2], capacity, k.shape[-1])  # (B, Hkv, cap, D)
            buffer_v = v.new_empty(*v.shape[:-2], capacity, v.shape[-1])
            if self.k is not None and self.v is not None:
                buffer_k[..., :past, :] = self.k
                buffer_v[..., :past, :] = self.v
            self._k, self._v = buffer_k, buffer_v
        buffer_k[..., past:past + new, :] = k
        buffer_v[..., past:past + new, :] = v
        keys, values = buffer_k[..., :past + new, :], buffer_v[..., :past + new, :]
        self.k, self.v = keys, values
        return keys, values  # (B, Hkv, past + new, D)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reorders hypotheses), in place: only the
        positions filled so far are copied, not the buffer's spare room."""
        if self.k is None or self.v is None:
            return
        kept_k, kept_v = self.k.index_select(0, index), self.v.index_select(0, index)
        if len(index) == self.k.shape[0]:
            self.k[:], self.v[:] = kept_k, kept_v
        else:  # a different number of rows: new buffers, without spare room
            self._k, self._v = self.k, self.v = kept_k, kept_v


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
        self.recorded_inputs: list[AttentionInputs] | None = None  # and with inputs=True

    def split(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, head_dim)

    def heads_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """`attention()` with this layer's dropout (when training), recording its weights when
        asked (`record_attention`): (B, H, Tq, D)."""
        recorded = self.recorded
        p = self.dropout if self.training else 0.0
        out, weights = attention(q, k, v, mask, causal, dropout_p=p,
                                 return_weights=recorded is not None)
        if recorded is not None and weights is not None:
            recorded.append(weights.detach())
            if self.recorded_inputs is not None:  # record_attention(inputs=True): Q, K, V too
                self.recorded_inputs.append(AttentionInputs(q.detach(), k.detach(), v.detach(),
                                                            mask, causal))
        return out

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """Concatenate the heads (B, H, T, D) and mix them: (B, T, d_model)."""
        B, _, T, _ = out.shape
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * D)
        return self.out(out)  # (B, T, d_model)

    def attend(self, q, k, v, mask, causal) -> torch.Tensor:
        return self.merge(self.heads_attention(q, k, v, mask, causal))  # (B, T, d_model)


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
        cache: KVCache | list[KVCache] | None = None,
    ) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model).

        cache: one KVCache for the whole batch, or a list with one per row (rows that continue
        sequences of different lengths, without padding; see `attend_rows`).
        """
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split((H * D, Hkv * D, Hkv * D), dim=-1)
        q, k, v = self.split(q, H), self.split(k, Hkv), self.split(v, Hkv)  # (B, heads, T, D)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if isinstance(cache, list):
            return self.attend_rows(q, k, v, cache, causal)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, Hkv, T_past + T, D)
        return self.attend(q, k, v, mask, causal)

    def attend_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    caches: list[KVCache], causal: bool) -> torch.Tensor:
        """Each row r < len(caches) against its own cache (its own length: no padding, no
        mask); the rows after those are filler and attend to nothing (zeros). The projections
        around it run on all B rows at once. q: (B, H, T, D); k, v: (B, Hkv, T, D)."""
        out = torch.zeros_like(q)  # (B, H, T, D)
        for r, cache in enumerate(caches):
            keys, values = cache.append(k[r:r + 1], v[r:r + 1])  # (1, Hkv, T_past_r + T, D)
            out[r:r + 1] = self.heads_attention(q[r:r + 1], keys, values, None, causal)
        return self.merge(out)  # (B, T, d_model)


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
        if cache is not None and cache.k is not None and cache.v is not None:
            k, v = cache.k, cache.v  # the source does not change while decoding
        else:
            k, v = self.kv(memory).chunk(2, dim=-1)
            k, v = self.split(k, self.n_kv_heads), self.split(v, self.n_kv_heads)
            if cache is not None:
                cache.append(k, v)
        return self.attend(q, k, v, memory_mask, causal=False)


class AttentionInputs(NamedTuple):
    """What one call of an attention layer received (recorded with inputs=True): enough to
    recompute every stage with `attention_stages(*inputs)`. q (B, H, Tq, D); k, v
    (B, Hkv, Tk, D), after RoPE and with the cached past; mask as `attention` takes it."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    causal: bool


@contextlib.contextmanager
def record_attention(model: nn.Module, inputs: bool = False) -> Iterator[dict[str, list]]:
    """Inside this block, every attention layer of `model` keeps its weights.

        with record_attention(model) as maps:
            model(tokens)
        maps["decoder.layers.0.self_attn"][0]   # (B, n_heads, T, T)

    Only the layers switch to the explicit path while recording; nothing else changes. With
    inputs=True each layer also keeps its queries, keys, values and mask, one `AttentionInputs`
    per call, under maps[name + ":inputs"] (qkv.explain recomputes every stage from them). Any
    module with a `recorded` attribute takes part: the additive attention of the recurrent
    baselines (qkv.baselines) records its (B, 1, T, S) weights the same way.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"record_attention needs a model (torch.nn.Module), got "
                         f"{type(model).__name__}")
    layers: dict[str, Any] = {name: m for name, m in model.named_modules()
                              if isinstance(m, _Heads) or hasattr(m, "recorded")}
    maps: dict[str, list] = {}
    for name, m in layers.items():
        m.recorded = maps.setdefault(name, [])
        if inputs:
            m.recorded_inputs = maps.setdefault(name + ":inputs", [])
    try:
        yield maps
    finally:
        for m in layers.values():
            m.recorded = None
            m.recorded_inputs = None
