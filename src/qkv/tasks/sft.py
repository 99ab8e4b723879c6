"""Supervised fine-tuning (SFT): teach a pretrained decoder to answer, from question/answer pairs.

A model pre-trained on web text continues a question the way pages continue one: often with
another question. Fine-tuning on conversations, with the loss taken on the answers only, teaches
it the format "question -> answer" while what it knows stays from pre-training (Ouyang et al.
2022; Allen-Zhu & Li 2023, Physics of Language Models 3.1).

    examples (data/sft.py) -> chat template -> ids + answer mask -> batches -> the loop

The loss is the next-token cross-entropy over the answer tokens, averaged over them; with
`loss_on="all"` over every token. Short examples may be packed several to a row: each example
then sees only its own tokens (a block-diagonal causal mask) at its own positions (from 0), so
its loss is the one it has alone, and no compute is spent on padding. LoRA (qkv.lora) makes it
fit modest hardware: `lora_rank=16` trains about 1% of GPT-2's parameters.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batching import evaluating, model_device, pad_id
from ..chat import TEMPLATE_FILE, ChatTemplate
from ..checkpoint import CONFIG, TOKENIZER, WEIGHTS, load_weights
from ..data.sft import (
    Encoded,
    SFTBatches,
    SFTData,
    SFTExample,
    default_template,
    encode_sft,
    make_batch,
    read_sft,
)
from ..errors import InputError
from ..hardware import autocast, resolve_precision
from ..io import atomic_write_text, check_new_output
from ..lora import apply_lora, describe_trainable, save_adapter
from ..model import Transformer
from ..tokenizer import Tokenizer
from ..train import LoopConfig, Objective, Schedule, fit, make_optimizer
from ..train.loss import cross_entropy
from .common import load_model

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment numbers (0: padding) -> (B, T, T): query i may see key j when both are
    of the same example (the attention adds the causal part)."""
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return same & (segments[:, None, :] > 0)


def token_losses(model: Transformer, batch: Batch) -> torch.Tensor:
    """Cross-entropy of every target (B, T), 0 where the target is -100.

    Only the positions with a target go through the output layer: with the loss on the answers,
    the prompt and padding positions (often half a batch) cost no vocabulary-sized work. A batch
    without packing (one example per row, padding at the end) needs no mask beyond the causal
    one: a token never sees the padding after it."""
    x, y, positions, segments = batch
    mask = segment_mask(segments) if bool((segments > 1).any()) else None  # packed rows
    h = model.hidden_states(x, mask, positions)  # (B, T, d_model)
    kept = (y != -100).flatten()  # (B*T,)
    logits = model.logits(h.flatten(0, 1)[kept])  # (n, vocab) for the n kept targets
    losses = torch.zeros(y.numel(), dtype=torch.float32, device=y.device)
    losses = losses.masked_scatter(kept, cross_entropy(logits, y.flatten()[kept],
                                                       reduction="none"))  # fp32
    return losses.view_as(y)  # (B, T)


def sft_loss(model: Transformer, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's answer tokens (its targets that are not -100)."""
    y = batch[1]
    return token_losses(model, batch).sum() / (y != -100).sum().clamp(min=1)


@dataclass
class SFTSettings:
    """The knobs of supervised fine-tuning; the defaults suit a small model on a CPU."""

    epochs: float = 3.0
    max_steps: int | None = None     # instead of epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4                 # full fine-tuning; LoRA trains well at 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05
    max_length: int | None = None    # tokens per example (default and upper bound: the context)
    overlong: str = "truncate"       # or "skip": longer examples, counted either way
    loss_on: str = "completion"      # or "all": the loss on every token
    packing: bool = False
    val_fraction: float = 0.05       # held out when no dev file is given
    eval_every: int | None = None
    time_limit: float | None = None
    precision: str = "auto"
    seed: int = 0
    grad_clip: float = 1.0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: str = "q,v"
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if not self.epochs > 0:
            raise InputError(f"epochs={self.epochs} must be positive")
        for name in ("batch_size", "grad_accum", "max_steps", "max_length", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name.replace('_', '-')}={value} must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"lr={self.lr} must be positive")
        if not 0 <= self.warmup < 1:
            raise InputError(f"warmup={self.warmup} must be a fraction in [0, 1)")
        if not 0 < self.val_fraction < 1:
            raise InputError(f"val-fraction={self.val_fraction} must be between 0 and 1")
        resolve_precision(self.precision)


@dataclass
class SFTResult:
    model: Transformer
    train_examples: int
    eval_examples: int
    skipped: int
    truncated: int
    steps: int
    best_val_loss: float | None
    best_step: int
    wall_s: float
    precision: str
    trainable: int
    out: Path | None = None
    stopped_by: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def template_for(path: str | Path | None, tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template stored with a model directory, else the documented default
    (qkv.data.sft.DEFAULT_CHAT_TEMPLATE)."""
    if path is not None and Path(path).is_dir():
        found = ChatTemplate.from_model_dir(path, eos_token=tokenizer.special_tokens.get("eos")
                                            or "")
        if found is not None:
            return found
    return default_template(tokenizer)


def val_loss(model: Transformer, batches: Sequence[Batch], device: torch.device,
             precision: str) -> float:
    """Mean loss per answer token over fixed batches."""
    total, count = 0.0, 0
    with evaluating(model):
        for batch in batches:
            batch = tuple(t.to(device) for t in batch)
            with autocast(device, precision):
                total += token_losses(model, batch).sum().item()  # type: ignore[arg-type]
            count += int((batch[1] != -100).sum())
    return total / max(count, 1)


def sft_objective(train: Encoded, val: Encoded, pad: int, settings: SFTSettings,
                  max_length: int, device: torch.device, precision: str) -> Objective:
    """SFT as an objective for the loop: the best model has the lowest validation loss."""
    batches = SFTBatches(train, settings.batch_size, pad, settings.seed, settings.packing,
                         max_length)
    fixed: list[Batch] = [
        make_batch(val.ids, val.masks, [[i] for i in range(s, min(s + settings.batch_size,
                                                                     len(val)))], pad)
        for s in range(0, len(val), settings.batch_size)]

    def evaluate(model: Transformer) -> dict[str, float]:
        loss = val_loss(model, fixed, device, precision)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    return Objective(
        batches=batches, loss=sft_loss, evaluate=evaluate, best=[("val_loss", "min")],
        unit="tokens", count=lambda batch: int((batch[3] > 0).sum()),
        weight=lambda batch: float((batch[1] != -100).sum()),  # the answer tokens sft_loss means
        eval_due=lambda step: step % max(1, batches.per_epoch // settings.grad_accum) == 0,
        progress=lambda: {"epoch": round(batches.epoch + batches.index / batches.per_epoch, 3)})


def finetune_sft(model: Transformer, tokenizer: Tokenizer,
                 train: SFTData | Sequence[SFTExample],
                 dev: SFTData | Sequence[SFTExample] | None = None,
                 settings: SFTSettings | None = None, out: str | Path | None = None,
                 resume: bool = False, template: ChatTemplate | None = None,
                 base: str | None = None,
                 callback: Callable[[dict[str, Any]], None] | None = None,
                 overwrite: bool = False) -> SFTResult:
    """Fine-tune a decoder on examples; return the best model (lowest validation loss).

    `out` receives the best model (or, with LoRA, the adapter), its chat template, log.jsonl and
    training/ (exact resume). Without `dev`, `val_fraction` of the examples are held out. A
    model already in `out` is replaced only with `overwrite=True` (or continued with `resume`)."""
    s = settings or SFTSettings()
    s.check()
    t0 = time.perf_counter()
    if model.config.family != "decoder":
        raise InputError(f"sft fine-tunes a decoder (a GPT or Llama), not an "
                         f"{model.config.family} model; for an encoder use `qkv finetune "
                         "classify`")
    template = template or default_template(tokenizer)
    max_length = min(s.max_length or model.config.max_seq_len, model.config.max_seq_len)
    examples = list(train.examples if isinstance(train, SFTData) else train)
    if dev is None:
        generator = torch.Generator().manual_seed(s.seed)
        order = torch.randperm(len(examples), generator=generator).tolist()
        n_val = max(1, round(s.val_fraction * len(examples))) if len(examples) > 1 else 0
        if n_val == 0:
            raise InputError("one example is too few to hold some out; give a --dev file")
        dev = [examples[i] for i in sorted(order[:n_val])]
        examples = [examples[i] for i in sorted(order[n_val:])]
    train_enc = encode_sft(examples, tokenizer, template, max_length, s.overlong, s.loss_on)
    val_enc = encode_sft(dev, tokenizer, template, max_length, s.overlong, s.loss_on)
    if len(val_enc) == 0:
        raise InputError("no validation example is left after encoding")
    say = print if s.progress else (lambda *a, **k: None)
    if train_enc.truncated or train_enc.skipped:
        say(f"qkv sft: {train_enc.truncated} training example(s) longer than {max_length} "
            f"tokens truncated, {train_enc.skipped} skipped", file=sys.stderr)
    torch.manual_seed(s.seed)
    if s.lora_rank is not None:
        apply_lora(model, s.lora_rank, s.lora_alpha, s.lora_targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"qkv sft: {len(train_enc)} training, {len(val_enc)} validation examples; "
          f"{describe_trainable(model)}", file=sys.stderr)
    device = model_device(model)
    precision = resolve_precision(s.precision, device)
    pad = pad_id(tokenizer)
    objective = sft_objective(train_enc, val_enc, pad, s, max_length, device, precision)
    per_epoch = math.ceil(objective.batches.per_epoch / s.grad_accum)  # type: ignore[attr-defined]
    total = s.max_steps or max(1, math.ceil(s.epochs * per_epoch))
    optimizer = make_optimizer(model, s.lr, s.weight_decay, betas=(0.9, 0.999),
                               fused=device.type in ("cpu", "cuda"))
    loop = LoopConfig(
        max_steps=total, schedule=Schedule(s.lr, max(1, int(s.warmup * total)), decay="linear"),
        time_limit=s.time_limit, grad_accum=s.grad_accum, grad_clip=s.grad_clip,
        eval_every=s.eval_every, device=device, precision=precision, progress=s.progress,
        name="sft")
    out = Path(out) if out is not None else None
    if out is not None and not resume:
        check_new_output(out, overwrite)
        if s.lora_rank is None:
            model.config.to_json(out / CONFIG)
        tokenizer.save(out / TOKENIZER)
        atomic_write_text(out / TEMPLATE_FILE, template.source)
    model.train()
    result = fit(model, optimizer, objective, loop, out, resume,
                 {"settings": asdict(s), "template": template.source}, callback)
    model.eval()
    if out is not None:
        load_weights(model, out / WEIGHTS)
        if s.lora_rank is not None:
            save_adapter(model, out, base=base)
    elif result.best_state is not None:
        model.load_state_dict(result.best_state)
    best = result.best or {}
    return SFTResult(
        model=model, train_examples=len(train_enc), eval_examples=len(val_enc),
        skipped=train_enc.skipped, truncated=train_enc.truncated, steps=result.step,
        best_val_loss=best.get("val_loss"), best_step=result.best_step,
        wall_s=round(time.perf_counter() - t0, 1), precision=precision, trainable=trainable,
        out=out, stopped_by=result.stopped_by, history=result.history)


def finetune_sft_files(model: str | Path, data: str | Path, dev: str | Path | None = None,
                       out: str | Path | None = None, settings: SFTSettings | None = None,
                       device: str = "cpu", resume: bool = False,
                       template: str | Path | None = None, overwrite: bool = False) -> SFTResult:
    """:func:`finetune_sft` from files: the model (a directory or name), a JSONL file of
    examples (skipped rows are reported), an optional dev file, an optional template file."""
    s = settings or SFTSettings()
    if out is not None and not resume:
        check_new_output(out, overwrite)  # before any work: a model is never replaced by accident
    train = read_sft(data)
    dev_data = read_sft(dev) if dev is not None else None
    for d in (train, dev_data):
        if d is not None and d.report() and s.progress:
            print(f"qkv sft: {d.report()}", file=sys.stderr)
    net, tokenizer = load_model(model, device=device)
    if net.config.family != "decoder":
        raise InputError(f"sft fine-tunes a decoder (a GPT or Llama), but {model} is an "
                         f"{net.config.family} model; for an encoder use `qkv finetune classify`")
    if template is not None:
        file = Path(template)
        if not file.is_file():
            raise InputError(f"chat template file {file} does not exist")
        chat = ChatTemplate(file.read_text(encoding="utf-8"),
                            eos_token=tokenizer.special_tokens.get("eos") or "")
    else:
        chat = template_for(model, tokenizer)
    return finetune_sft(net, tokenizer, train, dev_data, s, out, resume, chat,
                        base=str(model), overwrite=overwrite)


__all__ = ["SFTResult", "SFTSettings", "finetune_sft", "finetune_sft_files", "segment_mask",
           "sft_loss", "token_losses", "val_loss"]
