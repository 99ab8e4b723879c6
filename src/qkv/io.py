"""The bottom layer: the file names of a model directory, readers that fail with one clear
line, and writes that a crash never leaves half done.

Every write goes to a temporary file in the same folder, is flushed to disk (fsync), and is then
renamed over the target: a rename within one filesystem is atomic, so readers see either the old
file or the new one, never a mix.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, StorageError

#: The files of a model directory.
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"


# ---------------------------------------------------------------------- OS errors as sentences

def os_error_sentence(error: OSError, path: str | Path | None = None,
                      action: str = "writing") -> str:
    """One line saying what the filesystem refused, for a person: "no space left while writing
    X; nothing was replaced", "permission denied: X", ... (`path`: the file qkv was handling;
    default: the one the error names)."""
    where = str(path if path is not None else (error.filename or "a file"))
    code = error.errno
    if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        # an atomic write leaves the old file: say so (elsewhere it is not known)
        kept = "; nothing was replaced" if action == "writing" else ""
        return f"no space left while {action} {where}{kept}"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied while {action} {where}"
    if code == errno.EROFS:
        return f"{where} is on a read-only filesystem"
    if code == errno.ENOTDIR:
        return f"{where}: a part of this path is a file, not a folder"
    if code == errno.EISDIR:
        return f"{where} is a folder, not a file"
    if code == errno.EEXIST:
        if Path(where).exists() and not Path(where).is_dir():
            return f"{where} is a file, where a folder is needed"
        return f"{where} already exists"
    if code == errno.ENOENT:
        return f"{where} does not exist"
    if code == errno.ENAMETOOLONG:
        return f"{where}: the file name is too long"
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason} while {action} {where}"


@contextmanager
def storage_errors(path: str | Path, action: str = "writing") -> Iterator[None]:
    """Turn an OSError raised inside the block into a StorageError with one sentence."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(os_error_sentence(e, path, action)) from None
    except Exception as e:  # safetensors reports the OS's refusal as "... (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise StorageError(os_error_sentence(OSError(int(code[1]), str(e)), path, action)) \
            from None


# ---------------------------------------------------------------------- readers

def parse_json(text: str, source: str | Path) -> Any:
    """json.loads, with CheckpointError (naming `source`) for invalid or absurdly nested JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source} is not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{source} is nested too deeply to be a qkv file") from None


def _read_utf8(file: Path) -> str:
    """The text of `file`; one-line errors for a missing, non-UTF-8 or unreadable file."""
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise StorageError(os_error_sentence(e, file, "reading")) from None


def read_json_object(file: str | Path) -> dict[str, Any]:
    """The JSON object in `file`; CheckpointError (one line) if it is missing or not an object."""
    file = Path(file)
    data = parse_json(_read_utf8(file), file)
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object, not a {type(data).__name__}")
    return data


def read_jsonl_objects(file: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, one a line (blank lines skipped); CheckpointError
    naming the file and the line for anything else."""
    file = Path(file)
    rows = []
    for n, line in enumerate(_read_utf8(file).splitlines(), 1):
        if not line.strip():
            continue
        row = parse_json(line, f"{file}, line {n},")
        if not isinstance(row, dict):
            raise CheckpointError(f"{file}, line {n}: expected a JSON object, got a "
                                  f"{type(row).__name__}")
        rows.append(row)
    return rows


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The config.json of the model directory `path`, as a dict."""
    if not Path(path).is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if not (Path(path) / CONFIG).is_file():
        raise CheckpointError(f"{path} is not a model directory (it has no {CONFIG})")
    return read_json_object(Path(path) / CONFIG)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (never unpickled); CheckpointError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def check_new_output(path: str | Path, overwrite: bool = False) -> Path:
    """Check that a model (or run) may be written into the directory `path`: it is absent, or
    a folder without a model, or `overwrite` is set. CheckpointError / StorageError otherwise,
    before any work is done: a model is never replaced by accident."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StorageError(f"{path} exists and is not a directory")
    held = [name for name in (CONFIG, WEIGHTS, "training") if (path / name).exists()]
    if held and not overwrite:
        raise CheckpointError(f"{path} already holds a model ({held[0]}); pick another "
                              "output directory, continue its training with --resume, or pass "
                              "--overwrite to replace it")
    with storage_errors(path, "creating"):
        path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) to fill a temporary file, then move it to `path`. If the disk is
    full (or anything else fails) the old `path` is left as it was: StorageError for the
    filesystem's refusals."""
    path = Path(path)
    with storage_errors(path):
        _atomic_write(path, write)


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                             metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {}))
