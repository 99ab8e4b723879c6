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

Encoder-decoder models are decoded by `qkv.seq2seq.generate_seq2seq` (greedy or beam search).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .batching import eval_mode, model_device, pad_id, pad_rows
from .config import check_number, check_seed
from .errors import InputError
from .model import Transformer
from .seq2seq import generate_seq2seq
from .tokenizer import Tokenizer

__all__ = ["TextRow", "decode_tokens", "filter_logits", "generate", "generate_seq2seq",
           "sample_next", "stream_generate"]

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
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False  # never the best token (even when top_p rounds to 0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def all_finite(x: torch.Tensor) -> bool:
    """Whether a non-empty tensor holds no NaN and no inf. Its smallest and largest values tell
    (a NaN makes both NaN): one pass, about 100x faster than `torch.isfinite(x).all()` on a
    (8, 50257) batch of logits, which builds several masks of the whole tensor."""
    return bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row from logits (B, V): greedy when temperature == 0. Returns (B,).

    Logits that are NaN or infinite (a broken model) raise InputError instead of sampling
    from nonsense; any temperature > 0, however small, is safe (the best logit is
    subtracted before dividing, so nothing overflows)."""
    if not all_finite(logits):
        raise InputError("the model produced NaN/inf logits: its weights or config are broken")
    return _pick(logits, temperature, top_k, top_p, generator)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """`sample_next` on logits already checked to be finite."""
    if temperature == 0:
        # The first best token, as argmax gives; `max` finds it about 3x faster on a CPU
        # ((8, 50257) fp32 logits: about 100 us against 290 us).
        return logits.max(dim=-1).indices
    # fp64 for a temperature that fp32 would round to 0
    logits = logits.double() if temperature < 1e-30 else logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # (B, V), max 0
    logits = filter_logits(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def non_finite_error(model: Transformer, *inputs: torch.Tensor | None) -> InputError:
    """The error for NaN/inf logits, naming where they first appear when that is cheap to find:
    the first parameter holding NaN/inf, or else the first layer whose output does, found by
    running the prompt `inputs` (ids, mask, positions) once more with hooks. Only on this error
    path."""
    where = next((f"the weights ({name})" for name, p in model.named_parameters()
                  if p.is_floating_point() and not bool(torch.isfinite(p).all())), None)
    if where is None:
        first: list[str] = []

        def hook(name: str):
            def check(module: torch.nn.Module, args: object, output: object) -> None:
                if not first and isinstance(output, torch.Tensor) and \
                        output.is_floating_point() and not bool(torch.isfinite(output).all()):
                    first.append(name)
            return check
        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
        try:
            ids, mask, positions = (list(inputs) + [None, None, None])[:3]
            if ids is not None:
                model.next_token_logits(ids, model.new_cache(), mask, positions)
        except Exception:  # the hint is a courtesy: never hide the real error behind another
            pass
        finally:
            for h in handles:
                h.remove()
        where = f"the output of {first[0]}" if first else None
    return InputError("the model produced NaN/inf logits" +
                      (f"; they first appear in {where}" if where else "") +
                      ": its weights or config (norm_eps, dtype) are broken")


# ---------------------------------------------------------------------- token-level decoding

def _left_padded(rows: list[list[int]], pad: int, device: torch.device):
    """A left-padded batch: ids (B, T), padding mask (B, T) or None, positions (B, T) or None."""
    ids, real = pad_rows(rows, pad, side="left", device=device)  # (B, T) each
    if bool(real.all()):
        return ids, None, None  # no padding: the fast path, default positions
    positions = (real.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): each row counts from 0
    return ids, real.bool(), positions


@torch.inference_mode()
def decode_tokens(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None,
                  on_full: str = "slide", pad: int = 0) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, (B,), step after step, with a KV cache.

    Each prompt must fit the context (see `generate` for truncation). The caller may stop early
    (stop strings, end-of-text) simply by not asking for more. Prompts of different lengths are
    padded on the left with `pad` (`qkv.batching.pad_id(tokenizer)`; hidden by the mask). (For
    bf16 weights on a CPU, `qkv.quantize.pack_linears(model)` first makes each step faster.)
    """
    rows = [list(p) for p in prompts]
    context = model.config.max_seq_len
    device = model_device(model)
    produced, keep = 0, context
    while produced < max_new_tokens:
        # (Re)fill the cache with the last `keep` tokens of every row.
        ids, mask, positions = _left_padded([r[-keep:] for r in rows], pad, device)
        # room for the prompt and every token still to come (or a full context): no reallocation
        cache = model.new_cache(min(context, ids.shape[1] + max_new_tokens - produced))
        logits = model.next_token_logits(ids, cache, mask, positions)  # (B, V)
        length = ids.shape[1]  # positions held in the cache
        while True:
            if not all_finite(logits):
                raise non_finite_error(model, ids, mask, positions)
            token = _pick(logits, temperature, top_k, top_p, generator)  # (B,)
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
            if mask is not None and positions is not None:  # the mask covers past + new
                mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=1)
                positions = positions[:, -1:] + 1  # (B, 1)
            logits = model.next_token_logits(token[:, None], cache, mask, positions)
            length += 1


# ---------------------------------------------------------------------- text in, text out

class TextRow:
    """The text of one generated row, released piece by piece.

    Text that could be the start of a stop string (or half of a multi-byte character) is held
    back until the next tokens show what it is, so a stream never shows a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stops: list[str], eos_id: int | None):
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


def _check(model: Transformer, temperature: float, top_k: int | None, top_p: float | None,
           max_new_tokens: int, on_full: str, tokenizer: object = None,
           seed: int | None = None) -> None:
    if not isinstance(model, Transformer):
        raise InputError(f"model must be a qkv Transformer, got {type(model).__name__}")
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise InputError("generate needs the model's tokenizer, got "
                         f"{type(tokenizer).__name__}" + (
                             " (qkv.load returns None when the model directory has no "
                             "tokenizer.json; add one, or load a qkv.Tokenizer yourself)"
                             if tokenizer is None else ""))
    if seed is not None:
        check_seed(seed, error=InputError)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None:
            check_number(name, value, error=InputError)  # finite
    if model.config.family != "decoder":
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


def _prompt_ids(tokenizer: Tokenizer, prompt: str, context: int, truncate_left: bool) -> list[int]:
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


def stream_generate(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[str],
                    max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, stop: str | Sequence[str] | None = None,
                    seed: int | None = None, truncate_left: bool = False,
                    on_full: str = "slide") -> Iterator[tuple[int, str]]:
    """Like `generate`, as a generator of (prompt index, new text) as soon as it is known."""
    _check(model, temperature, top_k, top_p, max_new_tokens, on_full, tokenizer, seed)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        return
    context = model.config.max_seq_len
    ids = [_prompt_ids(tokenizer, p, context, truncate_left) for p in prompts]
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    rows = [TextRow(tokenizer, stops, tokenizer.eos_id) for _ in prompts]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    with eval_mode(model):  # decode_tokens runs the model in inference mode
        for token in decode_tokens(model, ids, max_new_tokens, temperature, top_k, top_p,
                                   generator, on_full, pad_id(tokenizer)):
            for i, (row, t) in enumerate(zip(rows, token.tolist(), strict=True)):
                piece = row.push(t)
                if piece:
                    yield i, piece
            if all(row.done for row in rows):
                break
        for i, row in enumerate(rows):
            if not row.done and (piece := row.flush()):
                yield i, piece


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[str],
             max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, stop: str | Sequence[str] | None = None,
             seed: int | None = None, stream: Stream | None = None, truncate_left: bool = False,
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
