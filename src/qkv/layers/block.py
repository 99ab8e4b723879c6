"""The repeated unit of a Transformer: attention, then feed-forward, each wrapped in a residual
connection and a normalisation ("add & norm").

Post-LN, as in the paper and BERT:   x = norm(x + sublayer(x))
Pre-LN, as in GPT-2 and Llama:       x = x + sublayer(norm(x))
Pre-LN trains more stably in deep stacks without a learning-rate warm-up (Xiong et al. 2020).

EncoderBlock:  self-attention (every token sees every token)        -> feed-forward
DecoderBlock:  causal self-attention (no peeking at later tokens)
               -> cross-attention to the encoder (encoder-decoder models only) -> feed-forward
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import ModelConfig
from .attention import CrossAttention, KVCache, SelfAttention
from .feedforward import make_feedforward
from .norm import make_norm


class _Residual(nn.Module):
    """Shared by both blocks: one "add & norm" around a sublayer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.drop = nn.Dropout(cfg.dropout)

    def _norm(self, cfg: ModelConfig) -> nn.Module:
        return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, bias=cfg.bias)

    def residual(self, x: torch.Tensor, norm: nn.Module,
                 sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre_norm:
            return x + self.drop(sublayer(norm(x)))
        return norm(x + self.drop(sublayer(x)))


class EncoderBlock(_Residual):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.bias,
                                  cfg.attention_dropout)
        self.attn_norm = self._norm(cfg)
        self.ffn = make_feedforward(cfg.d_model, cfg.ff_dim, cfg.activation, cfg.bias)
        self.ffn_norm = self._norm(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.residual(x, self.attn_norm, lambda h: self.attn(h, mask, rope=rope))
        return self.residual(x, self.ffn_norm, self.ffn)  # (B, T, d_model)


class DecoderBlock(_Residual):
    def __init__(self, cfg: ModelConfig, cross_attention: bool = False):
        super().__init__(cfg)
        self.self_attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head,
                                       cfg.bias, cfg.attention_dropout)
        self.self_attn_norm = self._norm(cfg)
        self.cross_attn = self.cross_attn_norm = None
        if cross_attention:
            self.cross_attn = CrossAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head,
                                             cfg.bias, cfg.attention_dropout)
            self.cross_attn_norm = self._norm(cfg)
        self.ffn = make_feedforward(cfg.d_model, cfg.ff_dim, cfg.activation, cfg.bias)
        self.ffn_norm = self._norm(cfg)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: tuple[KVCache, KVCache] | None = None,
    ) -> torch.Tensor:
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x = self.residual(
            x, self.self_attn_norm,
            lambda h: self.self_attn(h, mask, causal=True, rope=rope, cache=self_cache),
        )
        if self.cross_attn is not None:
            x = self.residual(
                x, self.cross_attn_norm,
                lambda h: self.cross_attn(h, memory, memory_mask, cache=cross_cache),
            )
        return self.residual(x, self.ffn_norm, self.ffn)  # (B, T, d_model)
