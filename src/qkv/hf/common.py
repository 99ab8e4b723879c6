"""What every architecture mapping shares: reading Hugging Face weights, renaming tensors both
ways, and the small translations of config values.

A Hugging Face checkpoint and a qkv model hold the same numbers under different names and, in a
few places, in a different arrangement:

- names: ``encoder.layer.0.attention.self.query.weight`` (BERT) is a slice of qkv's
  ``encoder.layers.0.attn.qkv.weight``;
- fusion: Hugging Face keeps separate query, key and value projections, qkv stacks them into one
  matrix whose rows are [q; k; v], so one matrix multiply makes all three;
- orientation: GPT-2 stores its projections as ``Conv1D`` with the weight shaped (in, out), the
  transpose of ``nn.Linear``'s (out, in).

Each architecture module lists its tensors as :class:`Rule` objects, one per qkv tensor. The
same list drives loading (Hugging Face -> qkv) and saving (qkv -> Hugging Face), so the two
directions cannot drift apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnsupportedModelError
from ..io import WEIGHTS, read_safetensors

INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")

#: Hugging Face activation names -> qkv's. "swish" is SiLU under its other name.
ACTIVATIONS_FROM_HF = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
#: qkv activation -> the Hugging Face name we write (non-gated activations).
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


# ---------------------------------------------------------------------------- name mapping


@dataclass(frozen=True)
class Rule:
    """One qkv tensor and the Hugging Face tensor(s) it is made of.

    op:
        "copy"       the same tensor under another name;
        "transpose"  GPT-2's Conv1D weight, stored (in, out);
        "concat"     several Hugging Face tensors stacked along rows (dim 0) into one qkv
                     tensor, e.g. separate q, k, v projections -> the fused ``qkv`` projection;
                     ``sizes`` holds the row count of each part, to split it back on save;
        "row"        a (1, n) Hugging Face buffer stored by qkv as (n,) (Marian's logits bias).
    head: the tensor lives outside the base model (an LM or classification head), so it never
        carries the base-model prefix such as ``bert.`` or ``transformer.``.
    """

    qkv: str
    hf: tuple[str, ...]
    op: str = "copy"
    sizes: tuple[int, ...] = ()
    head: bool = False

    def to_qkv(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.op == "transpose":
            return parts[0].t()
        if self.op == "concat":
            return torch.cat(parts, dim=0)  # rows [q; k; v]
        if self.op == "row":
            return parts[0].reshape(-1)
        return parts[0]

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.op == "transpose":
            return [tensor.t()]
        if self.op == "concat":
            return list(tensor.split(list(self.sizes), dim=0))
        if self.op == "row":
            return [tensor.reshape(1, -1)]
        return [tensor]


def copy(qkv: str, hf: str, head: bool = False) -> Rule:
    return Rule(qkv, (hf,), head=head)


def linear(qkv: str, hf: str, bias: bool = True, head: bool = False) -> list[Rule]:
    """An nn.Linear under two names: its weight and, if it has one, its bias."""
    rules = [copy(f"{qkv}.weight", f"{hf}.weight", head)]
    if bias:
        rules.append(copy(f"{qkv}.bias", f"{hf}.bias", head))
    return rules


def norm(qkv: str, hf: str, bias: bool = True, head: bool = False) -> list[Rule]:
    """A LayerNorm (weight and bias) or an RMSNorm (weight only)."""
    return linear(qkv, hf, bias, head)


def fused(qkv: str, hf: list[str], sizes: list[int], bias: bool = True) -> list[Rule]:
    """Separate Hugging Face projections (q, k, v) <-> one fused qkv projection, rows stacked."""
    rules = [Rule(f"{qkv}.weight", tuple(f"{h}.weight" for h in hf), "concat", tuple(sizes))]
    if bias:
        rules.append(Rule(f"{qkv}.bias", tuple(f"{h}.bias" for h in hf), "concat", tuple(sizes)))
    return rules


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop the base-model prefix (``bert.``, ``transformer.``, ``model.``) where present.

    A checkpoint saved from the bare model (BertModel) has no prefix; one saved from a model with
    a head (BertForMaskedLM) prefixes every base tensor. After this both look the same.
    """
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


def to_qkv(tensors: dict[str, torch.Tensor], rules: list[Rule], ignored: Iterable[str],
           expected: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Rename (and fuse, transpose) Hugging Face tensors into a qkv state dict.

    `ignored` holds regular expressions of Hugging Face names that carry nothing qkv needs
    (buffers such as ``position_ids``, copies of tied matrices). `expected` is the state dict of
    a qkv model built from the config (its shapes are checked, on the Hugging Face side, so that
    the message names the tensor as it is in the file).
    """
    expected_hf = to_hf({k: v for k, v in expected.items()}, rules)
    state: dict[str, torch.Tensor] = {}
    for rule in rules:
        parts = []
        for name in rule.hf:
            if name not in tensors:
                raise CheckpointError(
                    f"{where} lacks tensor {name}, which its config.json implies"
                )
            want = list(expected_hf[name].shape)
            if list(tensors[name].shape) != want:
                raise CheckpointError(
                    f"{where}: tensor {name} has shape {list(tensors[name].shape)} but "
                    f"config.json implies {want}"
                )
            parts.append(tensors[name])
        state[rule.qkv] = rule.to_qkv(parts)
    patterns = [re.compile(p) for p in ignored]
    used = {name for rule in rules for name in rule.hf}
    unknown = [k for k in tensors if k not in used and not any(p.fullmatch(k) for p in patterns)]
    if unknown:
        raise UnsupportedModelError(
            f"{where} has {len(unknown)} tensor(s) qkv has no place for, e.g. {unknown[0]} "
            "(a head or layer qkv does not implement)"
        )
    return state


def to_hf(state: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """Rename (and split, transpose) a qkv state dict into Hugging Face tensors (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        for name, part in zip(rule.hf, rule.to_hf(state[rule.qkv]), strict=True):
            out[name] = part
    return out


def add_prefix(tensors: dict[str, torch.Tensor], rules: list[Rule],
               prefix: str) -> dict[str, torch.Tensor]:
    """Put the base-model prefix back on every tensor that is not part of a head."""
    heads = {name for rule in rules if rule.head for name in rule.hf}
    return {(k if k in heads else prefix + k): v for k, v in tensors.items()}


# ---------------------------------------------------------------------------- reading weights


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory: model.safetensors, or the shards of an index.

    Pickled weights (``pytorch_model.bin``) are refused: unpickling runs code from the file.
    """
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return _read_file(path / WEIGHTS)
    if (path / INDEX).is_file():
        return _read_shards(path)
    pickles = [name for name in PICKLES if (path / name).exists()]
    if pickles:
        raise CheckpointError(
            f"{path} only has {pickles[0]}, a pickle that qkv never loads (it can run code); "
            "convert it to safetensors first, e.g. with transformers: "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{path} has no weights file ({WEIGHTS} or {INDEX})")


_read_file = read_safetensors


def _read_shards(path: Path) -> dict[str, torch.Tensor]:
    index_file = path / INDEX
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_file} is not a valid safetensors index ({e})") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        file = path / shard
        if not file.is_file():
            raise CheckpointError(f"{index_file} names shard {shard}, which does not exist")
        tensors.update(_read_file(file))
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        raise CheckpointError(f"{index_file} lists {missing[0]}, but no shard holds it")
    return tensors


# ---------------------------------------------------------------------------- config helpers


def get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
    """hf[key], with `default` for a missing key or an explicit null."""
    value = hf.get(key)
    return default if value is None else value


def activation_from_hf(name: Any, model_type: str) -> str:
    if name not in ACTIVATIONS_FROM_HF:
        raise UnsupportedModelError(
            f"this {model_type} checkpoint uses the activation {name!r}, which qkv does not "
            f"implement (qkv has {', '.join(sorted(ACTIVATIONS_FROM_HF))})"
        )
    return ACTIVATIONS_FROM_HF[name]


def token_id(hf: dict[str, Any], key: str, vocab_size: int) -> int | None:
    """A special token id from the config, or None when absent or outside the vocabulary.

    eos_token_id may be a list (several end tokens); qkv keeps the first.
    """
    value = hf.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        return None
    return value


def labels_from_hf(hf: dict[str, Any], n: int) -> list[str]:
    """Class names from id2label ({"0": "NEGATIVE", ...}), in id order; LABEL_i when absent."""
    id2label = hf.get("id2label") or {}
    try:
        named = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError, AttributeError):
        named = {}
    labels = [named.get(i, f"LABEL_{i}") for i in range(n)]
    if len(set(labels)) != n:  # duplicate names would be ambiguous
        labels = [f"LABEL_{i}" for i in range(n)]
    return labels


def unsupported(model_type: str, feature: str) -> UnsupportedModelError:
    """The error for a config feature qkv does not implement, as one sentence."""
    return UnsupportedModelError(f"this {model_type} checkpoint uses {feature}, which qkv does not "
                                 "implement")


def first_mismatch(arch: str, base: str, checks: list[tuple[bool, str, str]]) -> str | None:
    """The sentence for the first failed (ok, what the config has, what `arch` needs) check."""
    for ok, what, need in checks:
        if not ok:
            return (f"{base} with {what} fits no Hugging Face architecture qkv can write "
                    f"({arch} needs {need})")
    return None
