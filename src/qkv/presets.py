"""Named model sizes people know. `qkv.presets.get("gpt2-124m")` returns a fresh ModelConfig.

Sizes follow the published models; the vocabulary of a preset is a placeholder that training
replaces with the tokenizer's size.
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig
from .errors import ConfigError

_PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's "baby" Shakespeare shape: 4 layers, 4 heads, d=128, context 64, char-level.
    "gpt-char-tiny": dict(family="decoder", vocab_size=65, d_model=128, n_layers=4, n_heads=4,
                          max_seq_len=64, position="learned", activation="gelu_tanh",
                          bias=False),
    # The default of `qkv train`: a character-level GPT that learns Shakespeare on a laptop CPU.
    "gpt-char-small": dict(family="decoder", vocab_size=65, d_model=256, n_layers=4, n_heads=4,
                           max_seq_len=128, position="rope", norm="rmsnorm",
                           activation="swiglu", bias=False, tie_embeddings=False),
    # GPT-2 small (Radford et al. 2019).
    "gpt2-124m": dict(family="decoder", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                      max_seq_len=1024, position="learned", norm="layernorm", norm_eps=1e-5,
                      activation="gelu_tanh", dropout=0.0),
    # BERT base (Devlin et al. 2019): post-LN, segments, MLM head, pooler.
    "bert-base": dict(family="encoder", vocab_size=30522, d_model=768, n_layers=12, n_heads=12,
                      d_ff=3072, max_seq_len=512, position="learned", norm_placement="post",
                      norm_eps=1e-12, activation="gelu", dropout=0.1, type_vocab_size=2,
                      embedding_norm=True, mlm_transform=True, pooler=True, pooling="cls",
                      lm_head_bias=True),
    # The default of `qkv train --family encoder`: a small post-LN BERT for masked-LM pre-training.
    "bert-tiny": dict(family="encoder", vocab_size=8000, d_model=256, n_layers=4, n_heads=4,
                      max_seq_len=128, position="learned", norm_placement="post",
                      activation="gelu", type_vocab_size=2, embedding_norm=True,
                      mlm_transform=True, lm_head_bias=True, pooling="mean"),
    # all-MiniLM-L6-v2: a 6-layer BERT used for sentence embeddings (mean pooling, normalised).
    "minilm-l6": dict(family="encoder", vocab_size=30522, d_model=384, n_layers=6, n_heads=12,
                      d_ff=1536, max_seq_len=512, position="learned", norm_placement="post",
                      norm_eps=1e-12, activation="gelu", type_vocab_size=2, embedding_norm=True,
                      pooling="mean", normalize_embeddings=True),
    # The base model of "Attention Is All You Need" (Vaswani et al. 2017, table 3).
    "transformer-base": dict(family="encoder-decoder", vocab_size=37000, d_model=512, n_layers=6,
                             n_heads=8, d_ff=2048, max_seq_len=512, position="sinusoidal",
                             norm_placement="post", activation="relu", dropout=0.1,
                             scale_embeddings=True),
    # The default of `qkv train --family encoder-decoder`: a small translation Transformer for
    # Multi30k-sized data on a CPU (3 + 3 layers, d=256; pre-LN, which trains without a long
    # warm-up). Source, target and output embeddings are one matrix, as in the paper.
    "transformer-mt-small": dict(family="encoder-decoder", vocab_size=8000, d_model=256,
                                 n_layers=3, n_heads=4, d_ff=1024, max_seq_len=128,
                                 position="sinusoidal", norm_placement="pre", activation="relu",
                                 dropout=0.1, scale_embeddings=True, tie_embeddings=True),
    # Transformer-Tiny of Wu et al. 2021: 4 + 4 layers, d=128.
    "transformer-mt-tiny": dict(family="encoder-decoder", vocab_size=8000, d_model=128,
                                n_layers=4, n_heads=4, d_ff=512, max_seq_len=128,
                                position="sinusoidal", norm_placement="pre", activation="relu",
                                dropout=0.1, scale_embeddings=True, tie_embeddings=True),
    # A small Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied output layer.
    "llama-tiny": dict(family="decoder", vocab_size=32000, d_model=256, n_layers=4, n_heads=8,
                       n_kv_heads=4, max_seq_len=512, position="rope", norm="rmsnorm",
                       norm_eps=1e-5, activation="swiglu", bias=False, tie_embeddings=False),
}


def names() -> list[str]:
    return sorted(_PRESETS)


def get(name: str, **overrides: Any) -> ModelConfig:
    """The preset's config, with any field overridden: get("gpt2-124m", n_layers=6)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(names())}")
    return ModelConfig(**{**_PRESETS[name], **overrides})
