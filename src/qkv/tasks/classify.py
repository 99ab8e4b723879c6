"""Sequence classification: put a small head on a pretrained Transformer and fine-tune it.

    text -> tokenizer -> Transformer -> one vector per text (pooling) -> Linear -> class scores

The head is one `nn.Linear(d_model, num_labels)` (`model.classifier`); the vector comes from the
encoder's [CLS] token through BERT's pooler, from the mean of the token vectors, or, for a
decoder (GPT), from the last token, the only one that has seen the whole text. Fine-tuning trains
everything, head and body, for a few epochs with a small learning rate (Devlin et al. 2019).

Labels. The class names are stored in the model's config (`config.labels`), so a saved model
knows what it predicts. They are the distinct values of the label column, sorted (numerically
when every value is an integer, so "2" comes before "10"). `label_names` renames them in that
order: SST-2's "0"/"1" become "negative"/"positive" with label_names=["negative", "positive"].

Input files: .tsv (tab-separated, no quoting, as GLUE ships them), .csv (comma-separated, with
quoting) or .jsonl (one JSON object per line). The first line of a .tsv/.csv is the header.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from ..errors import InputError
from .common import (
    autocast,
    bucketed_batches,
    evaluating,
    load_model,
    model_device,
    pad_batch,
    pad_id_of,
    resolve_precision,
    sorted_batches,
)

if TYPE_CHECKING:
    from ..model import Transformer
    from ..tokenizer import Tokenizer

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
POOLINGS = ("mean", "cls", "last", "max", "pooler")


# ---------------------------------------------------------------------------- reading data


@dataclass
class LabelledData:
    """Texts with their raw labels (strings), and the file line each came from."""

    texts: list[str]
    labels: list[str]
    lines: list[int] = field(default_factory=list)
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.texts)


def read_labelled(path: str | Path, text_column: str = "sentence",
                  label_column: str = "label") -> LabelledData:
    """Read a .tsv, .csv or .jsonl file of labelled texts (format from the file's extension)."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: unknown file type {path.suffix!r}; use .tsv, .csv or .jsonl")
    if not path.is_file():
        raise InputError(f"file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path} is not valid UTF-8 text (line {line})") from None
    if kind == "jsonl":
        columns, records = None, _jsonl_records(path, text)
    else:
        columns, records = _table_records(path, text, "\t" if kind == "tsv" else ",")
    for column in (text_column, label_column):
        if columns is not None and column not in columns:
            raise InputError(f"{path}: no {column!r} column; the columns are: "
                             f"{', '.join(columns)}")
    data = LabelledData([], [], [], str(path))
    for line, record in records:
        for column in (text_column, label_column):
            if column not in record:
                raise InputError(f"{path} line {line}: no {column!r} key; the keys are: "
                                 f"{', '.join(record) or 'none'}")
        label = record[label_column]
        if label is None or str(label).strip() == "":
            raise InputError(f"{path} line {line}: the label is empty")
        data.texts.append(str(record[text_column]).strip())
        data.labels.append(str(label).strip())
        data.lines.append(line)
    if not data.texts:
        raise InputError(f"{path} has no examples")
    return data


def _table_records(path: Path, text: str,
                   delimiter: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(header, [(line number, {column: value})]) of a .tsv or .csv file."""
    if delimiter == "\t":  # GLUE style: no quoting at all, a quote is just a character
        rows = [line.rstrip("\r").split("\t") for line in text.split("\n")]
    else:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    numbered = [(i + 1, r) for i, r in enumerate(rows) if any(cell.strip() for cell in r)]
    if not numbered:
        raise InputError(f"{path} is empty")
    header = [h.strip() for h in numbered[0][1]]
    records = []
    for line, row in numbered[1:]:
        if len(row) != len(header):
            raise InputError(f"{path} line {line} has {len(row)} fields but the header has "
                             f"{len(header)}")
        records.append((line, dict(zip(header, row, strict=True))))
    return header, records


def _jsonl_records(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    records = []
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {i + 1} is not valid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise InputError(f"{path} line {i + 1} is not a JSON object")
        records.append((i + 1, value))
    return records


def label_order(raw_labels: Sequence[str]) -> list[str]:
    """The distinct labels, sorted; numerically when they are all integers."""
    distinct = set(raw_labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


# ---------------------------------------------------------------------------- the model


def with_classifier(model: Transformer, labels: Sequence[str],
                    pooling: str | None = None) -> Transformer:
    """A copy of `model` with a classification head for `labels` (a fresh head, unless the model
    already has one for exactly these labels).

    pooling: how a text becomes one vector: "mean", "cls", "last", "max", or "pooler" (BERT's
    dense + tanh on [CLS]). None keeps the model's own choice, except for a decoder, which
    always uses "last" (its other tokens have not seen the end of the text).
    """
    from ..model import Transformer

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


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_length: int,
                 family: str = "encoder") -> list[list[int]]:
    """Token ids per text, truncated to `max_length`.

    An encoder's tokenizer wraps each text as [CLS] ... [SEP]. For a decoder the end-of-text
    token is appended, so the last token (the one that is pooled) is always the same kind.
    """
    add_eos = family == "decoder" and tokenizer.eos_id is not None
    room = max_length - 1 if add_eos else max_length
    rows = tokenizer.encode_batch(list(texts), truncation=True, max_length=room)["input_ids"]
    if add_eos:
        rows = [r + [tokenizer.eos_id] for r in rows]
    pad = pad_id_of(tokenizer)
    return [r if r else [pad] for r in rows]


# ---------------------------------------------------------------------------- metrics


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


def class_scores(model: Transformer, rows: Sequence[Sequence[int]], pad_id: int,
                 batch_size: int = 128, precision: str = "fp32") -> torch.Tensor:
    """Logits (N, num_labels) for pre-tokenized rows, in their original order."""
    device = model_device(model)
    out = torch.empty(len(rows), model.config.num_labels)
    with evaluating(model), autocast(precision, device):
        for batch in sorted_batches([len(r) for r in rows], batch_size):
            ids, mask = pad_batch([rows[i] for i in batch], pad_id, device)
            out[batch] = model.classify(ids, mask).float().cpu()
    return out


def evaluate(model: Transformer, rows: Sequence[Sequence[int]], gold: Sequence[int],
             pad_id: int, batch_size: int = 128, precision: str = "fp32") -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of the classifier on labelled rows."""
    logits = class_scores(model, rows, pad_id, batch_size, precision)
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
    logits = class_scores(model, rows, pad_id_of(tokenizer), batch_size,
                          resolve_precision(precision, model_device(model)))
    return logits.softmax(-1)


# ---------------------------------------------------------------------------- fine-tuning


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
    time_limit: float | None = None  # seconds; stop (evaluate, keep the best) when reached
    precision: str = "auto"         # "auto" | "bf16" | "fp32"
    eval_every: int | None = None   # also evaluate every N steps (besides each epoch's end)
    pooling: str | None = None      # see with_classifier
    label_names: list[str] | None = None
    seed: int = 0
    grad_clip: float = 1.0
    eval_batch_size: int = 128
    progress: bool = True

    def check(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1")
        if self.max_length < 2:
            raise InputError("max-length must be at least 2 tokens")
        if self.lr <= 0:
            raise InputError(f"lr={self.lr} must be positive")
        if not 0 <= self.warmup < 1:
            raise InputError(f"warmup={self.warmup} must be a fraction in [0, 1)")
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise InputError("max-train-examples must be at least 1")
        if self.eval_every is not None and self.eval_every < 1:
            raise InputError("eval-every must be at least 1 step")
        resolve_precision(self.precision)


@dataclass
class ClassifyResult:
    """What a fine-tuning run did. Metrics are on the dev set (or the training set without one)."""

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

    def summary(self) -> dict[str, Any]:
        keep = asdict(self)
        keep.pop("model")
        keep["out"] = str(self.out) if self.out else None
        return keep


def finetune_classifier(model: Transformer, tokenizer: Tokenizer,
                        train: LabelledData | tuple[Sequence[str], Sequence[str]],
                        dev: LabelledData | tuple[Sequence[str], Sequence[str]] | None = None,
                        settings: ClassifySettings | None = None,
                        out: str | Path | None = None) -> ClassifyResult:
    """Fine-tune `model` (plus a new head) on labelled texts; return the best model and figures.

    Evaluates on `dev` after every epoch (and every `eval_every` steps); the best model by dev
    accuracy is kept and, when `out` is given, saved there with `qkv.save` (config.json with the
    labels, model.safetensors, tokenizer.json), next to a log.jsonl of every evaluation.
    """
    from ..checkpoint import save

    s = settings or ClassifySettings()
    s.check()
    t0 = time.perf_counter()
    train = _as_data(train, "training data")
    dev = _as_data(dev, "dev data") if dev is not None else None
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    if s.max_train_examples is not None and s.max_train_examples < len(train):
        keep = sorted(rng.sample(range(len(train)), s.max_train_examples))
        train = LabelledData([train.texts[i] for i in keep], [train.labels[i] for i in keep],
                             [train.lines[i] for i in keep], train.source)

    # Class names: the sorted raw labels, optionally renamed.
    raw = label_order(train.labels)
    if len(raw) < 2:
        raise InputError(f"{train.source}: every example has the label {raw[0]!r}; a classifier "
                         "needs at least two classes")
    names = list(raw)
    if s.label_names:
        if len(s.label_names) != len(raw):
            raise InputError(f"{len(s.label_names)} label names given ({', '.join(s.label_names)})"
                             f" but the data has {len(raw)} labels ({', '.join(raw)})")
        names = list(s.label_names)
    index = {r: i for i, r in enumerate(raw)}
    train_y = [index[r] for r in train.labels]
    eval_data = dev if dev is not None else train
    for label, line in zip(eval_data.labels, eval_data.lines or [0] * len(eval_data), strict=True):
        if label not in index:
            where = f" line {line}" if line else ""
            raise InputError(f"{eval_data.source}{where}: label {label!r} does not occur in the "
                             f"training data (labels: {', '.join(raw)})")
    eval_y = [index[r] for r in eval_data.labels]

    model = with_classifier(model, names, s.pooling)
    device = model_device(model)
    precision = resolve_precision(s.precision, device)
    family = model.config.family
    max_length = min(s.max_length, model.config.max_seq_len)
    pad = pad_id_of(tokenizer)
    train_rows = encode_texts(tokenizer, train.texts, max_length, family)
    eval_rows = encode_texts(tokenizer, eval_data.texts, max_length, family)
    lengths = [len(r) for r in train_rows]

    # AdamW with decoupled weight decay, not applied to biases and norm gains (1-D tensors).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    try:  # the fused kernel updates all tensors in one pass: ~5x faster than the loop on a CPU
        optimizer = torch.optim.AdamW(groups, lr=s.lr, fused=True)
    except (RuntimeError, TypeError):  # an older torch, or a device without the fused kernel
        optimizer = torch.optim.AdamW(groups, lr=s.lr)
    steps_per_epoch = math.ceil(len(train_rows) / s.batch_size)
    total = steps_per_epoch * s.epochs
    warmup = max(1, int(s.warmup * total))
    # Linear warm-up to lr, then linear decay to 0 at the last step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda k: k / warmup if k < warmup else max(0.0, (total - k) / max(1, total - warmup)))

    out = Path(out) if out is not None else None
    log_path = out / "log.jsonl" if out is not None else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("", encoding="utf-8")
    history: list[dict[str, Any]] = []
    best = {"accuracy": -1.0, "macro_f1": 0.0, "loss": math.inf, "step": 0}
    best_state: dict[str, torch.Tensor] | None = None
    step, seen, running, stopped = 0, 0, 0.0, False
    eval_name = "dev" if dev is not None else "train"

    def run_eval(epoch: float) -> None:
        nonlocal best_state
        metrics = evaluate(model, eval_rows, eval_y, pad, s.eval_batch_size, precision)
        record = {"step": step, "epoch": round(epoch, 3),
                  "train_loss": round(running / max(1, step_in_window), 5),
                  f"{eval_name}_loss": round(metrics["loss"], 5),
                  f"{eval_name}_accuracy": round(metrics["accuracy"], 5),
                  f"{eval_name}_macro_f1": round(metrics["macro_f1"], 5),
                  "lr": scheduler.get_last_lr()[0],
                  "examples_per_s": round(seen / max(1e-9, time.perf_counter() - t_train), 1),
                  "elapsed_s": round(time.perf_counter() - t0, 1)}
        history.append(record)
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        # Best = highest accuracy; on a tie, the lower loss (the more confident model).
        if (metrics["accuracy"], -metrics["loss"]) > (best["accuracy"], -best["loss"]):
            best.update(accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"],
                        loss=metrics["loss"], step=step)
            if out is not None:
                save(model, tokenizer, out)
            else:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if s.progress:
            bar.write(f"step {step} epoch {epoch:.2f}: {eval_name} accuracy "
                      f"{metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}")

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="finetune", unit="step", disable=not s.progress)
    t_train = time.perf_counter()
    step_in_window = 0
    model.train()
    epochs_done = 0.0
    for epoch in range(s.epochs):
        batches = bucketed_batches(lengths, s.batch_size, rng)
        for n, batch in enumerate(batches):
            ids, mask = pad_batch([train_rows[i] for i in batch], pad, device)
            target = torch.tensor([train_y[i] for i in batch], device=device)
            with autocast(precision, device):
                logits = model.classify(ids, mask)  # (B, num_labels)
            loss = F.cross_entropy(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            seen += len(batch)
            running += loss.item()
            step_in_window += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / step_in_window:.4f}")
            epochs_done = epoch + (n + 1) / len(batches)
            out_of_time = s.time_limit is not None and time.perf_counter() - t0 > s.time_limit
            if (s.eval_every and step % s.eval_every == 0 and n + 1 < len(batches)) or (
                    out_of_time and n + 1 < len(batches)):
                run_eval(epochs_done)
                running, step_in_window = 0.0, 0
                model.train()
            if out_of_time:
                stopped = True
                break
        if not stopped or not history or history[-1]["step"] != step:
            run_eval(epochs_done)
            running, step_in_window = 0.0, 0
            model.train()
        if stopped:
            break
    bar.close()
    model.eval()
    if out is not None:
        from ..checkpoint import load_weights

        load_weights(model, out / "model.safetensors")  # return the best model, as saved
    elif best_state is not None:
        model.load_state_dict(best_state)
    return ClassifyResult(
        model=model, labels=names, train_examples=len(train_rows),
        eval_examples=len(eval_rows), evaluated_on=eval_name, epochs=round(epochs_done, 3),
        steps=step, best_accuracy=best["accuracy"], best_macro_f1=best["macro_f1"],
        best_step=best["step"], wall_s=round(time.perf_counter() - t0, 1), precision=precision,
        stopped_by_time_limit=stopped, history=history, out=out)


def finetune_classify_files(model: str | Path | tuple, train: str | Path,
                            dev: str | Path | None = None, out: str | Path | None = None,
                            text_column: str = "sentence", label_column: str = "label",
                            settings: ClassifySettings | None = None,
                            device: str = "cpu") -> ClassifyResult:
    """:func:`finetune_classifier` from files: load the model (a directory, a name such as
    "all-MiniLM-L6-v2", or a (model, tokenizer) pair) onto `device`, read the data, fine-tune,
    save."""
    train_data = read_labelled(train, text_column, label_column)
    dev_data = read_labelled(dev, text_column, label_column) if dev is not None else None
    net, tokenizer = load_model(model, device=device)
    return finetune_classifier(net, tokenizer, train_data, dev_data, settings, out)


def _as_data(data: LabelledData | tuple[Sequence[str], Sequence[str]], what: str) -> LabelledData:
    if isinstance(data, LabelledData):
        result = data
    else:
        texts, labels = data
        if len(texts) != len(labels):
            raise InputError(f"{what}: {len(texts)} texts but {len(labels)} labels")
        result = LabelledData(list(texts), [str(x) for x in labels], [], what)
    if len(result) == 0:
        raise InputError(f"{what} has no examples")
    if not result.lines:
        result.lines = [0] * len(result)
    return result
