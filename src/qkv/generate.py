"""Generating text: the model predicts a distribution over the next token, we pick one, append
it, and repeat.

    text = qkv.generate(model, tokenizer, "ROMEO:", max_new_tokens=200, temperature=0.8)

How the next token is picked from the logits (the scores before softmax):

- greedy (temperature=0): always the most likely token; deterministic.
- temperature T: softmax(logits / T). T < 1 sharpens the distribution (safer, duller text), T > 1
  flattens it (more surprising, more mistakes).
- top-k: only the k most likely tokens may be drawn.
- top-p ("nucleus", Holtzman et al. 2020): only the smallest set of most likely tokens whose
  probabilities add up to at least p.

A KV cache makes each new token cost one position instead of the whole sequence: the keys and
values of earlier positions never change, so every attention layer keeps them (see
`qkv.layers.attention.KVCache`) and the model only runs on the newest token.

Several prompts are generated together as one batch. Prompts of different lengths are padded on
the *left*, so that every row ends with its last real token; a padding mask hides the padding
from attention and explicit positions number each row's real tokens from 0.

The context limit (max_seq_len): a prompt longer than the context is an error unless
truncate_left=True keeps its end. When generation fills the context, on_full="slide" (default)
keeps going: the oldest quarter of the window is dropped and the cache is rebuilt from the newest
three quarters; on_full="stop" ends generation there instead.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

Stream = Callable[..., None]


# ---------------------------------------------------------------------- choosing the next token

def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Set to -inf the logits of tokens outside the top-k / top-p set. logits: (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1) the k-th best score
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
        drop_sorted = mass_before >= top_p  # never drops the best token (mass_before = 0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row from logits (B, V): greedy when temperature == 0. Returns (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---------------------------------------------------------------------- token-level decoding

def _pad_left(rows: list[list[int]], device: torch.device):
    """A left-padded batch: ids (B, T), padding mask (B, T) or None, positions (B, T) or None."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows], dtype=torch.long, device=device)
    if all(len(r) == T for r in rows):
        return ids, None, None  # no padding: the fast path, default positions
    mask = torch.tensor([[False] * (T - len(r)) + [True] * len(r) for r in rows], device=device)
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # each row counts from 0
    return ids, mask, positions


def _vector_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, as a matrix-vector product when x is a single bf16 vector on the CPU."""
    if x.numel() == x.shape[-1] and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        y = torch.mv(layer.weight, x.reshape(-1))  # (out_features,)
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*x.shape[:-1], -1)
    return F.linear(x, layer.weight, layer.bias)


@contextlib.contextmanager
def _vector_linears(model: nn.Module) -> Iterator[None]:
    """While decoding one token of one sequence, run the linear layers of a bf16 CPU model as
    matrix-vector products (`torch.mv`).

    Each new token multiplies every weight matrix by a single vector, so the time goes into
    streaming the weights through the CPU. For bf16 weights PyTorch's `mv` kernel does that
    about 1.5x faster than the general matrix-multiply path `nn.Linear` takes (measured with
    torch 2.x on a Sapphire Rapids CPU); the products are the same, summed in fp32 by both.
    Only this model's layers change, and only inside the block.
    """
    if model.tokens.weight.dtype != torch.bfloat16 or model.tokens.weight.device.type != "cpu":
        yield
        return
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    for layer in layers:
        layer.forward = functools.partial(_vector_linear, layer)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # back to nn.Linear.forward


def _last_logits(model, ids, mask, positions, cache) -> torch.Tensor:
    """Run the decoder on new tokens and return the logits of the last one only: (B, V)."""
    h = model.decoder(model.tokens(ids), mask, positions, cache=cache)  # (B, T, d_model)
    return model.logits(h[:, -1]).float()  # the output layer on one position, not T


@torch.inference_mode()
def decode_tokens(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None,
                  on_full: str = "slide") -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, (B,), step after step, with a KV cache.

    Each prompt must fit the context (see `generate` for truncation). The caller may stop early
    (stop strings, end-of-text) simply by not asking for more.
    """
    with _vector_linears(model):
        yield from _decode(model, [list(p) for p in prompts], max_new_tokens, temperature, top_k,
                           top_p, generator, on_full)


def _decode(model, rows: list[list[int]], max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, generator: torch.Generator | None,
            on_full: str) -> Iterator[torch.Tensor]:
    context = model.config.max_seq_len
    device = next(model.parameters()).device
    produced, keep = 0, context
    while produced < max_new_tokens:
        # (Re)fill the cache with the last `keep` tokens of every row.
        cache = model.new_cache()
        ids, mask, positions = _pad_left([r[-keep:] for r in rows], device)
        logits = _last_logits(model, ids, mask, positions, cache)  # (B, V)
        length = ids.shape[1]  # positions held in the cache
        while True:
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            for row, t in zip(rows, token.tolist(), strict=True):
                row.append(t)
            produced += 1
            yield token
            if produced >= max_new_tokens:
                return
            if length >= context:  # no room for one more position
                if on_full == "stop":
                    return
                keep = max(1, context - context // 4)  # slide: drop the oldest quarter
                break
            if mask is not None:  # the mask covers past + new tokens
                mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=1)
                positions = positions[:, -1:] + 1  # (B, 1)
            logits = _last_logits(model, token[:, None], mask, positions, cache)
            length += 1


# ---------------------------------------------------------------------- text in, text out

class _TextRow:
    """The text of one generated row, released piece by piece.

    Text that could be the start of a stop string (or half of a multi-byte character) is held
    back until the next tokens show what it is, so a stream never shows a stop string.
    """

    def __init__(self, tokenizer, stops: list[str], eos_id: int | None):
        self.tokenizer, self.stops, self.eos_id = tokenizer, stops, eos_id
        self.ids: list[int] = []
        self.emitted = 0  # characters released so far
        self.done = False

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token == self.eos_id:
            self.done = True
            return self.flush()
        self.ids.append(token)
        text = self.tokenizer.backend.decode(self.ids, skip_special_tokens=True)
        first = min((i for s in self.stops if (i := text.find(s, max(0, self.emitted - len(s)
                                                                       + 1))) >= 0),
                    default=-1)
        if first >= 0:
            self.done = True
            piece, self.emitted = text[self.emitted:first], first
            return piece
        safe = len(text.rstrip("\ufffd"))  # an unfinished UTF-8 character decodes as U+FFFD
        for s in self.stops:  # hold back a suffix that may grow into a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - n:safe] == s[:n]:
                    safe -= n
                    break
        piece = text[self.emitted:max(safe, self.emitted)]
        self.emitted += len(piece)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.backend.decode(self.ids, skip_special_tokens=True)
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece


def _check(model, temperature, top_k, top_p, max_new_tokens, on_full) -> None:
    if getattr(model, "decoder", None) is None or model.config.family != "decoder":
        raise InputError("generate needs a decoder (GPT-style) model; for an encoder-decoder "
                         "use generate_seq2seq")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens!r} must be a whole number >= 0")
    if not temperature >= 0:
        raise InputError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k={top_k!r} must be a whole number >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p={top_p} must be in (0, 1]")
    if on_full not in ("slide", "stop"):
        raise InputError(f"on_full={on_full!r} must be 'slide' or 'stop'")


def _prompt_ids(tokenizer, prompt: str, context: int, truncate_left: bool) -> list[int]:
    if not isinstance(prompt, str):
        raise InputError(f"a prompt must be a str, got {type(prompt).__name__}")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if not ids:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise InputError("the prompt is empty and the tokenizer has no start token")
        ids = [start]
    if len(ids) > context:
        if not truncate_left:
            raise InputError(f"the prompt has {len(ids)} tokens but the model's context is "
                             f"{context}; shorten it or pass truncate_left=True "
                             "(--truncate-left) to keep its end")
        ids = ids[-context:]
    return ids


def stream_generate(model, tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 100,
                    temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, stop: str | Sequence[str] | None = None,
                    seed: int | None = None, truncate_left: bool = False,
                    on_full: str = "slide") -> Iterator[tuple[int, str]]:
    """Like `generate`, as a generator of (prompt index, new text) as soon as it is known."""
    _check(model, temperature, top_k, top_p, max_new_tokens, on_full)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        return
    context = model.config.max_seq_len
    ids = [_prompt_ids(tokenizer, p, context, truncate_left) for p in prompts]
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    rows = [_TextRow(tokenizer, stops, tokenizer.eos_id) for _ in prompts]
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for token in decode_tokens(model, ids, max_new_tokens, temperature, top_k, top_p,
                                   generator, on_full):
            for i, (row, t) in enumerate(zip(rows, token.tolist(), strict=True)):
                piece = row.push(t)
                if piece:
                    yield i, piece
            if all(row.done for row in rows):
                break
        for i, row in enumerate(rows):
            if not row.done and (piece := row.flush()):
                yield i, piece
    finally:
        model.train(was_training)


def generate(model, tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 100,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop: str | Sequence[str] | None = None, seed: int | None = None,
             stream: Stream | None = None, truncate_left: bool = False,
             on_full: str = "slide") -> str | list[str]:
    """Continue `prompt` (a str, or a list of str generated as one batch) and return the new text.

    max_new_tokens: how many tokens to add at most.
    temperature, top_k, top_p: how the next token is drawn (temperature=0: greedy).
    stop: a string (or strings); generation of a row ends before its first occurrence, which is
        not part of the result. A row also ends at the tokenizer's end-of-text token.
    seed: makes sampling reproducible (None: PyTorch's global random generator).
    stream: called with each new piece of text as soon as it is final: stream(piece) for one
        prompt, stream(index, piece) for a list of prompts.
    truncate_left: keep the end of a prompt longer than the context instead of raising.
    on_full: "slide" or "stop" when the context is full (see the module docstring).
    Returns the generated text (without the prompt): a str, or a list of str for a list.
    """
    single = isinstance(prompt, str)
    texts = [""] * (1 if single else len(prompt))
    for i, piece in stream_generate(model, tokenizer, prompt, max_new_tokens, temperature,
                                    top_k, top_p, stop, seed, truncate_left, on_full):
        texts[i] += piece
        if stream is not None:
            stream(piece) if single else stream(i, piece)
    return texts[0] if single else texts


# ---------------------------------------------------------------------- encoder-decoder

@torch.inference_mode()
def generate_seq2seq(model, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 64, beam_size: int = 1, length_penalty: float = 1.0,
                     start_id: int | None = None, eos_id: int | None = None) -> list[list[int]]:
    """Translate-style decoding of an encoder-decoder: greedy (beam_size=1) or beam search.

    src_ids (B, S) and src_mask (B, S) are the source; the target starts with `start_id`
    (default: config.decoder_start_token_id, else bos) and ends at `eos_id`. Returns one list of
    target ids per source row, without the start token and the end token.

    Beam search keeps the `beam_size` best partial translations of each source, scored by the
    sum of their token log-probabilities; finished ones are compared after dividing that sum by
    length ** length_penalty, so that long translations are not unfairly penalised.
    """
    cfg = model.config
    if cfg.family != "encoder-decoder":
        raise InputError("generate_seq2seq needs an encoder-decoder model")
    start_id = start_id if start_id is not None else (
        cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None
        else cfg.bos_token_id)
    eos_id = eos_id if eos_id is not None else cfg.eos_token_id
    if start_id is None:
        raise InputError("the model config has no decoder_start_token_id or bos_token_id; "
                         "pass start_id")
    if beam_size < 1:
        raise InputError(f"beam_size={beam_size} must be at least 1")
    was_training = model.training
    model.eval()
    try:
        B, K = src_ids.shape[0], beam_size
        device = src_ids.device
        memory = model.encode(src_ids, src_mask)  # (B, S, d)
        # Every source row is repeated K times: row b * K + k is beam k of source b.
        memory = memory.repeat_interleave(K, dim=0)
        mask = None if src_mask is None else src_mask.repeat_interleave(K, dim=0)
        cache = model.new_cache()
        tokens = torch.full((B * K, 1), start_id, dtype=torch.long, device=device)
        scores = torch.zeros(B, K, device=device)
        scores[:, 1:] = float("-inf")  # at the start all beams are the same: keep one
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        alive = torch.ones(B * K, dtype=torch.bool, device=device)
        history = [[] for _ in range(B * K)]
        source_done = [False] * B  # K translations of this source have ended
        step_input = tokens
        for _ in range(max_new_tokens):
            logits = model.decode(step_input, memory, mask, cache=cache)[:, -1].float()
            logp = logits.log_softmax(dim=-1)  # (B*K, V)
            V = logp.shape[-1]
            logp[~alive] = float("-inf")
            total = (scores.view(-1, 1) + logp).view(B, K * V)  # every (beam, token) pair
            best, index = total.topk(2 * K, dim=-1)  # spares in case some beams end here
            beam, token = index // V, index % V  # (B, 2K)
            new_scores = torch.full((B, K), float("-inf"), device=device)
            new_rows, new_tokens, new_history = [], [], []
            for b in range(B):
                kept = 0
                for j in range(2 * K):
                    if source_done[b] or kept == K or best[b, j] == float("-inf"):
                        break
                    src_row = b * K + int(beam[b, j])
                    t = int(token[b, j])
                    if eos_id is not None and t == eos_id:
                        seq = history[src_row]
                        norm = float(best[b, j]) / max(1, len(seq) + 1) ** length_penalty
                        finished[b].append((norm, seq))
                        continue
                    new_scores[b, kept] = best[b, j]
                    new_rows.append(src_row)
                    new_tokens.append(t)
                    new_history.append(history[src_row] + [t])
                    kept += 1
                for _ in range(kept, K):  # fewer than K continue: pad with dead beams
                    new_rows.append(b * K)
                    new_tokens.append(start_id)
                    new_history.append([])
            source_done = [len(finished[b]) >= K for b in range(B)]
            done = all(source_done)
            scores = new_scores
            alive = scores.view(-1) > float("-inf")
            history = new_history
            if done or not alive.any():
                break
            cache.reorder(torch.tensor(new_rows, device=device))
            step_input = torch.tensor(new_tokens, device=device)[:, None]
        results = []
        for b in range(B):
            candidates = list(finished[b])
            for k in range(K):
                if scores[b, k] > float("-inf"):
                    seq = history[b * K + k]
                    norm = float(scores[b, k]) / max(1, len(seq)) ** length_penalty
                    candidates.append((norm, seq))
            results.append(max(candidates, key=lambda c: c[0])[1] if candidates else [])
        return results
    finally:
        model.train(was_training)
