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

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..io import WEIGHTS, read_json_object, read_safetensors

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


Tensors = dict[str, torch.Tensor]


def _unchanged(tensors: Tensors, _: Any) -> Tensors:
    return tensors


@dataclass(frozen=True)
class Architecture:
    """What qkv knows of one Hugging Face architecture; each module (gpt2, bert, ...) makes one.

    model_type: config.json's model_type. prefix: the base model's name prefix in a checkpoint
    with a head (``transformer.``, ``bert.``, ``model.``). config_from_hf(config.json, tensor
    shapes) and config_to_hf translate the config; rules(cfg) lists where every qkv tensor lives;
    ignored(cfg) the Hugging Face tensors that hold nothing to load (regular expressions);
    mismatch(cfg) says why a config cannot be written, or None. prepare(tensors, config.json)
    accepts other spellings on load; finish_hf(tensors, cfg) adds duplicated tensors on save.
    base_architecture: the head-less class, whose tensors are written without the prefix.
    """

    model_type: str
    prefix: str
    config_from_hf: Callable[[dict[str, Any], dict[str, list[int]]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    rules: Callable[[ModelConfig], list[Rule]]
    ignored: Callable[[ModelConfig], list[str]]
    mismatch: Callable[[ModelConfig], str | None]
    prepare: Callable[[Tensors, dict[str, Any]], Tensors] = _unchanged
    finish_hf: Callable[[Tensors, ModelConfig], Tensors] = _unchanged
    base_architecture: str | None = None


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
    weight_map = read_json_object(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and "/" not in v and v not in (".", "..")
            for v in weight_map.values()):
        raise CheckpointError(f"{index_file} is not a valid safetensors index (its weight_map "
                              "must be an object of tensor name -> shard file name)")
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


# ---------------------------------------------------------------------------- what fits


#: One condition for writing a config as an architecture: (ok, what the config has, what the
#: architecture needs). A list of them is read by `first_mismatch`.
Check = tuple[bool, str, str]

_ARTICLES = {"encoder": "an encoder", "decoder": "a decoder",
             "encoder-decoder": "an encoder-decoder"}


def first_mismatch(arch: str, base: str, checks: list[Check]) -> str | None:
    """The sentence for the first failed check."""
    for ok, what, need in checks:
        if not ok:
            return (f"{base} with {what} fits no Hugging Face architecture qkv can write "
                    f"({arch} needs {need})")
    return None


def family_is(cfg: ModelConfig, family: str) -> Check:
    return cfg.family == family, f"family {cfg.family}", _ARTICLES[family]


def positions_are(cfg: ModelConfig, kind: str, offset: int = 0) -> list[Check]:
    """The position scheme; learned tables also start at `offset`."""
    checks = [(cfg.position == kind, f"{cfg.position} positions", f"{kind} positions")]
    if kind == "learned":
        checks.append((cfg.position_offset == offset, f"position_offset={cfg.position_offset}",
                       f"position_offset={offset}"))
    return checks


def layout_is(cfg: ModelConfig, norm: str, placement: str) -> list[Check]:
    """The norm, where it sits, and the final norm that goes with it (pre-LN has one)."""
    pre = placement == "pre"
    return [
        (cfg.norm == norm, cfg.norm, norm),
        (cfg.norm_placement == placement, "post-LN" if pre else "pre-LN", f"{placement}-LN"),
        (cfg.final_norm == pre, "no final norm" if pre else "a final norm",
         "a final norm" if pre else "no final norm"),
    ]


def plain_layers(cfg: ModelConfig) -> list[Check]:
    """GPT-2, BERT and the fairseq family: a non-gated activation, biases, and one key/value
    head per query head, the heads splitting d_model."""
    return [
        (cfg.activation in ACTIVATIONS_TO_HF, f"activation {cfg.activation}",
         "a non-gated activation"),
        (cfg.bias, "bias=False", "biases"),
        (cfg.n_kv_heads == cfg.n_heads, "grouped-query attention", "as many kv heads as heads"),
        (cfg.n_heads * cfg.head_dim == cfg.d_model, f"head_dim={cfg.head_dim}",
         "head_dim = d_model / n_heads"),
    ]


_FEATURES: dict[str, tuple[Callable[[ModelConfig], bool], str, str]] = {
    "scale_embeddings": (lambda c: c.scale_embeddings, "scale_embeddings", "unscaled embeddings"),
    "embedding_norm": (lambda c: c.embedding_norm, "embedding_norm", "no embedding norm"),
    "token_types": (lambda c: c.type_vocab_size > 0, "token types", "no token types"),
    "lm_head_bias": (lambda c: c.lm_head_bias, "an output bias", "no output bias"),
    "encoder_heads": (lambda c: c.mlm_transform or c.pooler or bool(c.labels), "an encoder head",
                      "only the LM head"),
}


def without(cfg: ModelConfig, *features: str) -> list[Check]:
    """Checks that `cfg` has none of `features` (scale_embeddings, embedding_norm, token_types,
    lm_head_bias, encoder_heads)."""
    return [(not has(cfg), what, need) for has, what, need in (_FEATURES[f] for f in features)]


# ---------------------------------------------------------------------------- the fairseq family
# Marian and BART (their Hugging Face code comes from fairseq) share names, sizes and layout.


def seq2seq_prepare(tensors: Tensors, hf: dict[str, Any]) -> Tensors:
    """Find the one token embedding of the encoder, the decoder and the output layer.

    transformers 4 always shares ``shared`` with ``encoder.embed_tokens`` and
    ``decoder.embed_tokens``; transformers 5 unties all of them when tie_word_embeddings is
    false, and then the stacks read their own copies. qkv has one token table, so the copies in
    use must be equal.
    """
    tensors = dict(tensors)
    copies = [tensors[k] for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
              if k in tensors]
    if len(copies) == 2 and not torch.equal(copies[0], copies[1]):
        raise unsupported(hf.get("model_type", "seq2seq"), "different token embeddings in the "
                          "encoder and the decoder (qkv shares one table)")
    untied = get(hf, "tie_word_embeddings", True) is False
    if copies and (untied or "shared.weight" not in tensors):
        tensors["shared.weight"] = copies[0]
    return tensors


def seq2seq_finish_hf(tensors: Tensors, cfg: ModelConfig) -> Tensors:
    """On save: an untied model also gets the stacks' own embedding copies (transformers 5
    reads them instead of ``shared`` when tie_word_embeddings is false)."""
    if not cfg.tie_embeddings:
        for stack in ("encoder", "decoder"):
            tensors[f"{stack}.embed_tokens.weight"] = tensors["shared.weight"].clone()
    return tensors


def seq2seq_sizes(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The sizes BART-family configs give per stack, checked to be equal where qkv shares them."""
    for enc, dec, what in (("encoder_attention_heads", "decoder_attention_heads", "head counts"),
                           ("encoder_ffn_dim", "decoder_ffn_dim", "feed-forward widths")):
        if get(hf, enc) != get(hf, dec):
            raise unsupported(model_type, f"different encoder and decoder {what} ({enc}="
                              f"{get(hf, enc)}, {dec}={get(hf, dec)})")
    vocab = int(get(hf, "vocab_size", 58101))
    decoder_vocab = get(hf, "decoder_vocab_size", vocab)
    if decoder_vocab != vocab or hf.get("share_encoder_decoder_embeddings") is False:
        raise unsupported(model_type, "separate source and target vocabularies "
                          "(share_encoder_decoder_embeddings=false)")
    enc_layers = int(get(hf, "encoder_layers", 6))
    return dict(
        vocab_size=vocab,
        d_model=int(get(hf, "d_model", 512)),
        n_layers=enc_layers,
        n_encoder_layers=enc_layers,
        n_decoder_layers=int(get(hf, "decoder_layers", 6)),
        n_heads=int(get(hf, "encoder_attention_heads", 8)),
        d_ff=int(get(hf, "encoder_ffn_dim", 2048)),
        max_seq_len=int(get(hf, "max_position_embeddings", 512)),
        dropout=float(get(hf, "dropout", 0.0)),
        attention_dropout=float(get(hf, "attention_dropout", 0.0)),
        pad_token_id=token_id(hf, "pad_token_id", vocab),
        bos_token_id=token_id(hf, "bos_token_id", vocab),
        eos_token_id=token_id(hf, "eos_token_id", vocab),
        decoder_start_token_id=token_id(hf, "decoder_start_token_id", vocab),
    )


def seq2seq_rules(cfg: ModelConfig, learned_positions: bool = False) -> list[Rule]:
    """The tensors of a BART-family encoder-decoder (Marian, BART), stack by stack."""
    d = cfg.n_heads * cfg.head_dim
    out = [copy("token_embedding.weight", "shared.weight")]
    for stack, n in (("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers)):
        if learned_positions:  # BART: learned tables and a LayerNorm after the embeddings
            out.append(copy(f"{stack}.positions.weight", f"{stack}.embed_positions.weight"))
            out += norm(f"{stack}.embed_norm", f"{stack}.layernorm_embedding")
        for i in range(n):
            h = q = f"{stack}.layers.{i}"
            attn = "attn" if stack == "encoder" else "self_attn"
            out += fused(f"{q}.{attn}.qkv", [f"{h}.self_attn.{p}_proj" for p in "qkv"],
                         [d, d, d])
            out += linear(f"{q}.{attn}.out", f"{h}.self_attn.out_proj")
            out += norm(f"{q}.{attn}_norm", f"{h}.self_attn_layer_norm")
            if stack == "decoder":
                out += linear(f"{q}.cross_attn.q", f"{h}.encoder_attn.q_proj")
                out += fused(f"{q}.cross_attn.kv", [f"{h}.encoder_attn.{p}_proj" for p in "kv"],
                             [d, d])
                out += linear(f"{q}.cross_attn.out", f"{h}.encoder_attn.out_proj")
                out += norm(f"{q}.cross_attn_norm", f"{h}.encoder_attn_layer_norm")
            out += linear(f"{q}.ffn.up", f"{h}.fc1")
            out += linear(f"{q}.ffn.down", f"{h}.fc2")
            out += norm(f"{q}.ffn_norm", f"{h}.final_layer_norm")
    if cfg.lm_head_bias:
        out.append(Rule("lm_head.bias", ("final_logits_bias",), "row", head=True))
    if not cfg.tie_embeddings:
        out.append(copy("lm_head.weight", "lm_head.weight", head=True))
    return out


def seq2seq_ignored(cfg: ModelConfig) -> list[str]:
    """Copies of the shared embedding (and of the output layer when tied)."""
    out = [r"(encoder|decoder)\.embed_tokens\.weight"]
    if cfg.tie_embeddings:
        out.append(r"lm_head\.weight")
    return out


def seq2seq_checks(cfg: ModelConfig) -> list[Check]:
    """What Marian and BART both need."""
    return [
        family_is(cfg, "encoder-decoder"),
        *layout_is(cfg, "layernorm", "post"),
        (cfg.norm_eps == 1e-5, f"norm_eps={cfg.norm_eps}", "norm_eps=1e-5"),
        *plain_layers(cfg),
        *without(cfg, "token_types", "encoder_heads"),
    ]


def seq2seq_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields Marian and BART share."""
    return {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.n_encoder_layers,
        "decoder_layers": cfg.n_decoder_layers,
        "encoder_attention_heads": cfg.n_heads,
        "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.d_ff,
        "decoder_ffn_dim": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": 0.0,
        "scale_embedding": cfg.scale_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "is_encoder_decoder": True,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "use_cache": True,
    }
