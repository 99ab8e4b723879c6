"""BERT (Devlin et al. 2019) <-> qkv; also MiniLM and other BERT-shaped sentence encoders.

BERT is a post-LN encoder: word + position + token-type embeddings, a LayerNorm over their sum,
then blocks of "add & norm" around self-attention and a GELU feed-forward. Its heads:

- the pooler (BertModel, BertForSequenceClassification): dense + tanh on the [CLS] vector;
- the masked-LM head (BertForMaskedLM): dense + activation + LayerNorm ("transform"), then the
  output layer, tied to the word embeddings, with its own bias;
- the classifier (BertForSequenceClassification): a linear layer on the pooled vector; its
  class names come from id2label.

Hugging Face keeps query, key and value as three linear layers; qkv stacks them into one.

    Hugging Face (BertModel, or "bert." + ... with a head)        qkv
    embeddings.word_embeddings                                    token_embedding
    embeddings.position_embeddings                                encoder.positions
    embeddings.token_type_embeddings                              encoder.types
    embeddings.LayerNorm                                          encoder.embed_norm
    encoder.layer.{i}.attention.self.{query,key,value}  stacked   encoder.layers.{i}.attn.qkv
    encoder.layer.{i}.attention.output.dense                      ...attn.out
    encoder.layer.{i}.attention.output.LayerNorm                  ...attn_norm
    encoder.layer.{i}.intermediate.dense                          ...ffn.up
    encoder.layer.{i}.output.dense                                ...ffn.down
    encoder.layer.{i}.output.LayerNorm                            ...ffn_norm
    pooler.dense                                                  pooler.dense
    cls.predictions.transform.{dense,LayerNorm}                   mlm_transform.{dense,norm}
    cls.predictions.bias                                          lm_head.bias
    cls.predictions.decoder.weight (only when untied)             lm_head.weight
    classifier                                                    classifier
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from .common import (
    ACTIVATIONS_TO_HF,
    Architecture,
    Rule,
    activation_from_hf,
    copy,
    family_is,
    first_mismatch,
    fused,
    get,
    labels_from_hf,
    layout_is,
    linear,
    norm,
    plain_layers,
    positions_are,
    token_id,
    unsupported,
    without,
)

MODEL_TYPE = "bert"
PREFIX = "bert."
BASE_ARCHITECTURE = "BertModel"  # written without the "bert." prefix, like the MiniLM checkpoint

MLM = "cls.predictions.transform.dense.weight"


def prepare(tensors: dict[str, torch.Tensor], hf: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Accept other spellings: TensorFlow-era gamma/beta, and the MLM bias as decoder.bias.

    The output layer adds ``cls.predictions.decoder.bias``. transformers 4 made it the same
    tensor as ``cls.predictions.bias``; transformers 5 does so only when the output layer is
    tied, and an untied model saves both, of which decoder.bias is the one in use.
    """
    out = {}
    for k, v in tensors.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                      "LayerNorm.bias")
        out[k] = v
    if "cls.predictions.decoder.bias" in out:
        out["cls.predictions.bias"] = out.pop("cls.predictions.decoder.bias")
    return out


def finish_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """On save: an untied output layer also gets decoder.bias, which transformers 5 reads."""
    if not cfg.tie_embeddings and "cls.predictions.bias" in tensors:
        tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].clone()
    return tensors


def config_from_hf(hf: dict[str, Any], shapes: dict[str, list[int]]) -> ModelConfig:
    """A BERT config.json (+ which heads the weights hold) -> ModelConfig."""
    kind = get(hf, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise unsupported(MODEL_TYPE, f"position_embedding_type={kind!r} (relative position "
                          "scores; qkv's BERT has absolute learned positions)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise unsupported(MODEL_TYPE, "is_decoder/add_cross_attention (BERT as a causal decoder)")
    vocab = int(get(hf, "vocab_size", 30522))
    mlm = MLM in shapes
    n_labels = shapes["classifier.weight"][0] if "classifier.weight" in shapes else 0
    # Without an MLM head nothing reads the output layer, so it is tied: no extra parameters.
    tie = bool(get(hf, "tie_word_embeddings", True)) or not mlm
    return ModelConfig(
        family="encoder",
        vocab_size=vocab,
        d_model=int(get(hf, "hidden_size", 768)),
        n_layers=int(get(hf, "num_hidden_layers", 12)),
        n_heads=int(get(hf, "num_attention_heads", 12)),
        d_ff=int(get(hf, "intermediate_size", 3072)),
        max_seq_len=int(get(hf, "max_position_embeddings", 512)),
        position="learned",
        norm="layernorm",
        norm_eps=float(get(hf, "layer_norm_eps", 1e-12)),
        norm_placement="post",
        activation=activation_from_hf(get(hf, "hidden_act", "gelu"), MODEL_TYPE),
        dropout=float(get(hf, "hidden_dropout_prob", 0.0)),
        attention_dropout=float(get(hf, "attention_probs_dropout_prob", 0.0)),
        bias=True,
        tie_embeddings=tie,
        embedding_norm=True,
        type_vocab_size=int(get(hf, "type_vocab_size", 2)),
        mlm_transform=mlm,
        pooler="pooler.dense.weight" in shapes,
        pooling="cls",  # BERT's convention; a sentence-transformers folder overrides it
        labels=labels_from_hf(hf, n_labels),
        lm_head_bias="cls.predictions.bias" in shapes,
        pad_token_id=token_id(hf, "pad_token_id", vocab),
        bos_token_id=token_id(hf, "bos_token_id", vocab),
        eos_token_id=token_id(hf, "eos_token_id", vocab),
        mask_token_id=token_id(hf, "mask_token_id", vocab),
    )


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every qkv tensor of a BERT-shaped model and where it lives in a BERT checkpoint."""
    d = cfg.n_heads * cfg.head_dim
    out = [copy("token_embedding.weight", "embeddings.word_embeddings.weight"),
           copy("encoder.positions.weight", "embeddings.position_embeddings.weight")]
    if cfg.type_vocab_size:
        out.append(copy("encoder.types.weight", "embeddings.token_type_embeddings.weight"))
    out += norm("encoder.embed_norm", "embeddings.LayerNorm")
    for i in range(cfg.n_encoder_layers):
        h, q = f"encoder.layer.{i}", f"encoder.layers.{i}"
        parts = [f"{h}.attention.self.{p}" for p in ("query", "key", "value")]
        out += fused(f"{q}.attn.qkv", parts, [d, d, d])
        out += linear(f"{q}.attn.out", f"{h}.attention.output.dense")
        out += norm(f"{q}.attn_norm", f"{h}.attention.output.LayerNorm")
        out += linear(f"{q}.ffn.up", f"{h}.intermediate.dense")
        out += linear(f"{q}.ffn.down", f"{h}.output.dense")
        out += norm(f"{q}.ffn_norm", f"{h}.output.LayerNorm")
    if cfg.pooler:
        out += linear("pooler.dense", "pooler.dense")
    if cfg.mlm_transform:
        out += linear("mlm_transform.dense", "cls.predictions.transform.dense", head=True)
        out += norm("mlm_transform.norm", "cls.predictions.transform.LayerNorm", head=True)
    if cfg.lm_head_bias:
        out.append(copy("lm_head.bias", "cls.predictions.bias", head=True))
    if not cfg.tie_embeddings:
        out.append(copy("lm_head.weight", "cls.predictions.decoder.weight", head=True))
    if cfg.labels:
        out += linear("classifier", "classifier", head=True)
    return out


def ignored(cfg: ModelConfig) -> list[str]:
    """Names in a BERT checkpoint that hold nothing to load (regular expressions)."""
    # position_ids is a buffer (0..n-1); decoder.bias repeats cls.predictions.bias; the
    # next-sentence head of BertForPreTraining has no counterpart in qkv.
    out = [r"embeddings\.position_ids", r"cls\.predictions\.decoder\.bias",
           r"cls\.seq_relationship\.(weight|bias)"]
    if cfg.tie_embeddings:
        out.append(r"cls\.predictions\.decoder\.weight")
    return out


def mismatch(cfg: ModelConfig) -> str | None:
    """Why `cfg` cannot be written as BERT, or None when it can."""
    return first_mismatch("BERT", "an encoder", [
        family_is(cfg, "encoder"),
        *positions_are(cfg, "learned"),
        *layout_is(cfg, "layernorm", "post"),
        (cfg.embedding_norm, "no embedding norm", "a norm after the embeddings"),
        *plain_layers(cfg),
        *without(cfg, "scale_embeddings"),
        (cfg.type_vocab_size > 0, "no token types", "token-type embeddings"),
        (cfg.mlm_transform or not cfg.lm_head_bias, "an output bias without the MLM transform",
         "the MLM transform under an output bias"),
        (cfg.lm_head_bias or not cfg.mlm_transform, "the MLM transform without an output bias",
         "an output bias in the MLM head"),
        (cfg.mlm_transform or cfg.tie_embeddings, "an untied output layer without the MLM "
         "transform", "the MLM transform for an untied output layer"),
        (cfg.pooler or not cfg.labels, "a classifier without the pooler",
         "the pooler under its classifier"),
    ])


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> BERT config.json; the heads decide the architecture written."""
    if cfg.labels:
        arch = "BertForSequenceClassification"
    elif cfg.mlm_transform:
        arch = "BertForMaskedLM"
    else:
        arch = "BertModel"
    out: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        "architectures": [arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "hidden_act": ACTIVATIONS_TO_HF[cfg.activation],
        "layer_norm_eps": cfg.norm_eps,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "mask_token_id": cfg.mask_token_id,  # not read by transformers; kept for qkv
    }
    if cfg.labels:
        out["id2label"] = {str(i): name for i, name in enumerate(cfg.labels)}
        out["label2id"] = {name: i for i, name in enumerate(cfg.labels)}
    return out


ARCHITECTURE = Architecture(MODEL_TYPE, PREFIX, config_from_hf, config_to_hf, rules, ignored,
                            mismatch, prepare=prepare, finish_hf=finish_hf,
                            base_architecture=BASE_ARCHITECTURE)
