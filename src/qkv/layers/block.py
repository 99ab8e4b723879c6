"""The repeated unit of a Transformer: attention, then feed-forward, each wrapped in a residual
connection and a normalisation ("add & norm").

Post-LN, as in the paper and BERT:   x = norm(x + sublayer(x))
Pre-LN, as in GPT-2 and Llama:       x = x + sublayer(norm(x))
Pre-LN trains more stably in deep stacks without a learning-rate warm-up (Xiong et al. 2020).

EncoderBlock:  self-attention (every token sees every token)        -> feed-forward
DecoderBlock:  causal self-attention (no peeking at later tokens)
               -> cross-attention to the encoder (encoder-decoder models only) -> feed-forward

A block receives its sublayers ready-made (the stack in `qkv.model` builds them from the config):
it only wires them together, so the same block serves every attention, norm and feed-forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import CrossAttention, KVCache, SelfAttention
from .dropout import Dropout


class _Residual(nn.Module):
    """Shared by both blocks: one "add & norm" around a sublayer."""

    def __init__(self, pre_norm: bool, dropout: float):
        super().__init__()
        self.pre_norm = pre_norm
        self.drop = Dropout(dropout)

    def residual(self, x: torch.Tensor, norm: nn.Module,
                 sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre_norm:
            return x + self.drop(sublayer(norm(x)))
        return norm(x + self.drop(sublayer(x)))


class EncoderBlock(_Residual):
    """x -> add & norm(self-attention) -> add & norm(feed-forward)."""

    def __init__(self, attn: SelfAttention, attn_norm: nn.Module, ffn: nn.Module,
                 ffn_norm: nn.Module, pre_norm: bool = True, dropout: float = 0.0):
        super().__init__(pre_norm, dropout)
        self.attn, self.attn_norm = attn, attn_norm
        self.ffn, self.ffn_norm = ffn, ffn_norm

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.residual(x, self.attn_norm, lambda h: self.attn(h, mask, rope=rope))
        return self.residual(x, self.ffn_norm, self.ffn)  # (B, T, d_model)


class DecoderBlock(_Residual):
    """x -> add & norm(causal self-attention) [-> add & norm(cross-attention)]
    -> add & norm(feed-forward)."""

    def __init__(self, self_attn: SelfAttention, self_attn_norm: nn.Module, ffn: nn.Module,
                 ffn_norm: nn.Module, cross_attn: CrossAttention | None = None,
                 cross_attn_norm: nn.Module | None = None, pre_norm: bool = True,
                 dropout: float = 0.0):
        super().__init__(pre_norm, dropout)
        self.self_attn, self.self_attn_norm = self_attn, self_attn_norm
        self.cross_attn, self.cross_attn_norm = cross_attn, cross_attn_norm
        self.ffn, self.ffn_norm = ffn, ffn_norm

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: tuple[KVCache | list[KVCache], KVCache | None] | None = None,
    ) -> torch.Tensor:
        """cache: this block's (self-attention, cross-attention) caches; the self-attention's
        may be a list of one cache per row (see `SelfAttention.attend_rows`)."""
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x = self.residual(
            x, self.self_attn_norm,
            lambda h: self.self_attn(h, mask, causal=True, rope=rope, cache=self_cache),
        )
        if self.cross_attn is not None and self.cross_attn_norm is not None:
            cross_attn = self.cross_attn
            x = self.residual(
                x, self.cross_attn_norm,
                lambda h: cross_attn(h, memory, memory_mask, cache=cross_cache),
            )
        return self.residual(x, self.ffn_norm, self.ffn)  # (B, T, d_model)


class DecoderCache:
    """The decoder's KV caches: one (self-attention, cross-attention) pair per block."""

    def __init__(self, n_layers: int, capacity: int | None = None):
        """capacity: the positions the self-attention caches will hold (the prompt and every
        new token), when known: their buffers are made that size once. None: they grow."""
        self.layers = [(KVCache(capacity), KVCache()) for _ in range(n_layers)]

    def __len__(self) -> int:  # how many positions are cached
        return len(self.layers[0][0]) if self.layers else 0

    @staticmethod
    def per_row(caches: list[DecoderCache], n_layers: int) -> list[tuple[list[KVCache], None]]:
        """Block by block, the self-attention caches of `caches` (one per batch row): what the
        blocks read when each row continues its own sequence. Decoder-only (no cross-attention)."""
        return [([cache.layers[i][0] for cache in caches], None) for i in range(n_layers)]

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> None:
        """Keep batch rows `index` (beam search reorders hypotheses). With `same_sources`,
        every kept row continues a row of the same source sentence (beam search's beams of one
        source): the cross-attention keys and values, made from the source alone, are already
        right and are not copied."""
        for self_cache, cross_cache in self.layers:
            self_cache.reorder(index)
            if not same_sources:
                cross_cache.reorder(index)
