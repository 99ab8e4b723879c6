"""A model directory on disk, and how to write it safely.

    runs/x/
      config.json         ModelConfig + {"qkv_version": ...}
      model.safetensors   the weights (a tied matrix is stored once)
      tokenizer.json      the tokenizer

Weights are only ever read with safetensors: loading a checkpoint never runs code from it.
Every write goes to a temporary file that is flushed to disk and then renamed over the target,
so a process killed mid-write leaves the previous file intact, never half of a new one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, InputError
from .hardware import resolve_device
from .hf import load_hf, save_hf
from .hub import resolve
from .io import (
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    atomic_write_safetensors,
    read_config_json,
    read_safetensors,
)
from .lora import adapter_base, load_adapter
from .model import Transformer, upgrade_state_dict
from .quantize import is_quantized
from .tokenizer import Tokenizer

__all__ = ["CONFIG", "TOKENIZER", "WEIGHTS", "is_model_dir", "load", "load_weights",
           "load_with_adapter", "read_config_json", "read_safetensors", "save", "save_weights"]


def save_weights(model: torch.nn.Module, path: Path, tied: dict[str, str] | None = None,
                 metadata: dict[str, str] | None = None) -> None:
    """Write the state dict as safetensors; keys in `tied` are left out (stored once)."""
    tied = tied or {}
    tensors = {k: v for k, v in model.state_dict().items() if k not in tied}
    atomic_write_safetensors(path, tensors, metadata)


def load_weights(model: Transformer, path: Path) -> None:
    """Load safetensors weights into `model`, checking every name and shape against it."""
    tensors = upgrade_state_dict(read_safetensors(path))  # earlier names too
    expected = model.state_dict()
    tied = model.tied_weights()
    missing = [k for k in expected if k not in tensors and k not in tied]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) the config needs, "
                              f"e.g. {missing[0]}")
    if unexpected:
        raise CheckpointError(f"{path} has {len(unexpected)} tensor(s) the config does not "
                              f"describe, e.g. {unexpected[0]}")
    for k, partner in tied.items():
        if k in tensors and partner in tensors and not torch.equal(tensors[k], tensors[partner]):
            raise CheckpointError(f"{path} holds two different matrices {k} and {partner}, but "
                                  "the config says tie_embeddings: true (one matrix for both); "
                                  "set tie_embeddings to false in config.json")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise CheckpointError(f"{path}: tensor {k} has shape {list(t.shape)} but the config "
                                  f"expects {list(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False)


def save(model: Transformer, tokenizer: Tokenizer | None, path: str | Path,
         format: str = "qkv") -> Path:
    """Write a model directory. format="hf" writes a Hugging Face directory instead."""
    path = Path(path)
    if format == "hf":
        _refuse_quantized(model)
        save_hf(model, tokenizer, path)
        return path
    if format != "qkv":
        raise ConfigError(f"format={format!r} is not one of qkv, hf")
    _refuse_quantized(model)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(model, path / WEIGHTS, model.tied_weights())
    model.config.to_json(path / CONFIG)
    if tokenizer is not None:
        tokenizer.save(path / TOKENIZER)
    return path


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def load_with_adapter(adapter: str | Path, base: str | Path | None = None,
                      device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """(base model + LoRA adapter, tokenizer) in one call; the base is `base`, or the one the
    adapter names (qkv.lora.adapter_base)."""
    model, tokenizer = load(adapter_base(adapter, base), device=device, dtype=dtype)
    model = load_adapter(model, Path(adapter)).to(device=device)
    return model.eval(), tokenizer


def load(path: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Load a qkv model directory, or a Hugging Face one, as (model, tokenizer or None).

    A LoRA adapter directory (adapter_config.json, see qkv.lora) loads its base model with the
    adapter added."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InputError(f"dtype={dtype!r} must be a floating-point torch dtype such as "
                         "torch.float32 or torch.bfloat16 (for int8, use qkv.quantize_int8)")
    device = resolve_device(device) if isinstance(device, str) else device
    path = Path(path)
    if not path.exists():
        path = resolve(str(path))
    if (path / "adapter_config.json").is_file() and not (path / CONFIG).is_file():
        return load_with_adapter(path, device=device, dtype=dtype)  # a LoRA adapter
    data = read_config_json(path)
    if "model_type" in data:  # a Hugging Face checkpoint
        model, tokenizer = load_hf(path)
    else:
        try:
            config = ModelConfig.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path / CONFIG}: {e}") from None
        model = Transformer(config)
        load_weights(model, path / WEIGHTS)
        tokenizer = None
        if (path / TOKENIZER).is_file():
            tokenizer = Tokenizer.load(path / TOKENIZER)
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


def _refuse_quantized(model: Transformer) -> None:
    if is_quantized(model):
        raise InputError("this model has int8 weights (qkv.quantize_int8), which are for "
                         "inference only; save the float model it was made from")
