"""Parallel text for translation: sentence pairs, a joint tokenizer, and token-budget batches.

    data = read_parallel("multi30k/", "de", "en", "train")   # train.de + train.en, line by line
    data = read_parallel("en_pt.tsv", "en", "pt")            # or one TSV: source TAB target
    tok = joint_tokenizer(data, vocab_size=8000)             # one BPE for both languages
    pairs = encode_pairs(data, tok, max_len=128)             # too-long pairs skipped, counted
    batch = next(TokenBatches(pairs, max_tokens=4096, pad=tok.pad_id, seed=0))

A pair is a source sentence and its translation. They come in two shapes on disk:

- two line-aligned files, `train.de` and `train.en` (optionally gzipped: `train.de.gz`): line i
  of one is the translation of line i of the other;
- one TSV file, one pair per line. Without a header the source is the first column and the
  target the second; a header line naming the languages (`en<TAB>pt`) lets --src/--tgt pick
  the columns, so one file serves both directions.

A bad line never silently shifts the pairs: files whose line counts differ are refused, and a
pair that cannot be used (an empty side, bytes that are not UTF-8, a TSV line without exactly
two columns) is skipped and counted in `ParallelData.skipped`, which training reports.

One tokenizer is trained on both sides (a joint byte-level BPE), so the source, target and
output embeddings can be one matrix (Vaswani et al. 2017, section 3.4; Press & Wolf 2017).
"""

from __future__ import annotations

import gzip
import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batching import pad_rows
from ..errors import InputError
from ..tokenizer import Tokenizer

#: The special tokens of a translation tokenizer: padding, start of the target, end of a side.
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

#: A TSV header cell: a language code such as en, pt, pt-BR or zh_Hant.
_LANGUAGE = re.compile(r"[a-z]{2,3}([-_][A-Za-z]{2,4})?")

#: What a skipped pair is counted as.
SKIP_REASONS = ("empty side", "invalid UTF-8", "not two columns", "too long")


@dataclass
class ParallelData:
    """Sentence pairs, source and target, with the number of pairs skipped by reason."""

    src: list[str]
    tgt: list[str]
    src_lang: str = "src"
    tgt_lang: str = "tgt"
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.src)

    def subset(self, indices: Sequence[int]) -> ParallelData:
        return ParallelData([self.src[i] for i in indices], [self.tgt[i] for i in indices],
                            self.src_lang, self.tgt_lang, Counter(self.skipped))

    def skipped_report(self) -> str:
        """'3 pairs skipped (2 empty side, 1 invalid UTF-8)', or '' when none were."""
        total = sum(self.skipped.values())
        if not total:
            return ""
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"{total} pair{'s' * (total != 1)} skipped ({parts})"


# ---------------------------------------------------------------------- reading

def _lines(path: Path) -> list[bytes]:
    """The lines of a file as bytes (a .gz file is unpacked); a final newline ends the last."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.rstrip(b"\r") for line in lines]


def _text(line: bytes) -> str | None:
    try:
        return line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_aligned(src_path: str | Path, tgt_path: str | Path, src_lang: str = "src",
                 tgt_lang: str = "tgt") -> ParallelData:
    """Pairs from two line-aligned files (line i of one translates line i of the other)."""
    src_lines, tgt_lines = _lines(Path(src_path)), _lines(Path(tgt_path))
    if len(src_lines) != len(tgt_lines):
        raise InputError(f"{src_path} has {len(src_lines)} lines but {tgt_path} has "
                         f"{len(tgt_lines)}: the two sides of a parallel corpus must align "
                         "line by line")
    data = ParallelData([], [], src_lang, tgt_lang)
    for a, b in zip(src_lines, tgt_lines, strict=True):
        _add(data, _text(a), _text(b))
    return data


def read_tsv(path: str | Path, src_lang: str | None = None,
             tgt_lang: str | None = None) -> ParallelData:
    """Pairs from a TSV file: source TAB target, or the columns a header line names."""
    lines = _lines(Path(path))
    first = (_text(lines[0]) or "").split("\t") if lines else []
    columns = (0, 1)
    if len(first) == 2 and all(_LANGUAGE.fullmatch(cell) for cell in first):  # a header
        if src_lang is None or tgt_lang is None:
            src_lang, tgt_lang = first
        missing = [lang for lang in (src_lang, tgt_lang) if lang not in first]
        if missing:
            raise InputError(f"{path} has columns {first[0]!r} and {first[1]!r}, not "
                             f"{missing[0]!r}")
        columns = (first.index(src_lang), first.index(tgt_lang))  # picked by name
        lines = lines[1:]
    data = ParallelData([], [], src_lang or "src", tgt_lang or "tgt")
    for line in lines:
        text = _text(line)
        if text is None:
            data.skipped["invalid UTF-8"] += 1
            continue
        cells = line.decode("utf-8").rstrip("\n").split("\t")
        if len(cells) != 2:
            data.skipped["not two columns"] += 1
            continue
        _add(data, cells[columns[0]].strip(), cells[columns[1]].strip())
    return data


def _add(data: ParallelData, src: str | None, tgt: str | None) -> None:
    if src is None or tgt is None:
        data.skipped["invalid UTF-8"] += 1
    elif not src or not tgt:
        data.skipped["empty side"] += 1
    else:
        data.src.append(src)
        data.tgt.append(tgt)


def read_parallel(path: str | Path, src_lang: str, tgt_lang: str,
                  split: str = "train") -> ParallelData:
    """One split of a corpus: a folder holding `{split}.{src}` + `{split}.{tgt}` (or
    `{split}.tsv`), or a TSV file (which is the split itself)."""
    path = Path(path)
    if path.is_file():
        return read_tsv(path, src_lang, tgt_lang)
    if not path.is_dir():
        raise InputError(f"{path} does not exist (expected a folder of parallel files or a "
                         "TSV file)")
    src, tgt = _find(path, f"{split}.{src_lang}"), _find(path, f"{split}.{tgt_lang}")
    if src is not None and tgt is not None:
        return read_aligned(src, tgt, src_lang, tgt_lang)
    tsv = _find(path, f"{split}.tsv")
    if tsv is not None:
        return read_tsv(tsv, src_lang, tgt_lang)
    raise InputError(f"{path} holds neither {split}.{src_lang} + {split}.{tgt_lang} nor "
                     f"{split}.tsv")


def has_split(path: str | Path, src_lang: str, tgt_lang: str, split: str) -> bool:
    path = Path(path)
    if not path.is_dir():
        return False
    return ((_find(path, f"{split}.{src_lang}") is not None
             and _find(path, f"{split}.{tgt_lang}") is not None)
            or _find(path, f"{split}.tsv") is not None)


def hash_split(data: ParallelData, held_out: int, salt: str = "qkv") -> tuple[ParallelData,
                                                                              ParallelData]:
    """(rest, held out): the `held_out` pairs whose sha256(salt, source, target) is smallest.

    Deterministic, independent of the order of the file, and stable when pairs are added."""
    if not 0 < held_out < len(data):
        raise InputError(f"cannot hold out {held_out} of {len(data)} pairs")
    keys = [hashlib.sha256(f"{salt}\t{s}\t{t}".encode()).hexdigest()
            for s, t in zip(data.src, data.tgt, strict=True)]
    order = sorted(range(len(data)), key=keys.__getitem__)
    out = sorted(order[:held_out])
    rest = sorted(order[held_out:])
    return data.subset(rest), data.subset(out)


# ---------------------------------------------------------------------- tokens

def joint_tokenizer(data: ParallelData, vocab_size: int = 8000) -> Tokenizer:
    """One byte-level BPE learned from both sides, with <pad> <s> </s> <unk> at ids 0-3."""
    return Tokenizer.train([*data.src, *data.tgt], kind="bpe", vocab_size=vocab_size,
                           special_tokens=SPECIALS)


def translation_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(pad, start of target, end) ids of a translation tokenizer."""
    pad, bos, eos = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id
    if eos is None:
        raise InputError("the tokenizer has no end-of-sentence token (</s>)")
    pad = pad if pad is not None else eos
    return pad, bos if bos is not None else pad, eos


@dataclass
class Pairs:
    """Token ids of pairs: source + </s>, and target as <s> ... </s> (the decoder reads all but
    the last and predicts all but the first)."""

    src: list[list[int]]
    tgt: list[list[int]]
    skipped: Counter

    def __len__(self) -> int:
        return len(self.src)


def encode_pairs(data: ParallelData, tokenizer: Tokenizer, max_len: int,
                 skip_long: bool = True, bpe_dropout: float = 0.0,
                 rng: random.Random | None = None) -> Pairs:
    """Encode both sides; a pair with a side longer than `max_len` tokens (with its special
    tokens) is skipped and counted, or, with skip_long=False, cut to fit (for evaluation).
    With `bpe_dropout`, each side is segmented at random (Tokenizer.encode_sampled, drawn from
    `rng`): one epoch's view of the training data."""
    _, bos, eos = translation_ids(tokenizer)
    if bpe_dropout:
        rng = rng if rng is not None else random.Random(0)
        srcs = tokenizer.encode_sampled(data.src, bpe_dropout, rng)
        tgts = tokenizer.encode_sampled(data.tgt, bpe_dropout, rng)
    else:
        srcs = tokenizer.encode_batch(data.src, add_special_tokens=False)["input_ids"]
        tgts = tokenizer.encode_batch(data.tgt, add_special_tokens=False)["input_ids"]
    out = Pairs([], [], Counter(data.skipped))
    for s, t in zip(srcs, tgts, strict=True):
        s, t = [*s, eos], [bos, *t, eos]
        if len(s) > max_len or len(t) > max_len:
            if skip_long:
                out.skipped["too long"] += 1
                continue
            s, t = [*s[:max_len - 1], eos], [*t[:max_len - 1], eos]
        out.src.append(s)
        out.tgt.append(t)
    return out


# ---------------------------------------------------------------------- batches

def token_batches(src_lengths: Sequence[int], tgt_lengths: Sequence[int], max_tokens: int,
                  rng: random.Random, bucket_size: int = 4096) -> list[list[int]]:
    """Shuffled batches of pair indices that each hold at most `max_tokens` tokens, padding
    included (rows x (longest source + longest target)).

    The pairs are shuffled, cut into buckets of `bucket_size`, each bucket sorted by length and
    cut greedily into batches; then the batches are shuffled. Pairs of similar length share a
    batch, so little is padding, and a batch of short sentences holds more of them."""
    order = list(range(len(src_lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), bucket_size):
        bucket = sorted(order[start:start + bucket_size],
                        key=lambda i: (tgt_lengths[i], src_lengths[i]))
        batch: list[int] = []
        longest_src = longest_tgt = 0
        for i in bucket:
            s, t = max(longest_src, src_lengths[i]), max(longest_tgt, tgt_lengths[i])
            if batch and (len(batch) + 1) * (s + t) > max_tokens:
                batches.append(batch)
                batch, s, t = [], src_lengths[i], tgt_lengths[i]
            batch.append(i)
            longest_src, longest_tgt = s, t
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


class TokenBatches:
    """Training batches (src (B, S), src_mask (B, S), tgt (B, T), tgt_mask (B, T)), epoch after
    epoch, each at most `max_tokens` tokens. Resumable: the state is the epoch, the position in
    it and the seed, from which every epoch's order is made again.

    `resample(epoch)`, if given, makes each epoch's pairs afresh (BPE-dropout: the same
    sentences, segmented another way); it must give the same pairs for the same epoch, so that
    a resumed run reads what it would have read."""

    def __init__(self, pairs: Pairs, max_tokens: int, pad: int, seed: int = 0,
                 resample: Callable[[int], Pairs] | None = None):
        self.pairs, self.max_tokens, self.pad, self.seed = pairs, max_tokens, pad, seed
        self.resample = resample
        self.epoch, self.index = 0, 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        if self.resample is not None:
            self.pairs = self.resample(self.epoch)
        pairs = self.pairs
        longest = max((len(s) + len(t) for s, t in zip(pairs.src, pairs.tgt, strict=True)),
                      default=0)
        if not len(pairs):
            raise InputError("no training pairs are left to batch")
        if self.max_tokens < longest:
            raise InputError(f"max_tokens={self.max_tokens} is smaller than the longest pair "
                             f"({longest} tokens); raise it or lower the length limit")
        self.src_lengths = [len(s) for s in pairs.src]
        self.tgt_lengths = [len(t) for t in pairs.tgt]
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        self.order = token_batches(self.src_lengths, self.tgt_lengths, self.max_tokens, rng)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self.index == len(self.order):
            self.epoch, self.index = self.epoch + 1, 0
            self._start_epoch()
        rows = self.order[self.index]
        self.index += 1
        return collate(self.pairs, rows, self.pad)

    @property
    def progress(self) -> float:
        """Epochs done, with a fraction."""
        return self.epoch + self.index / max(1, len(self.order))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch = state["seed"], state["epoch"]
        self._start_epoch()
        self.index = state["index"]


def collate(pairs: Pairs, rows: Sequence[int], pad: int) -> tuple[torch.Tensor, ...]:
    """(src (B, S), src_mask (B, S), tgt (B, T), tgt_mask (B, T)) of some pairs, right-padded."""
    src, src_mask = pad_rows([pairs.src[i] for i in rows], pad)  # (B, S) each
    tgt, tgt_mask = pad_rows([pairs.tgt[i] for i in rows], pad)  # (B, T) each
    return src, src_mask, tgt, tgt_mask
