"""Marian (Junczys-Dowmunt et al. 2018; the OPUS-MT translation models) <-> qkv.

Marian is the paper's encoder-decoder: post-LN blocks, fixed sinusoidal positions and token
vectors scaled by sqrt(d_model). Two details differ from the paper: the sinusoidal table puts all
sines first and all cosines after (qkv's ``sinusoidal_layout="halves"``), and the activation is
"swish" (= SiLU). One embedding matrix is shared by the encoder, the decoder and the output
layer, and the output layer adds ``final_logits_bias``.

    Hugging Face (MarianModel; MarianMTModel adds "model.")    qkv
    shared                                                     tokens
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

import torch

from ..config import ModelConfig
from .common import (
    ACTIVATIONS_TO_HF,
    Rule,
    activation_from_hf,
    copy,
    first_mismatch,
    fused,
    get,
    linear,
    norm,
    token_id,
    unsupported,
)

MODEL_TYPE = "marian"
PREFIX = "model."


def prepare(tensors: dict[str, torch.Tensor], hf: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Find the one token embedding of the encoder, the decoder and the output layer.

    transformers 4 always shares ``shared`` with ``encoder.embed_tokens`` and
    ``decoder.embed_tokens``; transformers 5 unties all of them when tie_word_embeddings is
    false, and then the stacks read their own copies. qkv has one token table, so the copies in
    use must be equal.
    """
    tensors = dict(tensors)
    copies = [tensors[k] for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
              if k in tensors]
    if len(copies) == 2 and not torch.equal(copies[0], copies[1]):
        raise unsupported(hf.get("model_type", MODEL_TYPE), "different token embeddings in the "
                          "encoder and the decoder (qkv shares one table)")
    untied = get(hf, "tie_word_embeddings", True) is False
    if copies and (untied or "shared.weight" not in tensors):
        tensors["shared.weight"] = copies[0]
    return tensors


def finish_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """On save: an untied model also gets the stacks' own embedding copies (transformers 5
    reads them instead of ``shared`` when tie_word_embeddings is false)."""
    if not cfg.tie_embeddings:
        for stack in ("encoder", "decoder"):
            tensors[f"{stack}.embed_tokens.weight"] = tensors["shared.weight"].clone()
    return tensors


def seq2seq_sizes(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The sizes BART-family configs give per stack, checked to be equal where qkv shares them."""
    for enc, dec, what in (("encoder_attention_heads", "decoder_attention_heads", "head counts"),
                           ("encoder_ffn_dim", "decoder_ffn_dim", "feed-forward widths")):
        if get(hf, enc) != get(hf, dec):
            raise unsupported(model_type, f"different encoder and decoder {what} ({enc}="
                              f"{get(hf, enc)}, {dec}={get(hf, dec)})")
    vocab = int(get(hf, "vocab_size", 58101))
    decoder_vocab = get(hf, "decoder_vocab_size", vocab)
    if decoder_vocab != vocab or hf.get("share_encoder_decoder_embeddings") is False:
        raise unsupported(model_type, "separate source and target vocabularies "
                          "(share_encoder_decoder_embeddings=false)")
    enc_layers = int(get(hf, "encoder_layers", 6))
    return dict(
        vocab_size=vocab,
        d_model=int(get(hf, "d_model", 512)),
        n_layers=enc_layers,
        n_encoder_layers=enc_layers,
        n_decoder_layers=int(get(hf, "decoder_layers", 6)),
        n_heads=int(get(hf, "encoder_attention_heads", 8)),
        d_ff=int(get(hf, "encoder_ffn_dim", 2048)),
        max_seq_len=int(get(hf, "max_position_embeddings", 512)),
        dropout=float(get(hf, "dropout", 0.0)),
        attention_dropout=float(get(hf, "attention_dropout", 0.0)),
        pad_token_id=token_id(hf, "pad_token_id", vocab),
        bos_token_id=token_id(hf, "bos_token_id", vocab),
        eos_token_id=token_id(hf, "eos_token_id", vocab),
        decoder_start_token_id=token_id(hf, "decoder_start_token_id", vocab),
    )


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


def seq2seq_rules(cfg: ModelConfig, learned_positions: bool = False) -> list[Rule]:
    """The tensors of a BART-family encoder-decoder (Marian, BART), stack by stack."""
    d = cfg.n_heads * cfg.head_dim
    out = [copy("tokens.weight", "shared.weight")]
    for stack, n in (("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers)):
        if learned_positions:  # BART: learned tables and a LayerNorm after the embeddings
            out.append(copy(f"{stack}.positions.weight", f"{stack}.embed_positions.weight"))
            out += norm(f"{stack}.embed_norm", f"{stack}.layernorm_embedding")
        for i in range(n):
            h, q = f"{stack}.layers.{i}", f"{stack}.layers.{i}"
            attn = "attn" if stack == "encoder" else "self_attn"
            out += fused(f"{q}.{attn}.qkv", [f"{h}.self_attn.{p}_proj" for p in "qkv"],
                         [d, d, d])
            out += linear(f"{q}.{attn}.out", f"{h}.self_attn.out_proj")
            out += norm(f"{q}.{attn}_norm", f"{h}.self_attn_layer_norm")
            if stack == "decoder":
                out += linear(f"{q}.cross_attn.q", f"{h}.encoder_attn.q_proj")
                out += fused(f"{q}.cross_attn.kv", [f"{h}.encoder_attn.{p}_proj" for p in "kv"],
                             [d, d])
                out += linear(f"{q}.cross_attn.out", f"{h}.encoder_attn.out_proj")
                out += norm(f"{q}.cross_attn_norm", f"{h}.encoder_attn_layer_norm")
            out += linear(f"{q}.ffn.up", f"{h}.fc1")
            out += linear(f"{q}.ffn.down", f"{h}.fc2")
            out += norm(f"{q}.ffn_norm", f"{h}.final_layer_norm")
    if cfg.lm_head_bias:
        out.append(Rule("lm_head.bias", ("final_logits_bias",), "row", head=True))
    if not cfg.tie_embeddings:
        out.append(copy("lm_head.weight", "lm_head.weight", head=True))
    return out


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every qkv tensor of a Marian-shaped model and where it lives in a Marian checkpoint."""
    return seq2seq_rules(cfg)


def seq2seq_ignored(cfg: ModelConfig) -> list[str]:
    # Copies of the shared embedding (and of the output layer when tied).
    out = [r"(encoder|decoder)\.embed_tokens\.weight"]
    if cfg.tie_embeddings:
        out.append(r"lm_head\.weight")
    return out


def ignored(cfg: ModelConfig) -> list[str]:
    """Names in a Marian checkpoint that hold nothing to load (regular expressions)."""
    return [*seq2seq_ignored(cfg), r"(encoder|decoder)\.embed_positions\.weight"]


def seq2seq_checks(cfg: ModelConfig) -> list[tuple[bool, str, str]]:
    """What Marian and BART both need."""
    return [
        (cfg.family == "encoder-decoder", f"family {cfg.family}", "an encoder-decoder"),
        (cfg.norm == "layernorm", cfg.norm, "layernorm"),
        (cfg.norm_eps == 1e-5, f"norm_eps={cfg.norm_eps}", "norm_eps=1e-5"),
        (cfg.norm_placement == "post", "pre-LN", "post-LN"),
        (not cfg.final_norm, "a final norm", "no final norm"),
        (cfg.activation in ACTIVATIONS_TO_HF, f"activation {cfg.activation}",
         "a non-gated activation"),
        (cfg.bias, "bias=False", "biases"),
        (cfg.n_kv_heads == cfg.n_heads, "grouped-query attention", "as many kv heads as heads"),
        (cfg.n_heads * cfg.head_dim == cfg.d_model, f"head_dim={cfg.head_dim}",
         "head_dim = d_model / n_heads"),
        (cfg.type_vocab_size == 0, "token types", "no token types"),
        (not (cfg.mlm_transform or cfg.pooler or cfg.labels), "an encoder head",
         "only the LM head"),
    ]


def mismatch(cfg: ModelConfig) -> str | None:
    """Why `cfg` cannot be written as Marian, or None when it can."""
    return first_mismatch("Marian", "an encoder-decoder", [
        (cfg.position == "sinusoidal", f"{cfg.position} positions", "sinusoidal positions"),
        (cfg.sinusoidal_layout == "halves", "interleaved sinusoids",
         "sinusoidal_layout='halves'"),
        (not cfg.embedding_norm, "embedding_norm", "no embedding norm"),
        *seq2seq_checks(cfg),
    ])


def seq2seq_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields Marian and BART share."""
    return {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.n_encoder_layers,
        "decoder_layers": cfg.n_decoder_layers,
        "encoder_attention_heads": cfg.n_heads,
        "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.d_ff,
        "decoder_ffn_dim": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": 0.0,
        "scale_embedding": cfg.scale_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "is_encoder_decoder": True,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "use_cache": True,
    }


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
