"""sentence-transformers folders: how token vectors become one sentence vector.

A sentence-transformers model is a Hugging Face model plus a small pipeline described by
``modules.json``: the Transformer, then a Pooling module (mean, cls, max or last token, set in
``1_Pooling/config.json``), then optionally Normalize (unit length, so that a dot product is the
cosine similarity). qkv keeps the two choices in its config: ``pooling`` and
``normalize_embeddings``, and :meth:`Transformer.embed` applies them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..io import atomic_write_text

MODULES = "modules.json"
SENTENCE_CONFIG = "sentence_bert_config.json"

#: sentence-transformers pooling names -> qkv's config.pooling (the ones qkv implements).
POOLING_FROM_ST = {"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "last"}
POOLING_TO_ST = {v: k for k, v in POOLING_FROM_ST.items()}
#: The older format: one boolean per mode.
LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not a readable JSON file ({e})") from None


def _pooling_modes(config: dict[str, Any]) -> list[str]:
    mode = config.get("pooling_mode")
    if isinstance(mode, str):
        return [mode]
    if isinstance(mode, list):
        return [str(m) for m in mode]
    modes = [name for key, name in LEGACY_KEYS.items() if config.get(key)]
    return modes or ["mean"]


def read_sentence_transformers(path: Path, max_seq_len: int | None = None) -> dict[str, Any]:
    """Config overrides ({"pooling", "normalize_embeddings", "embed_max_len"}) from modules.json
    and sentence_bert_config.json (whose max_seq_length is capped at `max_seq_len`).

    Returns {} for a plain Hugging Face folder. Modules qkv does not implement (a Dense layer
    after pooling, say) raise UnsupportedModelError: ignoring them would give other vectors.
    """
    file = Path(path) / MODULES
    if not file.is_file():
        return {}
    modules = _read_json(file)
    if not isinstance(modules, list):
        raise CheckpointError(f"{file} must hold a list of modules")
    out: dict[str, Any] = {"normalize_embeddings": False}
    sentence_config = Path(path) / SENTENCE_CONFIG
    if sentence_config.is_file():
        limit = _read_json(sentence_config)
        limit = limit.get("max_seq_length") if isinstance(limit, dict) else None
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            # None stands for "the whole context", so a limit at (or past) it is not stored.
            out["embed_max_len"] = None if max_seq_len and limit >= max_seq_len else limit
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1] if isinstance(module, dict) else ""
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            out["normalize_embeddings"] = True
        elif kind == "Pooling":
            config = _read_json(Path(path) / str(module.get("path", "")) / "config.json")
            modes = _pooling_modes(config if isinstance(config, dict) else {})
            if len(modes) != 1 or modes[0] not in POOLING_FROM_ST:
                raise UnsupportedModelError(
                    f"{file}: pooling {'+'.join(modes)} is not implemented by qkv (it has "
                    f"{', '.join(POOLING_FROM_ST)})"
                )
            out["pooling"] = POOLING_FROM_ST[modes[0]]
        else:
            raise UnsupportedModelError(
                f"{file} has a {module.get('type') if isinstance(module, dict) else module} "
                "module, which qkv does not implement"
            )
    return out


def write_sentence_transformers(cfg: ModelConfig, path: Path) -> None:
    """modules.json, 1_Pooling/config.json and sentence_bert_config.json for `cfg`."""
    path = Path(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
    ]
    if cfg.normalize_embeddings:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    chosen = POOLING_TO_ST[cfg.pooling]
    pooling = {"word_embedding_dimension": cfg.d_model,
               **{key: name == chosen for key, name in LEGACY_KEYS.items()}}
    atomic_write_text(path / MODULES, json.dumps(modules, indent=2) + "\n")
    atomic_write_text(path / "1_Pooling" / "config.json", json.dumps(pooling, indent=2) + "\n")
    atomic_write_text(path / SENTENCE_CONFIG,
                      json.dumps({"max_seq_length": cfg.embed_max_len or cfg.max_seq_len,
                                  "do_lower_case": False}, indent=2) + "\n")
