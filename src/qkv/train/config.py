"""TrainConfig: every knob of a training run, with defaults that train the default model well;
LoopConfig: how the loop (train/loop.py) runs, and FitResult: what it did.

The defaults are the recipe of the "gpt-char-small" preset on the bundled tiny Shakespeare: on a
2-core laptop CPU with bf16 they reach a validation loss below 1.70 in under five minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..config import check_number, check_seed
from ..errors import ConfigError
from ..hardware import PRECISIONS, check_device_name
from ..presets import get as get_preset
from ..presets import names as preset_names
from .optim import Schedule

TOKENIZERS = ("char", "bpe", "wordpiece")
FAMILIES = ("decoder", "encoder")
#: What a family trains when no --preset / --tokenizer is given.
DEFAULT_PRESET = {"decoder": "gpt-char-small", "encoder": "bert-tiny"}
DEFAULT_TOKENIZER = {"decoder": "char", "encoder": "wordpiece"}
#: Peak learning rate and warm-up per family. A post-LayerNorm BERT trained at the decoder's
#: 2e-3 collapses: after a few hundred updates every token of every text comes out as the same
#: vector, the masked-LM loss sits at the unigram entropy, and nothing can be fine-tuned from it.
#: 1e-3 with a longer warm-up trains it (docs/encoder.md).
DEFAULT_LR = {"decoder": 2e-3, "encoder": 1e-3}
DEFAULT_WARMUP = {"decoder": 50, "encoder": 150}


@dataclass
class TrainConfig:
    """A training run. Sizes left as None come from the preset.

    Objective
        family: "decoder" (next-token prediction, a GPT) or "encoder" (masked language
        modelling, a BERT: 15% of the tokens are hidden and the loss is taken there only).
    Data
        data: a UTF-8 text file or a folder of them (None: the bundled tiny Shakespeare).
        tokenizer: "char" (one token per character), "bpe" (byte-level BPE of vocab_size) or
        "wordpiece" (BERT's, with a [MASK] token). Default: char for a decoder, wordpiece for an
        encoder.
        val_fraction: the last part of the token stream held out for validation.
        cache_dir: where tokenized corpora are cached (default: .qkv-cache next to `out`).
    Model
        preset: a name from qkv.presets (default gpt-char-small, or bert-tiny for an encoder);
        its family must be `family`. n_layers, d_model, n_heads, context (max_seq_len) and
        dropout override it.
    Optimisation
        batch_size windows of `context` tokens per micro-batch, grad_accum micro-batches per
        update; AdamW with lr (peak), betas, weight_decay; warmup_steps of linear warm-up, then
        cosine decay to min_lr (default lr / 10) at max_steps; gradients clipped to grad_clip.
        max_steps=None with a time_limit (seconds) fits the schedule to the time.
    Evaluation and logging
        every eval_every updates: validation loss on up to eval_windows fixed windows, the best
        model saved, a checkpoint written; a log line every log_every updates.
    Runtime
        out (default runs/<preset>), device, precision ("auto": bf16 where the hardware has it),
        compile (torch.compile), seed, threads, progress (the progress bar), fsdp (under
        torchrun: shard the model with FSDP2 instead of copying it with DDP;
        docs/distributed.md).
    """

    family: str = "decoder"
    data: str | None = None
    tokenizer: str | None = None  # None: the family's default
    vocab_size: int | None = None
    val_fraction: float = 0.1
    cache_dir: str | None = None

    preset: str | None = None  # None: the family's default
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    context: int | None = None
    dropout: float | None = None

    batch_size: int = 32
    grad_accum: int = 1
    lr: float | None = None  # None: the family's default (DEFAULT_LR)
    min_lr: float | None = None
    warmup_steps: int | None = None  # None: the family's default (DEFAULT_WARMUP)
    max_steps: int | None = 500
    time_limit: float | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0

    eval_every: int = 100
    eval_windows: int = 500
    log_every: int = 10

    out: str | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    seed: int = 1337
    threads: int | None = None
    progress: bool = True
    fsdp: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family={self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.preset is None:
            self.preset = DEFAULT_PRESET[self.family]
        if self.tokenizer is None:
            self.tokenizer = DEFAULT_TOKENIZER[self.family]
        if self.lr is None:
            self.lr = DEFAULT_LR[self.family]
        if self.warmup_steps is None:
            self.warmup_steps = DEFAULT_WARMUP[self.family]
        self.validate()

    @property
    def out_dir(self) -> str:
        return self.out if self.out is not None else f"runs/{self.preset}"

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else (self.lr or 0.0) / 10

    def validate(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer={self.tokenizer!r} is not one of "
                              f"{', '.join(TOKENIZERS)}")
        if self.family == "encoder" and self.tokenizer != "wordpiece":
            raise ConfigError(f"masked-LM training needs a [MASK] token and the {self.tokenizer} "
                              "tokenizer has none; use --tokenizer wordpiece")
        if self.preset in preset_names():
            preset_family = get_preset(self.preset).family
            if preset_family != self.family:
                hint = (f"pass --family {preset_family}, or " if preset_family in FAMILIES
                        else "")
                raise ConfigError(f"preset {self.preset!r} has family {preset_family}, not "
                                  f"{self.family}; {hint}choose a preset of family "
                                  f"{self.family}")
        check_device_name(self.device)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not one of "
                              f"{', '.join(PRECISIONS)}")
        self._check_numbers()

    def _check_finite(self) -> None:
        """Every real-valued setting is a finite number (nan and inf are refused here, so that
        the range checks below see real numbers); the seed fits torch's generators."""
        for name in ("lr", "min_lr", "val_fraction", "dropout", "weight_decay", "beta1", "beta2",
                     "grad_clip", "time_limit"):
            value = getattr(self, name)
            if value is not None or name not in ("min_lr", "dropout", "time_limit"):
                check_number(name, value)
        check_seed(self.seed)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise ConfigError(f"warmup_steps={self.warmup_steps!r} must be a whole number")

    def _check_numbers(self) -> None:
        positive = ["batch_size", "grad_accum", "eval_every", "eval_windows", "log_every"]
        optional_positive = ["vocab_size", "n_layers", "d_model", "n_heads", "context",
                             "max_steps", "threads"]
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is None and name in optional_positive:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive whole number")
        self._check_finite()
        lr, warmup = self.lr or 0.0, self.warmup_steps or 0  # set by __post_init__
        if warmup < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} cannot be negative")
        if not lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.min_lr is not None and not 0 <= self.min_lr <= lr:
            raise ConfigError(f"min_lr={self.min_lr} must be between 0 and lr={self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} must be between 0 and 1")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip cannot be negative")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ConfigError(f"time_limit={self.time_limit} must be a positive number of "
                              "seconds")
        if self.max_steps is None and self.time_limit is None:
            raise ConfigError("give max_steps or time_limit (or both): training needs an end")
        if self.tokenizer == "bpe" and self.vocab_size is not None and self.vocab_size < 260:
            raise ConfigError(f"vocab_size={self.vocab_size} is too small for byte-level BPE "
                              "(at least 260: 256 bytes + special tokens)")

    def model_overrides(self) -> dict[str, Any]:
        """The ModelConfig fields this run sets on top of the preset."""
        pairs = {"n_layers": self.n_layers, "d_model": self.d_model, "n_heads": self.n_heads,
                 "max_seq_len": self.context, "dropout": self.dropout}
        return {k: v for k, v in pairs.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class LoopConfig:
    """How the loop runs (what it learns is the Objective).

    max_steps=None with a time_limit (seconds) fits the schedule to the time; an evaluation
    then counts as about `eval_cost` updates. log_every=None writes a log line only at each
    evaluation. `name` labels the messages ("qkv NAME: ...")."""

    max_steps: int | None
    schedule: Schedule
    time_limit: float | None = None
    grad_accum: int = 1
    grad_clip: float = 1.0
    eval_every: int | None = None
    log_every: int | None = None
    eval_cost: float = 0.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    compile: bool = False
    progress: bool = True
    name: str = "train"
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP


@dataclass
class FitResult:
    """What fit did. `stopped_by` is "SIGINT"/"SIGTERM"/"time limit", or None if it ran to
    max_steps; `metrics` is the last evaluation, `best` the best one (at `best_step`);
    `best_state` holds the best weights when there was no run directory to save them in."""

    step: int
    max_steps: int
    train_loss: float | None
    metrics: dict[str, float] | None
    best: dict[str, float] | None
    best_step: int
    per_s: float
    elapsed: float
    stopped_by: str | None
    history: list[dict[str, Any]]
    best_state: dict[str, torch.Tensor] | None = None
