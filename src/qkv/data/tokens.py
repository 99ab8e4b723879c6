"""Tokenize a corpus once, into a memory-mapped file of token ids, and reuse it.

Training reads random windows of token ids many thousands of times. Tokenizing the text again
for every run (or holding every id of a large corpus in memory) would waste time and RAM, so the
ids are written once to a flat binary file, uint16 when the vocabulary fits in 65,536 ids and
uint32 otherwise, and opened with `np.memmap`: the operating system pages in only the windows
that are read.

The file's name holds a hash of the corpus text and of the tokenizer, so a second run on the same
text with the same tokenizer finds it and skips the work, and a changed text never reuses stale
ids. The tokenizer that a corpus trains is cached the same way.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from ..errors import InputError
from ..io import atomic_write
from ..tokenizer import Tokenizer
from .corpus import fingerprint, text_chunks

FORMAT = 1  # bump when the cache layout or the tokenization of a piece changes


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def fit_tokenizer(files: list[Path], kind: str = "char", vocab_size: int | None = None,
                  cache_dir: Path | None = None, corpus_hash: str | None = None) -> Tokenizer:
    """Train a tokenizer of `kind` on the corpus ("char" keeps every character; "bpe" learns a
    byte-level BPE of `vocab_size` tokens), or load the one a previous run trained on it."""
    corpus_hash = corpus_hash or fingerprint(files)
    key = _key(corpus_hash, kind, str(vocab_size))
    cached = cache_dir / f"tokenizer-{key}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return Tokenizer.load(cached)
    tokenizer = Tokenizer.train(text_chunks(files), kind=cast(Any, kind), vocab_size=vocab_size)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(cached)
    return tokenizer


def tokenize_corpus(files: list[Path], tokenizer: Tokenizer, cache_dir: Path,
                    corpus_hash: str | None = None, progress: bool = False) -> np.memmap:
    """All token ids of the corpus as a read-only 1-D memmap, tokenizing only on a cache miss.

    The text is streamed a megabyte at a time and the ids are appended to a temporary file that
    is renamed into place when complete: an interrupted run leaves no half-written cache.
    """
    corpus_hash = corpus_hash or fingerprint(files)
    tok_hash = hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()
    key = _key(corpus_hash, tok_hash)
    dtype = token_dtype(tokenizer.vocab_size)
    path = Path(cache_dir) / f"tokens-{key}.{dtype.name}.bin"
    if path.is_file() and path.stat().st_size % dtype.itemsize:  # cut short by a crash or copy
        print(f"qkv: warning: the token cache {path} is damaged (its size is not a whole number "
              "of tokens); tokenizing the corpus again", file=sys.stderr)
        path.unlink()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        encode = fast_encoder(tokenizer)
        total_bytes = sum(f.stat().st_size for f in files)
        bar = _progress_bar(total_bytes, progress)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as out:
                for piece in text_chunks(files):
                    out.write(encode(piece).astype(dtype, copy=False).tobytes())
                    bar.update(len(piece.encode("utf-8")))

        try:
            atomic_write(path, write)
        finally:
            bar.close()
    if path.stat().st_size == 0:
        raise InputError("the corpus holds no tokens")
    return np.memmap(path, dtype=dtype, mode="r")


def fast_encoder(tokenizer: Tokenizer):
    """A function text -> np.ndarray of ids, equal to `tokenizer.encode(text)`.

    A character-level tokenizer is a lookup table from characters to ids, which numpy applies to
    a megabyte of text in milliseconds; any other tokenizer runs the Rust backend on batches of
    lines, in parallel.
    """
    backend = tokenizer.backend
    specials = [t.content for t in backend.get_added_tokens_decoder().values()]

    def slow(text: str) -> np.ndarray:
        lines = text.splitlines(keepends=True)
        encodings = backend.encode_batch(lines, add_special_tokens=False)
        return np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64)

    if tokenizer.kind != "char" or backend.normalizer is not None:
        return slow
    chars = sorted((ord(tok), i) for tok, i in tokenizer.get_vocab().items() if len(tok) == 1)
    codes = np.array([c for c, _ in chars], dtype=np.uint32)  # sorted code points
    ids = np.array([i for _, i in chars], dtype=np.int64)
    unk = tokenizer.unk_id

    def fast(text: str) -> np.ndarray:
        if any(s in text for s in specials):  # "<pad>" in the text is one special token
            return slow(text)
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one per character
        where = np.searchsorted(codes, points).clip(max=len(codes) - 1)
        known = codes[where] == points
        if known.all():
            return ids[where]
        if unk is None:
            return slow(text)  # the backend raises its clear error for an unknown character
        return np.where(known, ids[where], unk)

    return fast


def split(tokens: np.ndarray, val_fraction: float = 0.1,
          context: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last `val_fraction` of the ids is held out for validation.

    With `context`, both parts must hold at least one window of context + 1 ids; a shorter
    corpus raises InputError.
    """
    n = len(tokens)
    n_val = int(n * val_fraction)
    train, val = tokens[: n - n_val], tokens[n - n_val:]
    if context is not None and min(len(train), len(val)) < context + 1:
        need = int(np.ceil((context + 1) / min(val_fraction, 1 - val_fraction))) + 1
        raise InputError(
            f"the corpus is too short: {n} tokens, but a context of {context} tokens needs at "
            f"least {need} (the last {val_fraction:.0%} is held out for validation); add text "
            "or pass a smaller --context"
        )
    return train, val


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join([f"qkv-tokens-v{FORMAT}", *parts]).encode()).hexdigest()[:20]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total_bytes: int, progress: bool):
    if not progress or total_bytes < 32 << 20:  # only worth showing for large corpora
        return _NoBar()

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing")

