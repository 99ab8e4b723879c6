"""A text corpus on disk: which files, are they text, and what is their fingerprint.

A corpus is one UTF-8 file or a folder of them (read in sorted order, sub-folders included).
With no path, qkv uses the bundled "tiny Shakespeare" (1.1 MB, public domain).

Files are never read whole: `text_chunks` streams them in pieces of about a megabyte, so a
corpus of many gigabytes needs no more memory than a small one.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError

CORPORA = Path(__file__).parent / "corpora"
BUNDLED = CORPORA / "tiny_shakespeare.txt"

CHUNK_BYTES = 1 << 20  # read files a megabyte at a time


def read_text_file(path: Path) -> str:
    """The whole text of a (small) UTF-8 file such as a labelled or Q/A data file, a byte-order
    mark dropped; InputError naming the file (and the line) if it is missing or not UTF-8."""
    if not path.is_file():
        raise InputError(f"file {path} does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path} is not valid UTF-8 text (line {line})") from None


def jsonl_values(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON-lines text; InputError naming the
    file and line for one that is not JSON (or is nested too deeply to read)."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {number} is not valid JSON ({e.msg})") from None
        except RecursionError:
            raise InputError(f"{path} line {number} is nested too deeply") from None


def corpus_files(path: str | Path | None = None) -> list[Path]:
    """The files of a corpus: [path] for a file, the sorted files under a folder, or the bundled
    tiny Shakespeare for None. Raises InputError for a missing path or an empty folder."""
    if path is None:
        return [BUNDLED]
    path = Path(path)
    if not path.exists():
        raise InputError(f"data path {path} does not exist")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".")
                                                  for part in p.relative_to(path).parts))
        if not files:
            raise InputError(f"data folder {path} holds no files")
    return files


def text_chunks(files: list[Path], chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Yield the text of the corpus in pieces, file after file, each piece ending at a line end.

    Ending pieces at line ends keeps a tokenizer's word boundaries where they would be in the
    whole text. A file that does not end with a newline gets one, so files never run together.
    Raises InputError for a file that is not UTF-8 text.
    """
    for file in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        carry = ""  # text after the last newline of the previous piece
        last = "\n"
        with _open(file) as f:
            while True:
                raw = f.read(chunk_bytes)
                try:
                    text = carry + decoder.decode(raw, final=not raw)
                except UnicodeDecodeError:
                    raise InputError(f"{file} is not UTF-8 text (is it a binary file?)") from None
                if "\x00" in text:
                    raise InputError(f"{file} contains NUL bytes: it looks like a binary file")
                if not raw:
                    carry = text
                    break
                cut = text.rfind("\n") + 1
                if cut == 0 and len(text) < 16 * chunk_bytes:  # no line end yet: read on
                    carry = text
                    continue
                piece, carry = (text[:cut], text[cut:]) if cut else (text, "")
                last = piece[-1]
                yield piece
        if carry:  # the text after the file's last line end
            yield carry + "\n"
        elif last != "\n":
            yield "\n"


def _open(file: Path):
    try:
        return open(file, "rb")
    except OSError as e:
        raise InputError(f"cannot read {file} ({e.strerror})") from None


def fingerprint(files: list[Path]) -> str:
    """A SHA-256 of the corpus content (file sizes and bytes, in order), as hex.

    It also checks that every file is UTF-8 text and that the corpus is not empty, so that a bad
    file fails before any training work starts.
    """
    digest = hashlib.sha256()
    total = 0
    for file in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        digest.update(f"{file.stat().st_size}:".encode())
        with _open(file) as f:
            while raw := f.read(CHUNK_BYTES):
                digest.update(raw)
                total += len(raw)
                try:
                    decoder.decode(raw)
                except UnicodeDecodeError:
                    raise InputError(f"{file} is not UTF-8 text (is it a binary file?)") from None
                if b"\x00" in raw:
                    raise InputError(f"{file} contains NUL bytes: it looks like a binary file")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputError(f"{file} is not UTF-8 text (it ends inside a character)") from None
    if total == 0:
        where = files[0] if len(files) == 1 else f"the {len(files)} files of the corpus"
        raise InputError(f"{where} is empty: there is no text to train on")
    return digest.hexdigest()
