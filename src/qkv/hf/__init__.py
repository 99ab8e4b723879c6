"""Hugging Face checkpoints in and out of qkv, with the same numbers.

    model, tokenizer = qkv.hf.load_hf("path/to/hf-model")     # or qkv.load(...)
    qkv.hf.save_hf(model, tokenizer, "out/")                  # or qkv.save(..., format="hf")

A Hugging Face model directory holds ``config.json`` (with ``model_type``), the weights as
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``) and usually a
tokenizer. One module per architecture says how its config and tensor names map onto qkv's:
:mod:`~qkv.hf.gpt2`, :mod:`~qkv.hf.bert`, :mod:`~qkv.hf.llama`, :mod:`~qkv.hf.marian` and
:mod:`~qkv.hf.bart`. Weights are read with safetensors only: pickled ``pytorch_model.bin`` files
are refused, because unpickling can run code.

Neither direction needs the ``transformers`` package.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError, QkvError, UnsupportedModelError
from ..io import CONFIG, atomic_write_safetensors, atomic_write_text, read_config_json
from ..model import Transformer
from ..tokenizer import Tokenizer
from . import bart, bert, gpt2, llama, marian
from .common import (
    WEIGHTS,
    Architecture,
    add_prefix,
    read_hf_tensors,
    strip_prefix,
    to_hf,
    to_qkv,
)
from .sentence import read_sentence_transformers, write_sentence_transformers
from .tokenizer import TOKENIZER_FILES, load_tokenizer

ARCHITECTURES: dict[str, Architecture] = {
    m.ARCHITECTURE.model_type: m.ARCHITECTURE for m in (gpt2, bert, llama, marian, bart)
}

__all__ = ["ARCHITECTURES", "Architecture", "architecture_for", "load_hf", "save_hf"]


def _architecture(model_type: object, where: Path) -> Architecture:
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where / CONFIG} has model_type {model_type!r}; qkv reads "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def _tensors(arch: Architecture, path: Path, data: dict) -> dict[str, torch.Tensor]:
    # other spellings and duplicated tensors are sorted out by arch.prepare
    return arch.prepare(strip_prefix(read_hf_tensors(path), arch.prefix), data)


def _config(arch: Architecture, data: dict, shapes: dict[str, list[int]],
            path: Path) -> ModelConfig:
    try:
        cfg = arch.config_from_hf(data, shapes)
        return cfg.replace(**read_sentence_transformers(path, cfg.max_seq_len))
    except ConfigError as e:  # e.g. a head count that does not divide the width
        raise CheckpointError(f"{path / CONFIG}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError, KeyError, AttributeError,
            IndexError) as e:  # a field of the wrong type or value (a string or 0 for a size)
        raise CheckpointError(f"{path / CONFIG} has a value of the wrong type or out of range "
                              f"({type(e).__name__}: {e})") from None


def _load_tokenizer(path: Path) -> Tokenizer | None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return load_tokenizer(path)
    except QkvError as e:
        raise CheckpointError(f"{path}: the tokenizer cannot be loaded ({e})") from None


def load_hf(path: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """Load a Hugging Face model directory as a qkv (model, tokenizer or None), in eval mode.

    The architecture comes from config.json's model_type; which heads exist (an LM head, BERT's
    pooler, a classifier) is read from the tensors present. A sentence-transformers folder also
    sets the pooling and normalisation of :meth:`Transformer.sentence_embedding`.
    """
    path = Path(path)
    data = read_config_json(path)
    arch = _architecture(data.get("model_type"), path)
    tensors = _tensors(arch, path, data)
    cfg = _config(arch, data, {k: list(v.shape) for k, v in tensors.items()}, path)
    tokenizer = _load_tokenizer(path)
    if tokenizer is not None and cfg.mask_token_id is None:
        mask = tokenizer.mask_id
        if mask is not None and mask < cfg.vocab_size:
            cfg = cfg.replace(mask_token_id=mask)
    model = Transformer(cfg)
    expected = model.state_dict()
    state = to_qkv(tensors, arch.rules(cfg), arch.ignored(cfg), expected, path)
    tied = model.tied_weights()
    left = [k for k in expected if k not in state and k not in tied]
    if left:  # the rules of every architecture cover its whole model: this is a bug
        raise RuntimeError(f"qkv.hf.{arch.model_type} maps no tensor to {left[0]}")
    model.load_state_dict(state, strict=False)
    return model.eval(), tokenizer


def architecture_for(cfg: ModelConfig) -> Architecture:
    """The Hugging Face architecture `cfg` is written as; UnsupportedModelError if none fits.

    The family and the position scheme choose the candidate (a decoder with RoPE is Llama, any
    other decoder GPT-2, an encoder BERT, an encoder-decoder with learned positions BART, any
    other Marian); the candidate then names the first feature it cannot hold.
    """
    if cfg.family == "decoder":
        arch = (llama if cfg.position == "rope" else gpt2).ARCHITECTURE
    elif cfg.family == "encoder":
        arch = bert.ARCHITECTURE
    else:
        arch = (bart if cfg.position == "learned" else marian).ARCHITECTURE
    problem = arch.mismatch(cfg)
    if problem:
        raise UnsupportedModelError(problem)
    return arch


def _tokenizer_config(tokenizer: Tokenizer, cfg: ModelConfig) -> dict:
    """tokenizer_config.json: lets transformers' AutoTokenizer open tokenizer.json."""
    out: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len}
    for role, token in tokenizer.special_tokens.items():
        out[f"{role}_token"] = token
    return out


def save_hf(model: Transformer, tokenizer: Tokenizer | None, path: str | Path) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face model directory.

    Writes config.json (model_type and architectures), model.safetensors under Hugging Face
    names, tokenizer.json with tokenizer_config.json, and for encoders the sentence-transformers
    files that keep the pooling. Every file is written atomically.
    """
    path = Path(path)
    cfg = model.config
    arch = architecture_for(cfg)
    rules = arch.rules(cfg)
    hf_config = arch.config_to_hf(cfg)
    state = model.state_dict()
    tensors = to_hf(state, rules)
    tensors = arch.finish_hf(tensors, cfg)  # tensors an architecture keeps twice
    if hf_config["architectures"][0] != arch.base_architecture:
        tensors = add_prefix(tensors, rules, arch.prefix)
    # Own, contiguous CPU copies: safetensors refuses views that share storage (split parts).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    dtype = next(iter(state.values())).dtype
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(path / WEIGHTS, tensors, metadata={"format": "pt"})
    atomic_write_text(path / CONFIG, json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path / "tokenizer.json")
        atomic_write_text(path / "tokenizer_config.json",
                          json.dumps(_tokenizer_config(tokenizer, cfg), indent=2) + "\n")
    default_pooling = "last" if cfg.family == "decoder" else "mean"
    if cfg.family == "encoder" or (cfg.family == "decoder" and (
            cfg.pooling != default_pooling or cfg.normalize_embeddings)):
        write_sentence_transformers(cfg, path)
    return path
