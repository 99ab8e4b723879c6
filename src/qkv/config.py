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
import math
import os
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

#: The default of a size that follows the other fields (None): ModelConfig works it out when it
#: is built, so that reading it always gives a number.
FOLLOWS: Any = None


@dataclass
class ModelConfig:
    """Every architectural choice of a qkv Transformer.

    Sizes
        vocab_size, d_model (width of every token vector), n_layers (depth), n_heads,
        n_kv_heads (fewer key/value heads = grouped-query attention; 1 = multi-query),
        head_dim, d_ff (feed-forward width), max_seq_len (longest sequence).
        Encoder-decoder models may give the two stacks different depths with
        n_encoder_layers / n_decoder_layers.
        A size left out (None) is worked out from the others when the config is built:
        n_kv_heads = n_heads, head_dim = d_model // n_heads, d_ff = 4 * d_model (about
        8/3 * d_model for the gated activations), n_encoder_layers / n_decoder_layers =
        n_layers for each stack the family has and 0 for the other, final_norm = pre-LN.
        replace() works them out again, so they never go stale.

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
    n_kv_heads: int = FOLLOWS
    head_dim: int = FOLLOWS
    d_ff: int = FOLLOWS
    max_seq_len: int = 256
    n_encoder_layers: int = FOLLOWS
    n_decoder_layers: int = FOLLOWS

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
    final_norm: bool = FOLLOWS
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

    # Which sizes were left to follow the others (set by __post_init__; see replace()).
    _defaulted: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_sizes(self)
        # Sizes left out (None) follow the others. Which ones did is remembered, so that
        # replace(n_heads=8) works them out again instead of keeping the old n_heads' values.
        defaults = _defaults(self)
        self._defaulted = frozenset(name for name in defaults if getattr(self, name) is None)
        for name in self._defaulted:
            setattr(self, name, defaults[name])
        self.validate()

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        _check_types(self)
        _check_sizes(self)
        _one_of("family", self.family, FAMILIES)
        _one_of("position", self.position, POSITIONS)
        _one_of("norm", self.norm, NORMS)
        _one_of("norm_placement", self.norm_placement, PLACEMENTS)
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("pooling", self.pooling, POOLINGS)
        _one_of("sinusoidal_layout", self.sinusoidal_layout, SINUSOIDAL_LAYOUTS)
        if "head_dim" in self._defaulted and self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        for name, family in (("n_encoder_layers", "decoder"), ("n_decoder_layers", "encoder")):
            if (getattr(self, name) == 0) != (self.family == family):
                raise ConfigError(f"{name}={getattr(self, name)} does not fit family "
                                  f"{self.family} (0 exactly when the family lacks that stack)")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"rope needs an even head size, but the head size is "
                              f"{self.head_dim}")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}={value} must be in [0, 1)")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ConfigError(f"norm_eps={self.norm_eps} must be a positive, finite number")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta={self.rope_theta} must be a positive, finite number")
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

    # ------------------------------------------------------------------ size
    def parameter_count(self) -> int:
        """About the number of parameters a Transformer of this config has (within a few
        percent), worked out from the sizes alone, with nothing allocated: embeddings,
        attention, feed-forward and norms, the output layer unless tied, and the heads."""
        d, v = self.d_model, self.vocab_size
        norm = d * (2 if self.norm == "layernorm" else 1)
        bias = self.bias
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = d * (q + 2 * kv) + q * d + (q + 2 * kv + d if bias else 0)
        gated = self.activation in ("swiglu", "geglu")
        ffn = d * self.d_ff * (3 if gated else 2) + (self.d_ff * (2 if gated else 1) + d
                                                     if bias else 0)
        encoder_layer = attention + ffn + 2 * norm
        decoder_layer = encoder_layer + (attention + norm if self.n_encoder_layers else 0)
        total = v * d + (self.max_seq_len + self.position_offset) * d * (
            self.position == "learned") + self.type_vocab_size * d
        total += norm * (self.embedding_norm + self.final_norm * ((self.n_encoder_layers > 0)
                                                                  + (self.n_decoder_layers > 0)))
        total += self.n_encoder_layers * encoder_layer + self.n_decoder_layers * decoder_layer
        total += (0 if self.tie_embeddings else v * d) + (v if self.lm_head_bias else 0)
        total += (d * d + d + norm) * self.mlm_transform + (d * d + d) * self.pooler
        return total + (d + 1) * self.num_labels

    def check_fits_memory(self, bytes_per_parameter: int = 4) -> None:
        """ConfigError if the weights alone (fp32 by default) would not fit in this machine's
        memory: refused with a sentence before anything is allocated."""
        need = self.parameter_count() * bytes_per_parameter
        have = physical_memory()
        if have is not None and need > have:
            raise ConfigError(f"this config has {self.parameter_count():,} parameters, "
                              f"{_gib(need)} of weights, more than this machine's "
                              f"{_gib(have)} of memory; choose smaller sizes (d_model, "
                              "n_layers, vocab_size, d_ff)")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data; sizes that follow the others are written as None."""
        data = asdict(self)
        del data["_defaulted"]
        data.update({name: None for name in self._defaulted})
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls) if f.init}
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
        except RecursionError:
            raise ConfigError("config is nested too deeply to be a model config") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again).

        Sizes that followed the others follow them again: ModelConfig(n_heads=4) has
        head_dim = d_model // 4, and its replace(n_heads=8) has head_dim = d_model // 8.
        """
        follow = {name: None for name in self._defaulted if name not in changes}
        return dataclasses.replace(self, **follow, **changes)


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 *, low_open: bool = False, high_open: bool = False,
                 error: type[Exception] = ConfigError) -> float:
    """`value` if it is a finite real number within [low, high] (open ends where asked);
    otherwise `error` (a QkvError) naming `name`. The one range check of settings and flags."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise error(f"{name}={value} must be a finite number")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise error(f"{name}={value} must be {' and '.join(x for x in (lo, hi) if x)}")
    return value


def check_seed(value: Any, name: str = "seed", error: type[Exception] = ConfigError) -> int:
    """`value` if it is a whole number torch's random generators take (0 to 2**64 - 1)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name}={value!r} must be a whole number")
    if not 0 <= value < 2**64:
        raise error(f"{name}={value} must be between 0 and 2**64 - 1")
    return value


def _defaults(cfg: ModelConfig) -> dict[str, Any]:
    """What each optional size is when it is left out (None), given the other fields."""
    if cfg.activation in ("swiglu", "geglu"):
        # Gated FFNs have three matrices; 8/3 * d keeps the parameter count of a 4 * d FFN
        # (Shazeer 2020), rounded up to a multiple of 64 for fast matrix kernels.
        d_ff = 64 * ((8 * cfg.d_model // 3 + 63) // 64)
    else:
        d_ff = 4 * cfg.d_model
    return {
        "n_kv_heads": cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "d_ff": d_ff,
        "n_encoder_layers": 0 if cfg.family == "decoder" else cfg.n_layers,
        "n_decoder_layers": 0 if cfg.family == "encoder" else cfg.n_layers,
        "final_norm": cfg.norm_placement == "pre",
    }


_FOLLOWING = ("n_kv_heads", "head_dim", "d_ff", "n_encoder_layers", "n_decoder_layers",
              "final_norm")


def _check_sizes(cfg: ModelConfig) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be at least 1")
    for name in ("n_kv_heads", "head_dim", "d_ff"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    for name in ("n_encoder_layers", "n_decoder_layers"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ConfigError(f"{name}={value} cannot be negative")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_types(cfg: ModelConfig) -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.init and not (value is None and f.name in _FOLLOWING):
            _check_type(f.name, value, f.type)


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
