"""Labelled text for classification: .tsv (tab-separated, no quoting, as GLUE ships them), .csv
(comma-separated, with quoting) or .jsonl (one JSON object per line). The first line of a .tsv or
.csv is the header, naming the columns.

    data = read_labelled("train.tsv", text_column="sentence", label_column="label")
    data.texts, data.labels, data.lines        # labels are the raw strings of the file
    label_order(data.labels)                   # the class names, sorted (numerically if ints)
    LabelledBatches(rows, labels, 32, pad, rng)   # shuffled (ids, mask, labels), resumable
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batching import bucketed_batches, pad_id, pad_rows
from ..errors import InputError
from ..tokenizer import Tokenizer
from .corpus import jsonl_values, read_text_file

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass
class LabelledData:
    """Texts with their raw labels (strings), and the file line each came from."""

    texts: list[str]
    labels: list[str]
    lines: list[int] = field(default_factory=list)
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int, rng: random.Random) -> LabelledData:
        """`n` examples drawn at random (in file order); all of them if there are no more."""
        if n >= len(self):
            return self
        keep = sorted(rng.sample(range(len(self)), n))
        return LabelledData([self.texts[i] for i in keep], [self.labels[i] for i in keep],
                            [self.lines[i] for i in keep], self.source)


def read_labelled(path: str | Path, text_column: str = "sentence",
                  label_column: str = "label") -> LabelledData:
    """Read a .tsv, .csv or .jsonl file of labelled texts (format from the file's extension)."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: unknown file type {path.suffix!r}; use .tsv, .csv or .jsonl")
    text = read_text_file(path)
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
        # A long text is not a mistake: let a field be as long as the file (csv's default
        # limit, 128k characters, would stop at a long document).
        csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
        try:
            rows = list(csv.reader(io.StringIO(text, newline="")))
        except csv.Error as e:
            raise InputError(f"{path} is not a readable CSV file ({e})") from None
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
    for number, value in jsonl_values(path, text):
        if not isinstance(value, dict):
            raise InputError(f"{path} line {number} is not a JSON object")
        records.append((number, value))
    return records


def label_order(raw_labels: Sequence[str]) -> list[str]:
    """The distinct labels, sorted; numerically when they are all integers."""
    distinct = set(raw_labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def class_ids(train: LabelledData, evaluated: LabelledData, label_names: Sequence[str] | None
               ) -> tuple[list[str], list[int], list[int]]:
    """(class names, class ids of `train`, of `evaluated`): the names are the sorted raw labels
    of the training data, optionally renamed; every evaluated label must occur in training."""
    raw = label_order(train.labels)
    if len(raw) < 2:
        raise InputError(f"{train.source}: every example has the label {raw[0]!r}; a classifier "
                         "needs at least two classes")
    if label_names and len(label_names) != len(raw):
        raise InputError(f"{len(label_names)} label names given ({', '.join(label_names)})"
                         f" but the data has {len(raw)} labels ({', '.join(raw)})")
    index = {r: i for i, r in enumerate(raw)}
    for label, line in zip(evaluated.labels, evaluated.lines, strict=True):
        if label not in index:
            where = f" line {line}" if line else ""
            raise InputError(f"{evaluated.source}{where}: label {label!r} does not occur in the "
                             f"training data (labels: {', '.join(raw)})")
    return (list(label_names or raw), [index[r] for r in train.labels],
            [index[r] for r in evaluated.labels])


def as_labelled(data: LabelledData | tuple[Sequence[str], Sequence[str]],
                what: str) -> LabelledData:
    """`data` as LabelledData: a (texts, labels) pair is converted; neither may be empty."""
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
    pad = pad_id(tokenizer)
    return [r if r else [pad] for r in rows]


class LabelledBatches:
    """Training batches (ids (B, T), mask (B, T), labels (B,)), epoch after epoch: each epoch
    is shuffled into length buckets (batching.bucketed_batches). Resumable: the state is the
    epoch, the position in it and the random generator's state at the epoch's start."""

    def __init__(self, rows: Sequence[Sequence[int]], labels: Sequence[int], batch_size: int,
                 pad: int, rng: random.Random):
        self.rows, self.labels, self.batch_size, self.pad, self.rng = (
            rows, labels, batch_size, pad, rng)
        self.lengths = [len(r) for r in rows]
        self.epoch, self.index = 0, 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.rng_at_start = self.rng.getstate()
        self.order = bucketed_batches(self.lengths, self.batch_size, self.rng)

    def __iter__(self) -> LabelledBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.index == len(self.order):
            self.epoch, self.index = self.epoch + 1, 0
            self._start_epoch()
        batch = self.order[self.index]
        self.index += 1
        ids, mask = pad_rows([self.rows[i] for i in batch], self.pad)  # (B, T) each
        return ids, mask, torch.tensor([self.labels[i] for i in batch])

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng_at_start
        return {"epoch": self.epoch, "index": self.index, "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.epoch = state["epoch"]
        self._start_epoch()
        self.index = state["index"]
