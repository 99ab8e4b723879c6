"""Sequence classification: put a small head on a pretrained Transformer and fine-tune it.

    text -> tokenizer -> Transformer -> one vector per text (pooling) -> Linear -> class scores

The head is one `nn.Linear(d_model, num_labels)` (`model.classifier`); the vector comes from the
encoder's [CLS] token through BERT's pooler, from the mean of the token vectors, or, for a
decoder (GPT), from the last token, the only one that has seen the whole text. Fine-tuning trains
everything, head and body, for a few epochs with a small learning rate (Devlin et al. 2019), in
the shared loop (train/loop.py); this module supplies its objective.

The class names are stored in `config.labels`, so a saved model knows what it predicts: the
sorted raw labels (numerically for integers), renamed in that order by `label_names` (SST-2's
"0"/"1" -> "negative"/"positive"). Files are read by data/labelled.py (.tsv, .csv or .jsonl).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ..batching import evaluating, model_device, pad_id, pad_rows, sorted_batches
from ..checkpoint import CONFIG, TOKENIZER, WEIGHTS, load_weights
from ..config import check_number, check_seed
from ..data.labelled import (
    LabelledBatches,
    LabelledData,
    as_labelled,
    class_ids,
    encode_texts,
    read_labelled,
)
from ..errors import InputError
from ..hardware import autocast, resolve_precision
from ..io import check_new_output
from ..lora import apply_lora, describe_trainable, save_adapter
from ..model import Transformer
from ..tokenizer import Tokenizer
from ..train import LoopConfig, Objective, Schedule, distributed, fit, make_optimizer
from .common import load_model

POOLINGS = ("mean", "cls", "last", "max", "pooler")


def with_classifier(model: Transformer, labels: Sequence[str],
                    pooling: str | None = None) -> Transformer:
    """A copy of `model` with a classification head for `labels` (a fresh head, unless the model
    already has one for exactly these labels).

    pooling: how a text becomes one vector: "mean", "cls", "last", "max", or "pooler" (BERT's
    dense + tanh on [CLS]). None keeps the model's own choice, except for a decoder, which
    always uses "last" (its other tokens have not seen the end of the text).
    """
    cfg = model.config
    if len(labels) < 2:
        raise InputError(f"a classifier needs at least two classes, got {list(labels)}")
    if pooling is not None and pooling not in POOLINGS:
        raise InputError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    changes: dict[str, Any] = {"labels": list(labels)}
    if pooling == "pooler":
        changes.update(pooler=True, pooling="cls")
    elif pooling is not None:
        changes.update(pooler=False, pooling=pooling)
    elif cfg.family == "decoder":
        changes.update(pooler=False, pooling="last")
    new_cfg = cfg.replace(**changes)

    state = model.state_dict()
    if list(cfg.labels) != list(labels):
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    if not new_cfg.pooler:
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    param = next(model.parameters())
    new = Transformer(new_cfg).to(device=param.device, dtype=param.dtype)
    missing, unexpected = new.load_state_dict(state, strict=False)
    fresh = [k for k in missing if not k.startswith(("classifier.", "pooler."))]
    if fresh or unexpected:  # cannot happen: the two configs differ only in their heads
        raise RuntimeError(f"copying weights failed: missing {fresh}, unexpected {unexpected}")
    return new


def accuracy_and_macro_f1(predicted: Sequence[int], gold: Sequence[int]) -> tuple[float, float]:
    """Accuracy, and the F1 score averaged over classes (each class counts the same, however
    rare): the classes seen in the gold labels or the predictions."""
    if len(gold) == 0:
        return 0.0, 0.0
    correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
    f1s = []
    for c in sorted(set(gold) | set(predicted)):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold, strict=True))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold, strict=True))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return correct / len(gold), sum(f1s) / len(f1s)


def class_scores(model: Transformer, rows: Sequence[Sequence[int]], pad: int,
                 batch_size: int = 128, precision: str = "fp32") -> torch.Tensor:
    """Logits (N, num_labels) for pre-tokenized rows, in their original order."""
    device = model_device(model)
    out = torch.empty(len(rows), model.config.num_labels)
    with evaluating(model), autocast(device, precision):
        for batch in sorted_batches([len(r) for r in rows], batch_size):
            ids, mask = pad_rows([rows[i] for i in batch], pad, device=device)
            out[batch] = model.classify(ids, mask).float().cpu()
    return out


def evaluate(model: Transformer, rows: Sequence[Sequence[int]], gold: Sequence[int],
             pad: int, batch_size: int = 128, precision: str = "fp32") -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of the classifier on labelled rows."""
    logits = class_scores(model, rows, pad, batch_size, precision)
    target = torch.tensor(list(gold))
    accuracy, macro_f1 = accuracy_and_macro_f1(logits.argmax(-1).tolist(), list(gold))
    return {"accuracy": accuracy, "macro_f1": macro_f1,
            "loss": F.cross_entropy(logits, target).item()}


def predict_proba(model: Transformer, tokenizer: Tokenizer, texts: Sequence[str],
                  batch_size: int = 64, max_length: int | None = None,
                  precision: str = "fp32") -> torch.Tensor:
    """Class probabilities (N, num_labels) for raw texts, in order of config.labels."""
    if model.classifier is None:
        raise InputError("this model has no classification head (its config has no labels); "
                         "fine-tune one with `qkv finetune classify`")
    if len(texts) == 0:
        raise InputError("no texts to classify")
    limit = min(max_length or model.config.max_seq_len, model.config.max_seq_len)
    rows = encode_texts(tokenizer, texts, limit, model.config.family)
    logits = class_scores(model, rows, pad_id(tokenizer), batch_size,
                          resolve_precision(precision, model_device(model)))
    return logits.softmax(-1)


@dataclass
class ClassifySettings:
    """The knobs of fine-tuning; the defaults suit a small pretrained encoder."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.06            # fraction of the steps spent raising the learning rate
    max_length: int = 128           # tokens per text (cut to the model's max_seq_len)
    max_train_examples: int | None = None  # a random subset of the training set
    time_limit: float | None = None  # seconds of training; then evaluate, keep the best, stop
    precision: str = "auto"         # "auto" | "bf16" | "fp32"
    eval_every: int | None = None   # also evaluate every N steps (besides each epoch's end)
    pooling: str | None = None      # see with_classifier
    label_names: list[str] | None = None
    seed: int = 0
    grad_clip: float = 1.0
    eval_batch_size: int = 128
    compile: bool = False           # torch.compile the training step
    progress: bool = True
    lora_rank: int | None = None    # LoRA (qkv.lora): train low-rank updates and the head only
    lora_alpha: float | None = None  # scale alpha / rank (default 2 * rank)
    lora_targets: str = "q,v"       # which linears get updates (qkv.lora.TARGETS)

    def check(self) -> None:
        """InputError naming the first setting out of its range."""
        ranges = {"epochs": 1, "batch_size": 1, "max_length": 2, "eval_batch_size": 1,
                  "max_train_examples": 1, "eval_every": 1, "time_limit": 0}
        for name, low in ranges.items():
            value = getattr(self, name)
            if value is not None and not low <= value < math.inf:
                raise InputError(f"{name.replace('_', '-')}={value} must be at least {low}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"lr={self.lr} must be positive")
        if not 0 <= self.warmup < 1:
            raise InputError(f"warmup={self.warmup} must be a fraction in [0, 1)")
        for name in ("weight_decay", "grad_clip"):
            check_number(name.replace("_", "-"), getattr(self, name), 0, error=InputError)
        check_seed(self.seed, error=InputError)
        resolve_precision(self.precision)


@dataclass
class ClassifyResult:
    """What a fine-tuning run did. Metrics are on the dev set (or the training set without one).
    `stopped_by` is "SIGINT"/"SIGTERM"/"time limit", or None."""

    model: Transformer
    labels: list[str]
    train_examples: int
    eval_examples: int
    evaluated_on: str
    epochs: float
    steps: int
    best_accuracy: float
    best_macro_f1: float
    best_step: int
    wall_s: float
    precision: str
    stopped_by_time_limit: bool
    history: list[dict[str, Any]]
    out: Path | None = None
    stopped_by: str | None = None

    def summary(self) -> dict[str, Any]:
        """Everything but the model, JSON-safe."""
        keep = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return {**keep, "out": str(self.out) if self.out else None}


def classification_loss(model: Transformer, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean cross-entropy of a batch (ids, mask, labels)."""
    ids, mask, target = batch
    logits = model.classify(ids, mask)  # (B, num_labels)
    return F.cross_entropy(logits.float(), target)


def classification_objective(rows: Sequence[Sequence[int]], labels: Sequence[int],
                             eval_rows: Sequence[Sequence[int]], eval_labels: Sequence[int],
                             pad: int, settings: ClassifySettings, rng: random.Random,
                             precision: str, eval_name: str = "dev") -> Objective:
    """Fine-tuning as an objective: evaluated at every epoch's end; the best model is the most
    accurate one (on a tie, the one with the lower loss)."""
    steps_per_epoch = math.ceil(len(rows) / settings.batch_size)

    def evaluate_dev(model: Transformer) -> dict[str, float]:
        metrics = evaluate(model, eval_rows, eval_labels, pad, settings.eval_batch_size,
                           precision)
        return {f"{eval_name}_{k}": v for k, v in metrics.items()}

    batches = LabelledBatches(rows, labels, settings.batch_size, pad, rng)
    return Objective(
        batches=batches, loss=classification_loss, evaluate=evaluate_dev,
        best=[(f"{eval_name}_accuracy", "max"), (f"{eval_name}_loss", "min")],
        unit="examples", count=lambda batch: int(batch[0].shape[0]),
        eval_due=lambda step: step % steps_per_epoch == 0,
        progress=lambda: {"epoch": round(batches.epoch + batches.index / len(batches.order), 3)})


def finetune_classifier(model: Transformer, tokenizer: Tokenizer,
                        train: LabelledData | tuple[Sequence[str], Sequence[str]],
                        dev: LabelledData | tuple[Sequence[str], Sequence[str]] | None = None,
                        settings: ClassifySettings | None = None,
                        out: str | Path | None = None, resume: bool = False,
                        callback: Callable[[dict[str, Any]], None] | None = None,
                        overwrite: bool = False, base: str | None = None) -> ClassifyResult:
    """Fine-tune `model` (plus a new head) on labelled texts; return the best model and figures.

    Evaluates on `dev` after every epoch (and every `eval_every` steps); the best model by dev
    accuracy is kept and, when `out` is given, saved there (config.json with the labels,
    model.safetensors, tokenizer.json), next to log.jsonl and training/, the state that
    `resume=True` continues exactly after Ctrl-C or a crash. `callback` receives every log
    record. A model already in `out` is replaced only with `overwrite=True` (or continued with
    `resume=True`). With `settings.lora_rank`, only LoRA updates and the head are trained, and
    `out` receives the adapter (qkv.lora.save_adapter) instead of a full model; `base` names the
    base model in it, so that `qkv.load(out)` finds it.
    """
    s = settings or ClassifySettings()
    s.check()
    if out is not None and not resume:
        check_new_output(out, overwrite)
    t0 = time.perf_counter()
    train = as_labelled(train, "training data")
    dev = as_labelled(dev, "dev data") if dev is not None else None
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    if s.max_train_examples is not None:
        train = train.subset(s.max_train_examples, rng)
    eval_data = dev if dev is not None else train
    names, train_y, eval_y = class_ids(train, eval_data, s.label_names)

    model = with_classifier(model, names, s.pooling)
    if s.lora_rank is not None:
        apply_lora(model, s.lora_rank, s.lora_alpha, s.lora_targets)
        print(f"qkv finetune: LoRA rank {s.lora_rank} on {s.lora_targets}; "
              f"{describe_trainable(model)}", file=sys.stderr)
    device = model_device(model)
    precision = resolve_precision(s.precision, device)
    max_length = min(s.max_length, model.config.max_seq_len)
    train_rows = encode_texts(tokenizer, train.texts, max_length, model.config.family)
    eval_rows = encode_texts(tokenizer, eval_data.texts, max_length, model.config.family)
    eval_name = "dev" if dev is not None else "train"
    objective = classification_objective(train_rows, train_y, eval_rows, eval_y,
                                         pad_id(tokenizer), s, rng, precision, eval_name)
    total = math.ceil(len(train_rows) / s.batch_size) * s.epochs
    optimizer = make_optimizer(model, s.lr, s.weight_decay, betas=(0.9, 0.999),
                               fused=device.type in ("cpu", "cuda"))
    loop = LoopConfig(
        max_steps=total, schedule=Schedule(s.lr, max(1, int(s.warmup * total)), decay="linear"),
        time_limit=s.time_limit, grad_clip=s.grad_clip, eval_every=s.eval_every, device=device,
        precision=precision, compile=s.compile, progress=s.progress, name="finetune")
    out = Path(out) if out is not None else None
    if out is not None and not resume and distributed.is_main():  # rank 0 writes (torchrun)
        out.mkdir(parents=True, exist_ok=True)
        if s.lora_rank is None:  # a LoRA run saves an adapter instead (below)
            model.config.to_json(out / CONFIG)
        tokenizer.save(out / TOKENIZER)
    model.train()
    result = fit(model, optimizer, objective, loop, out, resume,
                 {"settings": asdict(s), "labels": names}, callback)
    model.eval()
    if out is not None:
        load_weights(model, out / WEIGHTS)  # return the best model, as saved
    elif result.best_state is not None:
        model.load_state_dict(result.best_state)
    if out is not None and s.lora_rank is not None:
        save_adapter(model, out, base=base)
    best = result.best or {}
    return ClassifyResult(
        model=model, labels=names, train_examples=len(train_rows),
        eval_examples=len(eval_rows), evaluated_on=eval_name,
        epochs=round(result.step / math.ceil(len(train_rows) / s.batch_size), 3),
        steps=result.step, best_accuracy=best.get(f"{eval_name}_accuracy", 0.0),
        best_macro_f1=best.get(f"{eval_name}_macro_f1", 0.0), best_step=result.best_step,
        wall_s=round(time.perf_counter() - t0, 1), precision=precision,
        stopped_by_time_limit=result.stopped_by == "time limit", history=result.history,
        out=out, stopped_by=result.stopped_by)


def finetune_classify_files(model: str | Path | tuple, train: str | Path,
                            dev: str | Path | None = None, out: str | Path | None = None,
                            text_column: str = "sentence", label_column: str = "label",
                            settings: ClassifySettings | None = None,
                            device: str = "cpu", resume: bool = False,
                            overwrite: bool = False) -> ClassifyResult:
    """:func:`finetune_classifier` from files: load the model (a directory, a name such as
    "all-MiniLM-L6-v2", or a (model, tokenizer) pair) onto `device`, read the data, fine-tune,
    save."""
    if out is not None and not resume:
        check_new_output(out, overwrite)  # before the (slow) loading
    train_data = read_labelled(train, text_column, label_column)
    dev_data = read_labelled(dev, text_column, label_column) if dev is not None else None
    net, tokenizer = load_model(model, device=device)
    base = str(model) if isinstance(model, (str, Path)) else None
    return finetune_classifier(net, tokenizer, train_data, dev_data, settings, out, resume,
                               overwrite=overwrite, base=base)
