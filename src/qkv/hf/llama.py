"""Llama (Touvron et al. 2023) <-> qkv; also Llama-shaped models saved as model_type "llama".

Llama is a pre-LN decoder with RMSNorm, rotary positions (the "rotate half" arrangement, which
qkv's RotaryEmbedding uses too), a SwiGLU feed-forward, no biases by default, and often
grouped-query attention (fewer key/value heads than query heads). The q, k and v projections are
stacked into qkv's fused ``qkv`` weight; with GQA the k and v parts have fewer rows than q.

    Hugging Face (LlamaModel; LlamaForCausalLM adds "model.")   qkv (L = decoder.layers.{i})
    embed_tokens                                                token_embedding
    layers.{i}.input_layernorm                                  L.self_attn_norm
    layers.{i}.self_attn.{q,k,v}_proj  stacked                  L.self_attn.qkv
    layers.{i}.self_attn.o_proj                                 L.self_attn.out
    layers.{i}.post_attention_layernorm                         L.ffn_norm
    layers.{i}.mlp.{gate,up,down}_proj                          L.ffn.{gate,up,down}
    norm                                                        decoder.norm
    lm_head (only when untied)                                  lm_head
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .common import (
    Architecture,
    Rule,
    copy,
    family_is,
    first_mismatch,
    fused,
    get,
    layout_is,
    linear,
    norm,
    positions_are,
    token_id,
    unsupported,
    without,
)

MODEL_TYPE = "llama"
PREFIX = "model."

#: Llama's hidden_act names the activation of the gate; SiLU makes SwiGLU, tanh-GELU GeGLU.
GATES_FROM_HF = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu",
                 "gelu_new": "geglu", "gelu_fast": "geglu"}
GATES_TO_HF = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE's base from rope_parameters (transformers 5) or rope_theta (older configs)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise unsupported(MODEL_TYPE, f"rope parameters {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise unsupported(MODEL_TYPE, f"rope_scaling of type {kind!r} (qkv implements plain "
                          "RoPE only)")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise unsupported(MODEL_TYPE, f"partial_rotary_factor={partial} (rotating only part of "
                          "each head)")
    return float(params.get("rope_theta") or get(hf, "rope_theta", 10000.0))


def config_from_hf(hf: dict[str, Any], shapes: dict[str, list[int]]) -> ModelConfig:
    """A Llama config.json -> ModelConfig (raises UnsupportedModelError for what qkv lacks)."""
    act = get(hf, "hidden_act", "silu")
    if act not in GATES_FROM_HF:
        raise unsupported(MODEL_TYPE, f"hidden_act={act!r} in its gated feed-forward")
    attention_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    if attention_bias != mlp_bias:
        raise unsupported(MODEL_TYPE, f"attention_bias={attention_bias} with mlp_bias="
                          f"{mlp_bias} (qkv has one bias switch for both)")
    theta = _rope_theta(hf)
    d = int(get(hf, "hidden_size", 4096))
    heads = int(get(hf, "num_attention_heads", 32))
    kv = int(get(hf, "num_key_value_heads", heads))
    head_dim = int(get(hf, "head_dim", d // heads))
    vocab = int(get(hf, "vocab_size", 32000))
    return ModelConfig(
        family="decoder",
        vocab_size=vocab,
        d_model=d,
        n_layers=int(get(hf, "num_hidden_layers", 32)),
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=head_dim,
        d_ff=int(get(hf, "intermediate_size", 11008)),
        max_seq_len=int(get(hf, "max_position_embeddings", 2048)),
        position="rope",
        rope_theta=theta,
        norm="rmsnorm",
        norm_eps=float(get(hf, "rms_norm_eps", 1e-6)),
        norm_placement="pre",
        activation=GATES_FROM_HF[act],
        dropout=0.0,
        attention_dropout=float(get(hf, "attention_dropout", 0.0)),
        bias=attention_bias,
        tie_embeddings=bool(get(hf, "tie_word_embeddings", False)),
        pooling="last",
        pad_token_id=token_id(hf, "pad_token_id", vocab),
        bos_token_id=token_id(hf, "bos_token_id", vocab),
        eos_token_id=token_id(hf, "eos_token_id", vocab),
    )


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every qkv tensor of a Llama-shaped model and where it lives in a Llama checkpoint."""
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = [copy("token_embedding.weight", "embed_tokens.weight")]
    for i in range(cfg.n_decoder_layers):
        h, q = f"layers.{i}", f"decoder.layers.{i}"
        out += norm(f"{q}.self_attn_norm", f"{h}.input_layernorm", bias=False)
        out += fused(f"{q}.self_attn.qkv", [f"{h}.self_attn.{p}_proj" for p in "qkv"],
                     [q_rows, kv_rows, kv_rows], bias=cfg.bias)
        out += linear(f"{q}.self_attn.out", f"{h}.self_attn.o_proj", cfg.bias)
        out += norm(f"{q}.ffn_norm", f"{h}.post_attention_layernorm", bias=False)
        for part in ("gate", "up", "down"):
            out += linear(f"{q}.ffn.{part}", f"{h}.mlp.{part}_proj", cfg.bias)
    out += norm("decoder.norm", "norm", bias=False)
    if not cfg.tie_embeddings:
        out.append(copy("lm_head.weight", "lm_head.weight", head=True))
    return out


def ignored(cfg: ModelConfig) -> list[str]:
    """Names in a Llama checkpoint that hold nothing to load (regular expressions)."""
    out = [r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"]  # a buffer, recomputed
    if cfg.tie_embeddings:
        out.append(r"lm_head\.weight")
    return out


def mismatch(cfg: ModelConfig) -> str | None:
    """Why `cfg` cannot be written as Llama, or None when it can."""
    return first_mismatch("Llama", "rope positions", [
        family_is(cfg, "decoder"),
        *positions_are(cfg, "rope"),
        *layout_is(cfg, "rmsnorm", "pre"),
        (cfg.activation in GATES_TO_HF, f"activation {cfg.activation}", "swiglu or geglu"),
        *without(cfg, "scale_embeddings", "embedding_norm", "token_types", "lm_head_bias",
                 "encoder_heads"),
    ])


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Llama config.json (for LlamaForCausalLM)."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": GATES_TO_HF[cfg.activation],
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.attention_dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }


ARCHITECTURE = Architecture(MODEL_TYPE, PREFIX, config_from_hf, config_to_hf, rules, ignored,
                            mismatch)
