"""BART (Lewis et al. 2020) <-> qkv.

BART has Marian's layer layout (the Hugging Face code of both comes from fairseq) with three
differences: learned position tables that keep two unused rows before position 0 (qkv's
``position_offset=2``), a LayerNorm right after the embeddings of each stack
(``embedding_norm``), and GELU. Everything else, names included, is shared with
:mod:`qkv.hf.marian`:

    Hugging Face (BartModel; "model." + ... in BartForConditionalGeneration)   qkv
    {stack}.embed_positions (max_len + 2, d)                                  {stack}.positions
    {stack}.layernorm_embedding                                               {stack}.embed_norm
    (every other tensor as in Marian; {stack} is encoder or decoder)

The shared parts live in :mod:`qkv.hf.common` (``seq2seq_*``).
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
    unsupported,
)

MODEL_TYPE = "bart"
PREFIX = "model."
OFFSET = 2  # BART's learned position tables start with two unused rows

def config_from_hf(hf: dict[str, Any], shapes: dict[str, list[int]]) -> ModelConfig:
    """A BART config.json -> ModelConfig (raises UnsupportedModelError for what qkv lacks)."""
    if any(k.startswith("classification_head.") for k in shapes):
        raise unsupported(MODEL_TYPE, "a BartForSequenceClassification head (dense + tanh on "
                          "the last eos token)")
    return ModelConfig(
        family="encoder-decoder",
        **seq2seq_sizes(hf, MODEL_TYPE),
        position="learned",
        position_offset=OFFSET,
        norm="layernorm",
        norm_eps=1e-5,
        norm_placement="post",
        activation=activation_from_hf(get(hf, "activation_function", "gelu"), MODEL_TYPE),
        bias=True,
        tie_embeddings=bool(get(hf, "tie_word_embeddings", True)),
        scale_embeddings=bool(get(hf, "scale_embedding", False)),
        embedding_norm=True,
        lm_head_bias="final_logits_bias" in shapes,
    )


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every qkv tensor of a BART-shaped model and where it lives in a BART checkpoint."""
    return seq2seq_rules(cfg, learned_positions=True)


def ignored(cfg: ModelConfig) -> list[str]:
    """Names in a BART checkpoint that hold nothing to load (regular expressions)."""
    return [*seq2seq_ignored(cfg), r"(encoder|decoder)\.version"]


def mismatch(cfg: ModelConfig) -> str | None:
    """Why `cfg` cannot be written as BART, or None when it can."""
    return first_mismatch("BART", "an encoder-decoder", [
        *positions_are(cfg, "learned", OFFSET),
        (cfg.embedding_norm, "no embedding norm", "a norm after the embeddings"),
        *seq2seq_checks(cfg),
    ])


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> BART config.json (for BartForConditionalGeneration)."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["BartForConditionalGeneration"],
        **seq2seq_config_to_hf(cfg),
        "activation_function": ACTIVATIONS_TO_HF[cfg.activation],
    }


ARCHITECTURE = Architecture(MODEL_TYPE, PREFIX, config_from_hf, config_to_hf, rules, ignored,
                            mismatch, prepare=seq2seq_prepare, finish_hf=seq2seq_finish_hf)
