"""Capture everything a model computes on one text, for maps and the web explainer.

    cap = qkv.explain.capture(model, tokenizer, "The animal didn't cross the street")
    cap.tokens, cap.ids                         # the pieces and their ids
    cap.attention["decoder.layers.0.self_attn"] # (n_heads, Tq, Tk): softmax weights
    cap.stages("decoder.layers.0.self_attn", head=3)  # scores, scaled, masked, weights, output
    cap.logits                                  # (T, vocab_size), fp32, the full vocabulary
    cap.lens(layer)                             # logit lens: the output layer read at `layer`
    cap.save_npz("maps.npz")

How: the model runs its ordinary forward pass once, inside `record_attention(model,
inputs=True)`. Only the attention layers switch to their explicit path (which keeps the weights,
and the queries, keys, values and mask they came from); every other layer runs as usual.
Forward hooks, removed afterwards, copy the residual stream after each block, the inputs of the
feed-forward down-projection (its activations) and the statistics of each norm's input. The
per-head stages (Q.K -> scaled -> masked -> softmax -> .V) are recomputed on request from the
recorded inputs by `qkv.layers.attention.attention_stages`, the same code as the explicit path,
so a 12 x 12-head capture does not hold five copies of every map.

Families: a decoder reads its tokens; an encoder reads its tokens (with [CLS]/[SEP]) and
reports masked-LM logits and, if it has a classifier, class probabilities; an encoder-decoder
reads the source and a target (given, or its own greedy translation) and reports the
cross-attention of every decoder layer: the source x target alignment.

A recurrent translator of qkv.baselines with attention (an `RNNTranslator`) gives family "rnn":
its Bahdanau alignment, (1, target, source) under the attention module's name ("attention"),
recorded by the same `record_attention` while it reads the source and the target once.

Any alignment matrix can be shown the same way: `Capture.attention` maps a name to a
(heads, queries, keys) array, and `alignment(...)` builds a Capture from a bare matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..baselines import RNNTranslator
from ..batching import evaluating
from ..checkpoint import CONFIG, load
from ..data.parallel import translation_ids
from ..errors import InputError
from ..generate import decode_tokens, filter_logits
from ..io import read_config_json
from ..layers.attention import AttentionInputs, attention_stages, record_attention
from ..layers.norm import LayerNorm, RMSNorm
from ..model import Transformer
from ..seq2seq import generate_seq2seq
from ..tokenizer import Tokenizer

STAGES = ("scores", "scaled", "masked", "weights", "output")


@dataclass
class Capture:
    """What a model computed on one text (batch of one; every array drops the batch axis)."""

    family: str
    tokens: list[str]  # the pieces of the input (the source, for an encoder-decoder)
    ids: list[int]
    target_tokens: list[str] = field(default_factory=list)  # encoder-decoder: the target
    target_ids: list[int] = field(default_factory=list)
    #: name -> (n_heads, Tq, Tk) softmax weights; names are the model's module paths
    attention: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, AttentionInputs] = field(default_factory=dict)
    token_embedding: dict[str, torch.Tensor] = field(default_factory=dict)  # stack -> (T, d)
    position: dict[str, torch.Tensor] = field(default_factory=dict)  # stack -> (T, d) or angles
    position_kind: str = "learned"
    residual: dict[str, torch.Tensor] = field(default_factory=dict)  # "<stack>.<i>" -> (T, d)
    ffn: dict[str, torch.Tensor] = field(default_factory=dict)  # block -> (T, d_ff)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # norm -> (T, 2): mean, std
    logits: torch.Tensor | None = None  # (T, vocab_size) fp32
    classes: dict[str, float] = field(default_factory=dict)  # label -> probability
    model: Transformer | None = field(default=None, repr=False)  # None for an RNN

    # ------------------------------------------------------------------ attention
    def layers(self) -> list[str]:
        """Names of the recorded attention layers, in the order the model ran them."""
        return list(self.attention)

    def stages(self, name: str, head: int | None = None) -> dict[str, torch.Tensor]:
        """Q.K -> scaled -> masked -> softmax -> .V of layer `name`: each (H, Tq, Tk), or
        (Tq, Tk) for one head ("output" is (H, Tq, d_head)). Recomputed from the recorded
        queries, keys and values by the attention module's own explicit path."""
        if name not in self.attention:
            raise InputError(f"no attention layer {name!r}; recorded: "
                             f"{', '.join(self.attention)}")
        if name not in self.inputs:  # a bare alignment matrix: its weights are all there is
            w = self.attention[name]
            if head is not None and not 0 <= head < w.shape[0]:
                raise InputError(f"head {head} is outside 0..{w.shape[0] - 1}")
            return {"weights": w if head is None else w[head]}
        q, k, v, mask, causal = self.inputs[name]
        if head is not None:
            n = q.shape[1]
            if not 0 <= head < n:
                raise InputError(f"head {head} is outside 0..{n - 1}")
            group = n // k.shape[1]  # GQA: the key/value head this query head reads
            q, k, v = q[:, head:head + 1], k[:, head // group:head // group + 1], \
                v[:, head // group:head // group + 1]
            if mask is not None and mask.dim() == 4 and mask.shape[1] > 1:
                mask = mask[:, head:head + 1]
        with torch.no_grad():
            out = attention_stages(q.float(), k.float(), v.float(), mask, causal)
        return {s: t[0, 0] if head is not None else t[0] for s, t in out.items()}

    def mask(self, name: str) -> torch.Tensor:
        """(Tq, Tk) bool: True where a query may look at a key (causal and padding rules)."""
        return torch.isfinite(self.stages(name, 0)["masked"])

    # ------------------------------------------------------------------ the output layer
    def probs(self, position: int = -1, temperature: float = 1.0, top_k: int | None = None,
              top_p: float | None = None) -> torch.Tensor:
        """The distribution sampling draws from at `position`, over the full vocabulary (V,):
        softmax of the logits / temperature, tokens outside top-k / top-p at exactly 0, as
        `qkv.generate` filters them; temperature 0 puts all mass on the best token."""
        if self.logits is None:
            raise InputError("this capture has no logits")
        logits = self.logits[position][None].float()  # (1, V)
        return next_token_probs(logits, temperature, top_k, top_p)[0]

    def lens(self, key: str, position: int | None = None) -> torch.Tensor:
        """Logit lens (nostalgebraist 2020): the output layer applied to the residual stream
        after block `key` ("decoder.3"), through the stack's final norm: (T, V) fp32, or (V,)
        at one position."""
        if self.model is None or key not in self.residual:
            raise InputError(f"no residual stream {key!r}; recorded: {', '.join(self.residual)}")
        stack = getattr(self.model, key.split(".")[0])
        h = self.residual[key]  # (T, d)
        if position is not None:
            if not -h.shape[0] <= position < h.shape[0]:
                raise InputError(f"position {position} is outside the {h.shape[0]} tokens")
            h = h[position]  # (d,)
        with torch.no_grad():
            return self.model.logits(stack.norm(h)).float()

    # ------------------------------------------------------------------ export
    def arrays(self) -> dict[str, np.ndarray]:
        """Every captured tensor as a numpy array, under a flat name (for .npz)."""
        out: dict[str, np.ndarray] = {"ids": np.asarray(self.ids, dtype=np.int64),
                                      "tokens": np.asarray(self.tokens, dtype=str)}
        if self.target_ids:
            out["target_ids"] = np.asarray(self.target_ids, dtype=np.int64)
            out["target_tokens"] = np.asarray(self.target_tokens, dtype=str)
        for name in self.attention:
            if name in self.inputs:
                for stage, t in self.stages(name).items():
                    out[f"attention/{name}/{stage}"] = t.float().numpy()
            else:
                out[f"attention/{name}/weights"] = self.attention[name].float().numpy()
        groups = (("token_embedding", self.token_embedding), ("position", self.position),
                  ("residual", self.residual), ("ffn", self.ffn), ("norm", self.norms))
        for prefix, tensors in groups:
            for name, t in tensors.items():
                out[f"{prefix}/{name}"] = t.float().numpy()
        if self.logits is not None:
            out["logits"] = self.logits.float().numpy()
        return out

    def save_npz(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez_compressed(path, **self.arrays())  # type: ignore[arg-type]
        return path


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities that `qkv.generate.sample_next` draws from."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise InputError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k={top_k} must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p={top_p} must be in (0, 1]")


def draw_next(model: Transformer, ids: Sequence[int], temperature: float = 1.0,
              top_k: int | None = None, top_p: float | None = None,
              seed: int | None = None) -> int:
    """The token `qkv generate` would produce first after `ids` with this seed: the same
    decoding function, the same generator."""
    _check_sampling(temperature, top_k, top_p)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        token = next(iter(decode_tokens(model, [list(ids)], 1, temperature, top_k, top_p,
                                        generator)))
    finally:
        model.train(was_training)
    return int(token[0])


@torch.no_grad()
def replay_steps(model: Transformer, ids: Sequence[int], steps: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None) -> list[dict]:
    """Step-by-step generation with the KV cache growing: [{"id", "cache", "attention"}].

    The tokens are those `qkv generate` draws (the same decoding function and seed). They are
    then fed back one at a time through the model's cache path, recording attention: step i
    reads a cache of len(ids) + i positions, and "attention" maps each layer to the new token's
    weights over them, (n_heads, cache).
    """
    _check_sampling(temperature, top_k, top_p)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    room = model.config.max_seq_len - len(ids)
    steps = max(0, min(steps, room))
    was_training = model.training
    model.eval()
    try:
        drawn = [int(t[0]) for t in decode_tokens(model, [list(ids)], steps, temperature, top_k,
                                                  top_p, generator, on_full="stop")]
        cache = model.new_cache()
        out = []
        feed = torch.tensor([list(ids)], dtype=torch.long, device=device)  # (1, T)
        for token in drawn:
            with record_attention(model) as maps:
                model.next_token_logits(feed, cache)
            rows = {name: r[0][0, :, -1].float() for name, r in maps.items() if r}  # (H, cache)
            out.append({"id": token, "cache": len(cache), "attention": rows})
            feed = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------- capturing

def encode(model: Transformer, tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids the model reads for `text`: a decoder's as `qkv generate` encodes a prompt
    (no special tokens); an encoder's and a source's with them ([CLS] ... [SEP], ... </s>)."""
    if not isinstance(text, str):
        raise InputError(f"text must be a str, got {type(text).__name__}")
    decoder = model.config.family == "decoder"
    ids = tokenizer.encode(text, add_special_tokens=not decoder)
    if not ids:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise InputError("the text is empty and the tokenizer has no start token")
        ids = [start]
    limit = model.config.max_seq_len
    if len(ids) > limit:
        raise InputError(f"the text has {len(ids)} tokens but the model's context is {limit}")
    return ids


def pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.id_to_token(i) or f"<{i}>" for i in ids]


@torch.no_grad()
def capture(model: Transformer | RNNTranslator, tokenizer: Tokenizer, text: str,
            target: str | None = None, max_target_tokens: int = 48) -> Capture:
    """Run `model` once on `text` and keep every stage (see the module docstring).

    target: for an encoder-decoder (or a recurrent translator), the target text; None decodes
    the model's own greedy translation (up to max_target_tokens) so that the cross-attention
    shows its alignment.
    """
    if isinstance(model, RNNTranslator):
        return capture_rnn(model, tokenizer, text, target, max_target_tokens)
    if not isinstance(model, Transformer):
        raise InputError(f"capture needs a qkv Transformer or RNNTranslator, got "
                         f"{type(model).__name__}")
    cfg = model.config
    ids = encode(model, tokenizer, text)
    device = next(model.parameters()).device
    src = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    cap = Capture(family=cfg.family, tokens=pieces(tokenizer, ids), ids=list(ids), model=model)
    tgt = None
    if cfg.family == "encoder-decoder":
        cap.target_ids = _target_ids(model, tokenizer, src, target, max_target_tokens)
        cap.target_tokens = pieces(tokenizer, cap.target_ids)
        tgt = torch.tensor([cap.target_ids], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    hooks = _Hooks(model, cap)
    try:
        with record_attention(model, inputs=True) as maps:
            logits = model(src, tgt) if tgt is not None else model(src)  # (1, T, V)
            if model.classifier is not None:
                probs = model.classify(src).float().softmax(-1)[0]  # (num_labels,)
                cap.classes = dict(zip(cfg.labels, probs.tolist(), strict=True))
    finally:
        hooks.remove()
        model.train(was_training)
    cap.logits = logits[0].float()
    for name, recorded in maps.items():
        if not name.endswith(":inputs") and recorded:
            cap.attention[name] = recorded[0][0].float()  # the forward call, not classify's
            first = maps[name + ":inputs"][0]
            cap.inputs[name] = first
    _embeddings(model, cap, src, tgt)
    return cap


@torch.no_grad()
def capture_rnn(model: RNNTranslator, tokenizer: Tokenizer, text: str, target: str | None = None,
                max_target_tokens: int = 48) -> Capture:
    """The Bahdanau alignment of a recurrent translator on `text` (family "rnn").

    The source is encoded as the translation task encodes it (its pieces and </s>); the target
    starts with <s> and is `target`, or the model's own greedy translation. The model reads both
    once (teacher forcing) inside `record_attention`; each decoder step records its weights over
    the source, (1, 1, 1, S), and the steps stack into attention["attention"]: (1, T, S), row t
    the weights the step that reads target token t used."""
    if not model.config.attention:
        raise InputError("this recurrent translator has no attention (attention: false in its "
                         "config), so it has no alignment to show")
    if not isinstance(text, str):
        raise InputError(f"text must be a str, got {type(text).__name__}")
    _, bos, eos = translation_ids(tokenizer)
    ids = [*tokenizer.encode(text, add_special_tokens=False)[:model.config.max_seq_len - 1], eos]
    device = next(model.parameters()).device
    src = torch.tensor([ids], dtype=torch.long, device=device)  # (1, S)
    if target is None:
        tail = generate_seq2seq(model, src, max_new_tokens=max_target_tokens, start_id=bos,
                                eos_id=eos)[0]
    else:
        tail = tokenizer.encode(target, add_special_tokens=False)
    target_ids = [bos, *tail]
    tgt = torch.tensor([target_ids], dtype=torch.long, device=device)  # (1, T)
    with evaluating(model), record_attention(model) as maps:
        logits = model(src, tgt)  # (1, T, V)
    steps = maps["attention"]  # T tensors, each (1, 1, 1, S)
    weights = torch.cat(steps, dim=2)[0].float()  # (1, T, S): one "head"
    return Capture(family="rnn", tokens=pieces(tokenizer, ids), ids=ids,
                   target_tokens=pieces(tokenizer, target_ids), target_ids=target_ids,
                   attention={"attention": weights}, logits=logits[0].float())


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[Transformer | RNNTranslator, Tokenizer]:
    """(model, tokenizer) of what `capture` reads: a qkv or Hugging Face directory (or a name
    `qkv.load` resolves), or a recurrent translator saved by `qkv train --family rnn`."""
    folder = Path(path)
    if (folder / CONFIG).is_file() and read_config_json(folder).get("family") == "rnn":
        from ..tasks.translate import load_translator  # only for this family: it pulls in train

        rnn, tok = load_translator(folder, device)
        if isinstance(rnn, RNNTranslator) and not rnn.config.attention:
            raise InputError(f"{path} is a recurrent translator without attention (attention: "
                             "false in its config.json): it has no alignment to show")
        return rnn, tok
    model, tokenizer = load(path, device)
    if tokenizer is None:
        raise InputError(f"{path} has no tokenizer.json, so its text cannot be encoded")
    return model, tokenizer


def _target_ids(model: Transformer, tokenizer: Tokenizer, src: torch.Tensor,
                target: str | None, limit: int) -> list[int]:
    cfg = model.config
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None \
        else cfg.bos_token_id
    if start is None:
        raise InputError("the model config has no decoder_start_token_id or bos_token_id")
    if target is None:
        return [start] + generate_seq2seq(model, src, max_new_tokens=limit)[0]
    return [start] + tokenizer.encode(target, add_special_tokens=False)


class _Hooks:
    """Forward hooks that copy the residual stream, FF activations and norm statistics."""

    def __init__(self, model: Transformer, cap: Capture):
        self.handles = []
        for stack_name in ("encoder", "decoder"):
            stack = getattr(model, stack_name)
            if stack is None:
                continue
            first = stack.layers[0]
            self.handles.append(first.register_forward_pre_hook(
                self._keep_input(cap.residual, f"{stack_name}.embed")))
            for i, block in enumerate(stack.layers):
                self.handles.append(block.register_forward_hook(
                    self._keep_output(cap.residual, f"{stack_name}.{i}")))
                self.handles.append(block.ffn.down.register_forward_pre_hook(
                    self._keep_input(cap.ffn, f"{stack_name}.{i}")))
            for name, m in stack.named_modules():
                if isinstance(m, (LayerNorm, RMSNorm)):
                    self.handles.append(m.register_forward_pre_hook(
                        self._keep_stats(cap.norms, f"{stack_name}.{name}")))

    @staticmethod
    def _keep_input(into: dict, key: str):
        def hook(module: nn.Module, args: tuple) -> None:
            into.setdefault(key, args[0][0].detach().float())  # (T, d); first call only
        return hook

    @staticmethod
    def _keep_output(into: dict, key: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            into.setdefault(key, output[0].detach().float())  # (T, d)
        return hook

    @staticmethod
    def _keep_stats(into: dict, key: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0][0].detach().float()  # (T, d)
            into.setdefault(key, torch.stack((x.mean(-1), x.std(-1, correction=0)), -1))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _embeddings(model: Transformer, cap: Capture, src: torch.Tensor,
                tgt: torch.Tensor | None) -> None:
    """The token vectors and the positional term each stack adds (or RoPE's angles)."""
    streams = [("encoder", src), ("decoder", tgt)] if tgt is not None else \
        [("encoder" if model.encoder is not None else "decoder", src)]
    cap.position_kind = model.config.position
    for stack_name, ids in streams:
        stack = getattr(model, stack_name)
        cap.token_embedding[stack_name] = model.token_embedding(ids)[0].float()  # (T, d)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]  # (1, T)
        if stack.positions is not None:
            cap.position[stack_name] = stack.positions(positions)[0].float()  # (T, d)
        elif stack.rope is not None:
            cos, sin = stack.rope(positions)  # (1, 1, T, d_head) each
            cap.position[stack_name] = torch.atan2(sin[0, 0], cos[0, 0])  # (T, d_head) angles


def alignment(matrix: torch.Tensor | np.ndarray, source: Sequence[str],
              target: Sequence[str], name: str = "alignment") -> Capture:
    """A Capture holding one (target x source) alignment matrix, e.g. an RNN's Bahdanau
    attention, so that `plots` and the web explainer show it like a Transformer's."""
    m = torch.as_tensor(np.asarray(matrix), dtype=torch.float32)
    if m.dim() == 2:
        m = m[None]  # (1, Tq, Tk): one "head"
    if m.dim() != 3 or m.shape[1:] != (len(target), len(source)):
        raise InputError(f"an alignment of {len(target)} target x {len(source)} source tokens "
                         f"must have shape ({len(target)}, {len(source)}), got "
                         f"{tuple(m.shape)}")
    return Capture(family="alignment", tokens=list(source), ids=[],
                   target_tokens=list(target), attention={name: m})
