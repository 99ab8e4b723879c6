"""LoRA adapters for whole models: add them, count them, fold them in, save and load them.

    qkv.lora.apply_lora(model, rank=8, alpha=16, targets="q,v")   # freezes the rest
    ... train ...
    qkv.lora.save_adapter(model, "runs/adapter", base="runs/gpt")  # a few hundred KB
    model, tok = qkv.load("runs/adapter")                           # base + adapter, one call
    qkv.lora.merge_lora(model)                                      # plain weights again

Targets name the linear layers of every family by what they do:

    q, k, v   the query / key / value projections (rows of the fused `qkv` projection, or the
              cross-attention's `q` and `kv`), each with its own update
    qkv       one update for the fused projection as a whole (what PEFT does to GPT-2's
              `c_attn`); not together with q, k or v
    o         the attention output projection
    up, down, gate   the feed-forward layers (gate only in SwiGLU models)
    attn = q,k,v,o    ffn = up,down,gate    all = both

The adapter is written in the layout of Hugging Face PEFT (`adapter_config.json` and
`adapter_model.safetensors`), under the tensor names of qkv's Hugging Face export of the base
model (`qkv.save(model, tok, dir, format="hf")`), so that `peft` loads it onto that export and
computes the same logits. Where Hugging Face keeps q, k and v apart (BERT, Llama, Marian, BART)
each part becomes that projection's own LoRA; where it fuses them (GPT-2's `c_attn`), the parts
become one LoRA of the summed rank whose B is block-diagonal, which computes the same update.
A model that has no Hugging Face form is saved under qkv's own module names. What PEFT has no
field for (class names and pooling of a classification head) goes to `qkv_adapter.json`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .errors import CheckpointError, InputError, UnsupportedModelError
from .hf import architecture_for
from .io import atomic_write_safetensors, atomic_write_text, read_safetensors
from .layers.attention import CrossAttention, SelfAttention
from .layers.feedforward import FeedForward, GatedFeedForward
from .layers.lora import LoRALinear, Part
from .model import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
QKV_ADAPTER = "qkv_adapter.json"
PEFT_PREFIX = "base_model.model."

TARGETS = ("q", "k", "v", "qkv", "o", "up", "down", "gate")
ALIASES = {"attn": ("q", "k", "v", "o"), "ffn": ("up", "down", "gate"),
           "mlp": ("up", "down", "gate"), "all": ("q", "k", "v", "o", "up", "down", "gate")}
#: Besides the LoRA matrices, these modules are trained (and saved with the adapter) when the
#: model has them: a classification head is new, so it must learn in full.
HEADS = ("classifier", "pooler")


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """"q,v" or ["attn", "up"] -> the target names, in TARGETS order; InputError if unknown."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: set[str] = set()
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        if item in ALIASES:
            chosen.update(ALIASES[item])
        elif item in TARGETS:
            chosen.add(item)
        else:
            raise InputError(f"LoRA target {item!r} is not one of {', '.join(TARGETS)} "
                             f"(or {', '.join(ALIASES)})")
    if not chosen:
        raise InputError("give at least one LoRA target, e.g. q,v")
    if "qkv" in chosen and chosen & {"q", "k", "v"}:
        raise InputError("LoRA target qkv adapts the fused projection as a whole; give it or "
                         "q, k, v, not both")
    return tuple(t for t in TARGETS if t in chosen)


# ---------------------------------------------------------------------- finding the layers

@dataclass
class _Slot:
    """A linear layer LoRA can adapt: where it hangs, and the rows each target covers."""

    name: str
    parent: nn.Module
    attr: str
    rows: dict[str, tuple[int, int]]  # target -> (start, size)

    @property
    def linear(self) -> nn.Linear:
        return getattr(self.parent, self.attr)


def _slots(model: nn.Module) -> Iterator[_Slot]:
    for name, m in model.named_modules():
        if isinstance(m, SelfAttention):
            q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
            yield _Slot(f"{name}.qkv", m, "qkv", {"q": (0, q), "k": (q, kv), "v": (q + kv, kv),
                                                  "qkv": (0, q + 2 * kv)})
        elif isinstance(m, CrossAttention):
            kv = m.n_kv_heads * m.head_dim
            yield _Slot(f"{name}.q", m, "q", {"q": (0, m.q.out_features),
                                              "qkv": (0, m.q.out_features)})
            yield _Slot(f"{name}.kv", m, "kv", {"k": (0, kv), "v": (kv, kv), "qkv": (0, 2 * kv)})
        if isinstance(m, (SelfAttention, CrossAttention)):
            yield _Slot(f"{name}.out", m, "out", {"o": (0, m.out.out_features)})
        elif isinstance(m, (FeedForward, GatedFeedForward)):
            for part in ("gate", "up", "down"):
                if hasattr(m, part):
                    yield _Slot(f"{name}.{part}", m, part,
                                {part: (0, getattr(m, part).out_features)})


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRA layer} of every LoRA layer in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters (a shared matrix counts once)."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def describe_trainable(model: nn.Module) -> str:
    """"trainable parameters: 147,456 of 22,860,290 (0.65%)"."""
    trainable, total = trainable_parameters(model)
    return (f"trainable parameters: {trainable:,} of {total:,} "
            f"({100 * trainable / max(total, 1):.2f}%)")


# ---------------------------------------------------------------------- adding and merging

def apply_lora(model: Transformer, rank: int = 8, alpha: float | None = None,
               targets: str | Sequence[str] = "q,v", dropout: float = 0.0,
               heads: Sequence[str] = HEADS) -> Transformer:
    """Freeze `model` and give the `targets` linears LoRA updates of `rank` (in place).

    alpha: the update is scaled by alpha / rank (default 2 * rank). The modules named in
    `heads` that the model has (a classification head) stay trainable. Returns the model."""
    if lora_layers(model):
        raise InputError("this model already has LoRA layers; merge them (qkv.lora.merge_lora) "
                         "before adding new ones")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"LoRA rank {rank!r} must be a positive whole number")
    alpha = float(2 * rank if alpha is None else alpha)
    if not alpha > 0:
        raise InputError(f"LoRA alpha {alpha} must be positive")
    if not 0 <= dropout < 1:
        raise InputError(f"LoRA dropout {dropout} must be in [0, 1)")
    chosen = parse_targets(targets)
    plan = []
    for slot in _slots(model):
        parts = [Part(start, size, rank, alpha) for t, (start, size) in slot.rows.items()
                 if t in chosen]
        if parts:
            linear = slot.linear
            for p in parts:
                if rank > min(p.size, linear.in_features):
                    raise InputError(
                        f"LoRA rank {rank} is larger than the layer {slot.name} "
                        f"({p.size} x {linear.in_features}); choose a rank of at most "
                        f"{min(p.size, linear.in_features)}")
            plan.append((slot, parts))
    if not plan:
        raise InputError(f"LoRA targets {','.join(chosen)} match no layer of this "
                         f"{model.config.family} model")
    model.requires_grad_(False)
    for slot, parts in plan:
        setattr(slot.parent, slot.attr, LoRALinear.wrap(slot.linear, parts, dropout))
    for head in heads:
        module = getattr(model, head, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(True)
    return model


def merge_lora(model: Transformer) -> Transformer:
    """Fold every LoRA update into its base weight (in place): a plain model again, all of it
    trainable, that saves and exports like any other. Returns the model."""
    for name, layer in lora_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer.merged())
    model.requires_grad_(True)
    return model


# ---------------------------------------------------------------------- names in the file

@dataclass(frozen=True)
class _Segment:
    """One module of the saved form: a row range of a qkv linear."""

    module: str  # qkv module name
    start: int
    size: int


def _layout(model: Transformer) -> tuple[str, dict[str, _Segment], dict[str, str]]:
    """("hf" or "qkv", {saved module name: segment}, {qkv parameter name: saved name}).

    With "hf", names are those of qkv's Hugging Face export, with the base-model prefix where
    the export writes one (`transformer.h.0.attn.c_attn`). With "qkv" (a model that has no
    Hugging Face form), qkv's module names, the rows of a fused projection apart
    (`encoder.layers.0.attn.qkv.q`)."""
    cfg = model.config
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    try:
        arch = architecture_for(cfg)
    except UnsupportedModelError:  # qkv's own names; a fused projection's parts apart
        segments = {n: _Segment(n, 0, m.out_features) for n, m in linears.items()}
        for slot in _slots(model):
            parts = {t: rows for t, rows in slot.rows.items() if t != "qkv"}
            if len(parts) > 1:
                del segments[slot.name]
                for t, (start, size) in parts.items():
                    segments[f"{slot.name}.{t}"] = _Segment(slot.name, start, size)
        return "qkv", segments, {n: n for n, _ in model.named_parameters()}
    written = arch.config_to_hf(cfg)["architectures"][0]
    prefix = arch.prefix if written != arch.base_architecture else ""
    segments, params = {}, {}
    for rule in arch.rules(cfg):
        full = [h if rule.head else prefix + h for h in rule.hf]
        if len(full) == 1:
            params[rule.qkv] = full[0]
        if not rule.qkv.endswith(".weight") or rule.qkv[:-7] not in linears:
            continue
        module = rule.qkv[:-7]
        sizes = rule.sizes if rule.op == "concat" else (linears[module].out_features,)
        start = 0
        for name, size in zip(full, sizes, strict=True):
            segments[name.removesuffix(".weight")] = _Segment(module, start, size)
            start += size
    return "hf", segments, params


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# ---------------------------------------------------------------------- saving

def save_adapter(model: Transformer, path: str | Path, base: str | Path | None = None) -> Path:
    """Write the LoRA updates (and trained heads) of `model` to `path` in PEFT's layout.

    base: the base model's directory or name, recorded as base_model_name_or_path so that
    `qkv.load(path)` finds it."""
    layers = lora_layers(model)
    if not layers:
        raise InputError("this model has no LoRA layers to save (apply_lora first)")
    names, segments, params = _layout(model)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    # GPT-2's Conv1D layers store their weights (in, out); PEFT wants to be told
    fan_in_fan_out = names == "hf" and architecture_for(model.config).model_type == "gpt2"
    for saved, seg in segments.items():
        layer = layers.get(seg.module)
        if layer is None:
            continue
        a_rows, b_cols, scale = [], [], None
        for p, a, b in zip(layer.parts, layer.lora_A, layer.lora_B, strict=True):
            lo, hi = max(p.start, seg.start), min(p.start + p.size, seg.start + seg.size)
            if lo >= hi:
                continue
            scale = p.scale if scale is None else scale
            block = torch.zeros(seg.size, p.rank, dtype=torch.float32)
            block[lo - seg.start:hi - seg.start] = b.detach().float()[lo - p.start:hi - p.start]
            a_rows.append(a.detach().float())
            b_cols.append(block * (p.scale / scale))  # one scale per saved module
        if scale is None:
            continue
        a_all, b_all = torch.cat(a_rows, 0), torch.cat(b_cols, 1)  # (R, in), (size, R)
        dtype = layer.weight.dtype
        tensors[f"{PEFT_PREFIX}{saved}.lora_A.weight"] = a_all.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{saved}.lora_B.weight"] = b_all.to(dtype).contiguous()
        ranks[saved], alphas[saved] = a_all.shape[0], scale * a_all.shape[0]
    heads = _trained_heads(model)
    for name, value in heads.items():
        if name not in params:
            raise UnsupportedModelError(f"the trained parameter {name} has no place in the "
                                        "adapter file")
        tensors[PEFT_PREFIX + params[name]] = value.detach().contiguous()
    (rank, alpha), _ = Counter(zip(ranks.values(), alphas.values(), strict=True)).most_common(1)[0]
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": None if base is None else str(base),
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": "^(.*\\.)?(" + "|".join(re.escape(n) for n in ranks) + ")$",
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
        "lora_dropout": _dropout(layers),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": sorted({params[n].rsplit(".", 1)[0] for n in heads}) or None,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
    extra = {"qkv_version": __version__, "names": names,
             "labels": list(model.config.labels), "pooling": model.config.pooling,
             "pooler": model.config.pooler,
             "base": {"family": model.config.family, "d_model": model.config.d_model,
                      "n_layers": model.config.n_layers, "vocab_size": model.config.vocab_size}}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(path / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    atomic_write_text(path / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write_text(path / QKV_ADAPTER, json.dumps(extra, indent=2) + "\n")
    return path


def _trained_heads(model: Transformer) -> dict[str, torch.Tensor]:
    """The trainable parameters outside LoRA layers (a classification head)."""
    lora = {f"{n}.{p}" for n in lora_layers(model) for p in ("weight", "bias")}
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and ".lora_" not in n and n not in lora}


def _task_type(model: Transformer) -> str:
    if model.config.labels:
        return "SEQ_CLS"
    return {"decoder": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION",
            "encoder-decoder": "SEQ_2_SEQ_LM"}[model.config.family]


def _dropout(layers: dict[str, LoRALinear]) -> float:
    for layer in layers.values():
        if isinstance(layer.lora_dropout, nn.Dropout):
            return layer.lora_dropout.p
    return 0.0


# ---------------------------------------------------------------------- loading

def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return data


def load_adapter(model: Transformer, path: str | Path) -> Transformer:
    """`model` with the adapter in `path` added (a new model when the adapter brings a
    classification head the model lacks). Every tensor's shape is checked against the model;
    an adapter made for another base model is a CheckpointError naming both shapes."""
    path = Path(path)
    config, extra, tensors = _read_adapter(path)
    if lora_layers(model):
        raise InputError("this model already has LoRA layers; merge them first")
    labels = extra.get("labels") or []
    if labels and list(model.config.labels) != list(labels):
        model = _with_head(model, labels, extra.get("pooling"), bool(extra.get("pooler")))
    names, segments, params = _layout(model)
    if extra.get("names", names) != names:
        raise CheckpointError(f"{path} names its tensors the {extra.get('names')} way, but this "
                              f"base model's are named the {names} way: it is for another base")
    parts, heads = _sort_tensors(model, path / ADAPTER_WEIGHTS, config, tensors, segments,
                                 {v: k for k, v in params.items()})
    model.requires_grad_(False)
    for module, found in parts.items():
        parent_name, _, attr = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        found.sort(key=lambda f: f[0].start)
        layer = LoRALinear.wrap(getattr(parent, attr), [p for p, _, _ in found],
                                float(config.get("lora_dropout") or 0.0))
        with torch.no_grad():
            for j, (_, a, b) in enumerate(found):
                layer.lora_A[j].copy_(a)
                layer.lora_B[j].copy_(b)
        setattr(parent, attr, layer)
    state = model.state_dict()
    for name, value in heads.items():
        if tuple(state[name].shape) != tuple(value.shape):
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: {name} has shape "
                                  f"{list(value.shape)}, but this base model's has shape "
                                  f"{list(state[name].shape)}")
    if heads:
        model.load_state_dict(heads, strict=False)
        for name in heads:
            model.get_parameter(name).requires_grad_(True)
    return model


def _read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, qkv_adapter.json or {}, the tensors) of an adapter directory."""
    if not (path / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{path} is not a LoRA adapter (no {ADAPTER_CONFIG})")
    config = _read_json(path / ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r} "
                              "is not LORA, the only adapter qkv reads")
    extra = _read_json(path / QKV_ADAPTER) if (path / QKV_ADAPTER).is_file() else {}
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path} has no {ADAPTER_WEIGHTS}")
    return config, extra, read_safetensors(path / ADAPTER_WEIGHTS)


_Found = list[tuple[Part, torch.Tensor, torch.Tensor]]


def _sort_tensors(model: Transformer, file: Path, config: dict[str, Any],
                  tensors: dict[str, torch.Tensor], segments: dict[str, _Segment],
                  by_saved: dict[str, str]) -> tuple[dict[str, _Found], dict[str, torch.Tensor]]:
    """The adapter's tensors as ({qkv module: [(part, A, B)]}, {head parameter: tensor}),
    every shape checked against the model."""
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    parts: dict[str, _Found] = {}
    heads: dict[str, torch.Tensor] = {}
    for key, a in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(".lora_B.weight"):
            continue
        if not name.endswith(".lora_A.weight"):
            if name not in by_saved:
                raise CheckpointError(f"{file} has tensor {key}, which the base model has no "
                                      "place for: the adapter is for another base model")
            heads[by_saved[name]] = a
            continue
        module = name.removesuffix(".lora_A.weight")
        b = tensors.get(f"{PEFT_PREFIX}{module}.lora_B.weight")
        seg = segments.get(module)
        if b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{file}: {module} lacks a lora_B matching its lora_A")
        if seg is None:
            raise CheckpointError(f"{file} adapts {module}, which this base model "
                                  f"({model.config.family}, {model.config.n_layers} layers) "
                                  "does not have: the adapter is for another base model")
        in_features = linears[seg.module].in_features
        if [b.shape[0], a.shape[1]] != [seg.size, in_features]:
            raise CheckpointError(
                f"{file}: the adapter for {module} is for a layer of shape "
                f"[{b.shape[0]}, {a.shape[1]}], but this base model's {module} has shape "
                f"[{seg.size}, {in_features}]: the adapter was made for another base model")
        r = int(_pattern_value(ranks, module, rank))
        scale = float(_pattern_value(alphas, module, alpha)) / r  # PEFT's alpha / r
        part = Part(seg.start, seg.size, int(a.shape[0]), scale * a.shape[0])
        parts.setdefault(seg.module, []).append((part, a, b))
    if not parts:
        raise CheckpointError(f"{file} holds no LoRA matrices")
    return parts, heads


def _with_head(model: Transformer, labels: list[str], pooling: Any,
               pooler: bool) -> Transformer:
    """A copy of `model` with a (fresh) classification head for `labels`."""
    changes: dict[str, Any] = {"labels": list(labels), "pooler": pooler}
    if isinstance(pooling, str):
        changes["pooling"] = pooling
    param = next(model.parameters())
    new = Transformer(model.config.replace(**changes)).to(device=param.device, dtype=param.dtype)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("classifier.", "pooler."))}
    new.load_state_dict(state, strict=False)
    return new.eval()


def adapter_base(adapter: str | Path, base: str | Path | None = None) -> str | Path:
    """The base model of an adapter: `base`, or the adapter's base_model_name_or_path (a
    directory, relative to the adapter's folder or to here, or a name such as
    all-MiniLM-L6-v2). `qkv.load(adapter)` loads it, then the adapter."""
    adapter = Path(adapter)
    if base is not None:
        return base
    config = _read_json(adapter / ADAPTER_CONFIG)
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        raise CheckpointError(f"{adapter / ADAPTER_CONFIG} names no base model "
                              "(base_model_name_or_path); pass the base model too")
    if not Path(named).exists() and (adapter / named).exists():
        return adapter / named
    return named
