"""ModelConfig: every architectural choice of a Transformer in one typed dataclass.

The three families differ only in which stacks they build:

    encoder          tokens -> embeddings -> N x EncoderBlock -> MLM | embedding | classifier
    decoder          tokens -> embeddings -> N x DecoderBlock (causal) -> LM head
    encoder-decoder  source -> encoder;  target -> decoder (+ cross-attention) -> LM head

A config is plain data: it is validated when it is built (errors name the field), and it is saved
as ``config.json`` next to the weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import ConfigError
from .io import atomic_write_text

FAMILIES = ("encoder", "decoder", "encoder-decoder")
POSITIONS = ("learned", "sinusoidal", "rope", "none")
NORMS = ("layernorm", "rmsnorm")
PLACEMENTS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu")
POOLINGS = ("mean", "cls", "last", "max")
SINUSOIDAL_LAYOUTS = ("interleaved", "halves")


@dataclass
class ModelConfig:
    """Every architectural choice of a qkv Transformer.

    Sizes
        vocab_size, d_model (width of every token vector), n_layers (depth), n_heads,
        n_kv_heads (fewer key/value heads = grouped-query attention; 1 = multi-query),
        head_dim (default d_model // n_heads), d_ff (feed-forward width; default 4 * d_model,
        or about 8/3 * d_model for the gated activations), max_seq_len (longest sequence).
        Encoder-decoder models may give the two stacks different depths with
        n_encoder_layers / n_decoder_layers (each defaults to n_layers).

    Choices
        position: "learned" (GPT-2, BERT), "sinusoidal" (Vaswani et al. 2017), "rope" (Llama),
            or "none". rope_theta is RoPE's base; position_offset shifts learned position ids
            (BART stores two unused rows first). sinusoidal_layout: "interleaved" puts sin and
            cos in alternate dimensions as in the paper; "halves" puts all sines first (Marian).
        norm: "layernorm" | "rmsnorm", with norm_eps; norm_placement: "pre" (GPT-2, Llama) or
            "post" (the paper, BERT).
        activation: "relu" (the paper), "gelu" (BERT), "gelu_tanh" (GPT-2), "silu",
            "swiglu" (Llama), "geglu".
        bias: biases in attention and feed-forward projections.
        tie_embeddings: the output layer reuses the token embedding matrix.
        scale_embeddings: multiply token vectors by sqrt(d_model) (the paper, Marian).
        embedding_norm: a norm right after the embeddings are summed (BERT, BART).
        final_norm: a norm after the last block (default: on for pre-LN, off for post-LN).
        type_vocab_size: > 0 adds segment (token-type) embeddings (BERT).

    Heads (encoder family; also used by classification of decoders)
        mlm_transform: BERT's dense + activation + norm before the masked-LM output layer.
        pooler: BERT's dense + tanh on the first token.
        pooling: how a sequence becomes one vector: "mean" | "cls" | "last" | "max";
        normalize_embeddings: L2-normalise pooled sentence embeddings.
        embed_max_len: texts are cut to this many tokens when embedded as sentences
            (sentence-transformers' max_seq_length; all-MiniLM-L6-v2 uses 256 of its 512
            positions). None: max_seq_len.
        labels: class names of a sequence-classification head (empty: no classifier).
        lm_head_bias: a bias on the output layer (BERT's MLM decoder, Marian's final bias).

    Special token ids
        pad_token_id, bos_token_id, eos_token_id, decoder_start_token_id (first decoder input
        of an encoder-decoder), mask_token_id.
    """

    family: str = "decoder"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    max_seq_len: int = 256
    n_encoder_layers: int | None = None
    n_decoder_layers: int | None = None

    position: str = "learned"
    rope_theta: float = 10000.0
    position_offset: int = 0
    sinusoidal_layout: str = "interleaved"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_placement: str = "pre"
    activation: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    scale_embeddings: bool = False
    embedding_norm: bool = False
    final_norm: bool | None = None
    type_vocab_size: int = 0

    mlm_transform: bool = False
    pooler: bool = False
    pooling: str = "mean"
    normalize_embeddings: bool = False
    embed_max_len: int | None = None
    labels: list[str] = field(default_factory=list)
    lm_head_bias: bool = False

    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    mask_token_id: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.activation in ("swiglu", "geglu"):
            # Gated FFNs have three matrices; 8/3 * d keeps the parameter count of a 4 * d FFN
            # (Shazeer 2020), rounded up to a multiple of 64 for fast matrix kernels.
            return 64 * ((8 * self.d_model // 3 + 63) // 64)
        return 4 * self.d_model

    @property
    def encoder_layers(self) -> int:
        if self.family == "decoder":
            return 0
        return self.n_encoder_layers if self.n_encoder_layers is not None else self.n_layers

    @property
    def decoder_layers(self) -> int:
        if self.family == "encoder":
            return 0
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    @property
    def has_final_norm(self) -> bool:
        if self.final_norm is not None:
            return self.final_norm
        return self.norm_placement == "pre"

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _one_of("family", self.family, FAMILIES)
        _one_of("position", self.position, POSITIONS)
        _one_of("norm", self.norm, NORMS)
        _one_of("norm_placement", self.norm_placement, PLACEMENTS)
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("pooling", self.pooling, POOLINGS)
        _one_of("sinusoidal_layout", self.sinusoidal_layout, SINUSOIDAL_LAYOUTS)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("n_kv_heads", "head_dim", "d_ff", "n_encoder_layers", "n_decoder_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be at least 1")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}"
            )
        if self.position == "rope" and self.d_head % 2:
            raise ConfigError(f"rope needs an even head size, but the head size is {self.d_head}")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}={value} must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps={self.norm_eps} must be positive")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta={self.rope_theta} must be positive")
        if self.position_offset < 0 or self.type_vocab_size < 0:
            raise ConfigError("position_offset and type_vocab_size cannot be negative")
        if self.embed_max_len is not None and not 1 <= self.embed_max_len <= self.max_seq_len:
            raise ConfigError(f"embed_max_len={self.embed_max_len} must be between 1 and "
                              f"max_seq_len={self.max_seq_len}")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels={self.labels} contains a duplicate class name")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
                     "mask_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"{name}={value} is outside the vocabulary (size {self.vocab_size})"
                )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known and k != "qkv_version")
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({**self.to_dict(), "qkv_version": __version__}, indent=2) + "\n"
        if path is not None:
            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> ModelConfig:
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    spec = str(annotation).replace(" ", "")
    optional = spec.endswith("|None")
    base = spec.removesuffix("|None")
    if value is None:
        if not optional:
            raise ConfigError(f"{name} must be given (got null)")
        return
    if base == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {value!r}")
        return
    expected = _TYPES[base]
    is_bool = isinstance(value, bool)
    if (base != "bool" and is_bool) or not isinstance(value, expected):
        raise ConfigError(f"{name} must be {base}, got {type(value).__name__} {value!r}")
