"""Save and restore everything a training run needs to continue exactly where it stopped.

    runs/x/
      config.json, tokenizer.json, model.safetensors    the best model so far (what you load)
      log.jsonl                                         one JSON line per log step / evaluation
      training/                                         the latest state, to resume from
        model.safetensors        the latest weights
        optimizer.safetensors    AdamW's moments, per parameter, + hyperparameters (metadata)
        state.json               step, random-generator states, data position, best val loss

A checkpoint is several files that must agree with each other, so it is written as a whole into
a fresh temporary folder (every file flushed to disk) and then swapped in with renames:

    training.tmp/  --(complete)-->  training -> training.old,  training.tmp -> training,
                                    delete training.old

A process killed at any moment leaves either `training/` or, during the instant between the two
renames, `training.old/`: always one complete checkpoint. Nothing is ever read with pickle.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import CONFIG, WEIGHTS, read_safetensors
from ..errors import CheckpointError
from ..io import parse_json, storage_errors

TRAINING, STATE, OPTIMIZER = "training", "state.json", "optimizer.safetensors"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON and flush it to disk (inside a temporary checkpoint folder)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform; the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_training_checkpoint(out: Path, weights: torch.nn.Module | dict[str, torch.Tensor],
                             optimizer_state: tuple[dict[str, torch.Tensor], dict[str, str]],
                             state: dict[str, Any]) -> Path:
    """Write out/training/ atomically (see the module docstring); returns its path. `weights`:
    the model, or its state dict as saved (tied weights once; gathered from several processes).
    If the disk fills up (StorageError) the previous checkpoint is left as it was."""
    out = Path(out)
    if isinstance(weights, torch.nn.Module):
        tied = getattr(weights, "tied_weights", dict)()
        weights = {k: v for k, v in weights.state_dict().items() if k not in tied}
    tmp = out / f"{TRAINING}.tmp"
    try:
        with storage_errors(out / TRAINING):
            return _save_training_checkpoint(out, weights, optimizer_state, state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder is never read
        raise


def _save_training_checkpoint(out: Path, weights: dict[str, torch.Tensor],
                              optimizer_state: tuple[dict[str, torch.Tensor], dict[str, str]],
                              state: dict[str, Any]) -> Path:
    final, tmp, old = out / TRAINING, out / f"{TRAINING}.tmp", out / f"{TRAINING}.old"
    if tmp.exists():  # left over by a run killed while writing
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
    with open(tmp / WEIGHTS, "rb+") as f:
        os.fsync(f.fileno())
    tensors, metadata = optimizer_state
    save_file(tensors, str(tmp / OPTIMIZER), metadata=metadata)
    with open(tmp / OPTIMIZER, "rb+") as f:
        os.fsync(f.fileno())
    write_json(tmp / STATE, state)  # written last: its presence marks a complete folder
    _fsync_dir(tmp)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out)
    if old.exists():
        shutil.rmtree(old)
    return final


def find_training_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint folder of a run (training/, or training.old/ if a swap was cut
    short), or None."""
    for name in (TRAINING, f"{TRAINING}.old"):
        folder = Path(out) / name
        if (folder / STATE).is_file() and (folder / WEIGHTS).is_file():
            return folder
    return None


#: The fields of state.json that resume needs, with the types they must have.
STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,), "max_steps": (int, type(None)), "best": (dict, type(None)),
    "best_step": (int,), "elapsed": (int, float), "seen": (int,), "sampler": (dict,),
    "rng": (dict,)}


def damaged(path: Path, what: str) -> CheckpointError:
    """The error for a damaged checkpoint file: what is wrong, and how to start over."""
    run = path.parent.parent
    return CheckpointError(f"{path} is damaged ({what}); the run cannot be resumed: start it "
                           f"again with --overwrite, or delete {run / TRAINING} (docs/errors.md)")


def read_state(folder: Path) -> dict[str, Any]:
    """The state.json of a checkpoint folder, checked field by field."""
    path = Path(folder) / STATE
    try:
        state = parse_json(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError, CheckpointError) as e:
        raise damaged(path, f"not readable JSON: {e}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise damaged(path, "not a qkv training state")
    if "seen" not in state and "tokens_seen" in state:  # written before the loop took objectives
        best = state.get("best_val_loss")
        state.update(seen=state["tokens_seen"], best_step=0,
                     best=None if best is None else {"val_loss": best})
    for name, types in STATE_FIELDS.items():
        if name not in state:
            raise damaged(path, f"the field {name!r} is missing")
        value = state[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise damaged(path, f"the field {name!r} is a {type(value).__name__}")
    numbers = [state["step"], state["best_step"], state["seen"], state["elapsed"]]
    if any(not math.isfinite(n) or n < 0 for n in numbers):
        raise damaged(path, "a negative or non-finite count")
    if not isinstance(state["rng"].get("torch"), str):
        raise damaged(path, "the random generator state is missing")
    return state


def read_optimizer(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint's optimizer.safetensors."""
    path = Path(folder) / OPTIMIZER
    tensors = read_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return tensors, metadata


def is_run_dir(out: Path) -> bool:
    return (Path(out) / CONFIG).is_file() and find_training_checkpoint(out) is not None


# ---------------------------------------------------------------------- random generator states

def rng_state(device: torch.device) -> dict[str, Any]:
    """The states of torch's random generators, as JSON-safe strings."""
    state: dict[str, Any] = {"torch": b64(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    try:
        torch.set_rng_state(unb64(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([unb64(s) for s in state["cuda"]])
    except (RuntimeError, TypeError, KeyError):
        raise CheckpointError("the saved random generator state is damaged") from None


def b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def unb64(s: str) -> torch.Tensor:
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise CheckpointError("the saved random generator state is damaged") from None
    if not data:
        raise CheckpointError("the saved random generator state is empty")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
