"""The bottom layer: the file names of a model directory, readers that fail with one clear
line, and writes that a crash never leaves half done.

Every write goes to a temporary file in the same folder, is flushed to disk (fsync), and is then
renamed over the target: a rename within one filesystem is atomic, so readers see either the old
file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

#: The files of a model directory.
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"


def read_json_object(file: str | Path) -> dict[str, Any]:
    """The JSON object in `file`; CheckpointError (one line) if it is missing or not an object."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return data


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


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) to fill a temporary file, then move it to `path`."""
    path = Path(path)
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
