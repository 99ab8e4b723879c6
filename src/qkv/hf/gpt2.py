"""GPT-2 (Radford et al. 2019) <-> qkv.

GPT-2 is a pre-LN decoder with learned positions, LayerNorm, the tanh GELU and biases everywhere.
Its one oddity is ``Conv1D``: a linear layer whose weight is stored (in, out), the transpose of
``nn.Linear``. Its attention input projection ``c_attn`` is already fused, with output columns
[q | k | v], so after a transpose it is exactly qkv's ``qkv`` weight.

    Hugging Face (GPT2Model; GPT2LMHeadModel adds "transformer.")   qkv (L = decoder.layers.{i})
    wte                                                             token_embedding
    wpe                                                             decoder.positions
    h.{i}.ln_1                                                      L.self_attn_norm
    h.{i}.attn.c_attn  (d, 3d) transposed                           L.self_attn.qkv  (3d, d)
    h.{i}.attn.c_proj  transposed                                   L.self_attn.out
    h.{i}.ln_2                                                      L.ffn_norm
    h.{i}.mlp.c_fc / mlp.c_proj  transposed                         L.ffn.up / L.ffn.down
    ln_f                                                            decoder.norm
    lm_head (only when untied)                                      lm_head
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .common import (
    ACTIVATIONS_TO_HF,
    Architecture,
    Rule,
    activation_from_hf,
    copy,
    family_is,
    first_mismatch,
    get,
    layout_is,
    norm,
    plain_layers,
    positions_are,
    token_id,
    unsupported,
    without,
)

MODEL_TYPE = "gpt2"
PREFIX = "transformer."


def config_from_hf(hf: dict[str, Any], shapes: dict[str, list[int]]) -> ModelConfig:
    """A GPT-2 config.json -> ModelConfig (raises UnsupportedModelError for what qkv lacks)."""
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise unsupported(MODEL_TYPE, "scale_attn_by_inverse_layer_idx (attention scores scaled "
                          "down by layer depth)")
    if hf.get("reorder_and_upcast_attn"):
        raise unsupported(MODEL_TYPE, "reorder_and_upcast_attn (attention scores reordered "
                          "and upcast to fp32)")
    if hf.get("scale_attn_weights") is False:
        raise unsupported(MODEL_TYPE, "scale_attn_weights=false (attention without the "
                          "1/sqrt(d_head) scale)")
    if hf.get("add_cross_attention"):
        raise unsupported(MODEL_TYPE, "add_cross_attention (GPT-2 as the decoder of an "
                          "encoder-decoder)")
    d = int(get(hf, "n_embd", 768))
    vocab = int(get(hf, "vocab_size", 50257))
    return ModelConfig(
        family="decoder",
        vocab_size=vocab,
        d_model=d,
        n_layers=int(get(hf, "n_layer", 12)),
        n_heads=int(get(hf, "n_head", 12)),
        d_ff=int(get(hf, "n_inner", 4 * d)),
        max_seq_len=int(get(hf, "n_positions", 1024)),
        position="learned",
        norm="layernorm",
        norm_eps=float(get(hf, "layer_norm_epsilon", 1e-5)),
        norm_placement="pre",
        activation=activation_from_hf(get(hf, "activation_function", "gelu_new"), MODEL_TYPE),
        dropout=float(get(hf, "resid_pdrop", 0.0)),
        attention_dropout=float(get(hf, "attn_pdrop", 0.0)),
        bias=True,
        tie_embeddings=bool(get(hf, "tie_word_embeddings", True)),
        pooling="last",  # a causal model: only the last token has read the whole sequence
        pad_token_id=token_id(hf, "pad_token_id", vocab),
        bos_token_id=token_id(hf, "bos_token_id", vocab),
        eos_token_id=token_id(hf, "eos_token_id", vocab),
    )


def _conv1d(qkv: str, hf: str) -> list[Rule]:
    """A Conv1D layer: the weight is stored transposed, the bias as is."""
    return [Rule(f"{qkv}.weight", (f"{hf}.weight",), "transpose"),
            Rule(f"{qkv}.bias", (f"{hf}.bias",))]


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every qkv tensor of a GPT-2 shaped model and where it lives in a GPT-2 checkpoint."""
    out = [copy("token_embedding.weight", "wte.weight"),
           copy("decoder.positions.weight", "wpe.weight")]
    for i in range(cfg.n_decoder_layers):
        h, q = f"h.{i}", f"decoder.layers.{i}"
        out += norm(f"{q}.self_attn_norm", f"{h}.ln_1")
        out += _conv1d(f"{q}.self_attn.qkv", f"{h}.attn.c_attn")
        out += _conv1d(f"{q}.self_attn.out", f"{h}.attn.c_proj")
        out += norm(f"{q}.ffn_norm", f"{h}.ln_2")
        out += _conv1d(f"{q}.ffn.up", f"{h}.mlp.c_fc")
        out += _conv1d(f"{q}.ffn.down", f"{h}.mlp.c_proj")
    out += norm("decoder.norm", "ln_f")
    if not cfg.tie_embeddings:
        out.append(copy("lm_head.weight", "lm_head.weight", head=True))
    return out


def ignored(cfg: ModelConfig) -> list[str]:
    """Names in a GPT-2 checkpoint that hold nothing to load (regular expressions)."""
    # Old checkpoints store the causal mask as a buffer; a tied lm_head repeats wte.
    out = [r"h\.\d+\.attn\.(masked_)?bias"]
    if cfg.tie_embeddings:
        out.append(r"lm_head\.weight")
    return out


def mismatch(cfg: ModelConfig) -> str | None:
    """Why `cfg` cannot be written as GPT-2, or None when it can."""
    return first_mismatch("GPT-2", "a decoder", [
        family_is(cfg, "decoder"),
        *positions_are(cfg, "learned"),
        *layout_is(cfg, "layernorm", "pre"),
        *plain_layers(cfg),
        *without(cfg, "scale_embeddings", "embedding_norm", "token_types", "lm_head_bias",
                 "encoder_heads"),
    ])


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> GPT-2 config.json (for GPT2LMHeadModel)."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "n_positions": cfg.max_seq_len,
        "activation_function": ACTIVATIONS_TO_HF[cfg.activation],
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attention_dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }


ARCHITECTURE = Architecture(MODEL_TYPE, PREFIX, config_from_hf, config_to_hf, rules, ignored,
                            mismatch)
