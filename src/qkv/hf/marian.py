"""Marian (Junczys-Dowmunt et al. 2018; the OPUS-MT translation models) <-> qkv.

Marian is the paper's encoder-decoder: post-LN blocks, fixed sinusoidal positions and token
vectors scaled by sqrt(d_model). Two details differ from the paper: the sinusoidal table puts all
sines first and all cosines after (qkv's ``sinusoidal_layout="halves"``), and the activation is
"swish" (= SiLU). One embedding matrix is shared by the encoder, the decoder and the output
layer, and the output layer adds ``final_logits_bias``.

    Hugging Face (MarianModel; MarianMTModel adds "model.")    qkv
    shared                                                     token_embedding
    encoder.layers.{i}.                                        encoder.layers.{i}.
        self_attn.{q,k,v}_proj  stacked                            attn.qkv
        self_attn.out_proj, self_attn_layer_norm                   attn.out, attn_norm
        fc1, fc2, final_layer_norm                                 ffn.up, ffn.down, ffn_norm
    decoder.layers.{i}.                                        decoder.layers.{i}.
        self_attn.{q,k,v}_proj  stacked                            self_attn.qkv
        self_attn.out_proj, self_attn_layer_norm                   self_attn.out, self_attn_norm
        encoder_attn.q_proj                                        cross_attn.q
        encoder_attn.{k,v}_proj  stacked                           cross_attn.kv
        encoder_attn.out_proj, encoder_attn_layer_norm             cross_attn.out, cross_attn_norm
        fc1, fc2, final_layer_norm                                 ffn.up, ffn.down, ffn_norm
    final_logits_bias (1, vocab)                               lm_head.bias (vocab,)
    lm_head (only when untied)                                 lm_head

The sinusoidal tables (embed_positions) are a formula; qkv recomputes them instead of loading.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .common import (
    ACTIVATIONS_TO_HF,
    Architecture,
    Rule,
    activation_from_hf,
    first_mismatch,
    get,
    positions_are,
    seq2seq_checks,
    seq2seq_config_to_hf,
    seq2seq_finish_hf,
    seq2seq_ignored,
    seq2seq_prepare,
    seq2seq_rules,
    seq2seq_sizes,
    without,
)

MODEL_TYPE = "marian"
PREFIX = "model."


def config_from_hf(hf: dict[str, Any], shapes: dict[str, list[int]]) -> ModelConfig:
    """A Marian config.json -> ModelConfig (raises UnsupportedModelError for what qkv lacks)."""
    return ModelConfig(
        family="encoder-decoder",
        **seq2seq_sizes(hf, MODEL_TYPE),
        position="sinusoidal",
        sinusoidal_layout="halves",
        norm="layernorm",
        norm_eps=1e-5,  # nn.LayerNorm's default, which Marian uses
        norm_placement="post",
        activation=activation_from_hf(get(hf, "activation_function", "swish"), MODEL_TYPE),
        bias=True,
        tie_embeddings=bool(get(hf, "tie_word_embeddings", True)),
        scale_embeddings=bool(get(hf, "scale_embedding", False)),
        lm_head_bias="final_logits_bias" in shapes,
    )


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every qkv tensor of a Marian-shaped model and where it lives in a Marian checkpoint."""
    return seq2seq_rules(cfg)


def ignored(cfg: ModelConfig) -> list[str]:
    """Names in a Marian checkpoint that hold nothing to load (regular expressions)."""
    return [*seq2seq_ignored(cfg), r"(encoder|decoder)\.embed_positions\.weight"]


def mismatch(cfg: ModelConfig) -> str | None:
    """Why `cfg` cannot be written as Marian, or None when it can."""
    return first_mismatch("Marian", "an encoder-decoder", [
        *positions_are(cfg, "sinusoidal"),
        (cfg.sinusoidal_layout == "halves", "interleaved sinusoids",
         "sinusoidal_layout='halves'"),
        *without(cfg, "embedding_norm"),
        *seq2seq_checks(cfg),
    ])


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Marian config.json (for MarianMTModel)."""
    act = "swish" if cfg.activation == "silu" else ACTIVATIONS_TO_HF[cfg.activation]
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["MarianMTModel"],
        **seq2seq_config_to_hf(cfg),
        "decoder_vocab_size": cfg.vocab_size,
        "share_encoder_decoder_embeddings": True,
        "activation_function": act,
    }


ARCHITECTURE = Architecture(MODEL_TYPE, PREFIX, config_from_hf, config_to_hf, rules, ignored,
                            mismatch, prepare=seq2seq_prepare, finish_hf=seq2seq_finish_hf)
