"""qkv: the Transformer from first principles on PyTorch.

    import qkv
    cfg = qkv.presets.get("gpt-char-tiny")
    model = qkv.Transformer(cfg)
    qkv.save(model, tokenizer, "runs/x");  model, tok = qkv.load("runs/x")
"""

from . import presets
from ._version import __version__
from .checkpoint import load, save
from .config import ModelConfig
from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    PrecisionError,
    QkvError,
    TokenizerError,
    UnsupportedModelError,
)
from .generate import generate
from .layers.attention import attention, record_attention
from .model import Transformer
from .pipelines import pipeline
from .quantize import quantize_int8
from .tokenizer import Tokenizer

__all__ = [
    "CheckpointError", "ConfigError", "InputError", "ModelConfig", "PrecisionError", "QkvError",
    "Tokenizer", "TokenizerError", "Transformer", "UnsupportedModelError", "__version__",
    "attention", "generate", "load", "pipeline", "presets", "quantize_int8", "record_attention",
    "save",
]
