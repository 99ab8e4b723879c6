"""Sentence embeddings, fast: one vector per text, for search, clustering and similarity.

An encoder (such as all-MiniLM-L6-v2) reads a sentence and gives one vector per token;
:meth:`Transformer.sentence_embedding` pools them into one vector per sentence
(``config.pooling``) and, if the config says so, scales it to length 1 so that a dot product
is the cosine similarity.

:func:`encode_sentences` runs that over many texts with tricks that change the speed and not
the result (docs/performance.md has the measurements):

- one batch call to the tokenizer's Rust backend, which splits the texts over the CPUs (the
  rare text longer than the limit goes through :meth:`Tokenizer.encode_batch` to be cut);
- length-sorted batches: texts of similar length are batched together, so little compute is
  spent on padding, and a batch whose rows all have the same length needs no mask at all; the
  vectors are put back in the input order at the end;
- bfloat16 (``precision="bf16"``): matrix multiplies in bf16, which CPUs with AMX (and GPUs)
  run several times faster than fp32. The weights are cast to bf16 once, into a copy kept
  beside the model (and made again when the model's weights change), instead of at every
  layer of every batch as autocast would; pooling stays in fp32. The default, ``"auto"``,
  uses bf16 only where the hardware has fast bf16 (elsewhere it would be slower);
- inference mode: no autograd bookkeeping;
- opt-in, ``compile=True``: the bf16 copy goes through ``torch.compile`` (weights frozen into
  the graph, the feed-forward's activation fused into its matrix product, attention as plain
  matmul + softmax that the compiler fuses). The first call pays the compilation (about 15 s
  on two CPU cores), so it pays off for large jobs; if compiling fails, the plain path runs.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from .batching import evaluating, model_device, pad_id, pad_rows
from .errors import InputError, QkvError
from .hardware import autocast, resolve_precision
from .model import Transformer
from .quantize import pack_linears
from .tokenizer import Tokenizer

Embed = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def encode_sentences(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    precision: str = "auto",
    normalize: bool | None = None,
    progress: bool = False,
    max_length: int | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Embed `texts` as a (len(texts), d_model) float32 tensor, rows in the order of `texts`.

    normalize: None follows ``model.config.normalize_embeddings``; True/False forces it.
    max_length: longer texts are cut to this many tokens (default: config.embed_max_len, the
        sentence-transformers limit of a model loaded from one, else max_seq_len).
    precision: "bf16" (a bf16 copy of the weights; fast on CPUs with AMX and on GPUs), "fp32"
        (exact), or "auto" (bf16 where :func:`qkv.hardware.fast_bf16` says the hardware has
        it, else fp32).
    compile: run the bf16 copy through torch.compile (see the module's docstring); the first
        call compiles, later calls with the same model reuse it.
    """
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, not one string; wrap it: [text]")
    device = model_device(model)
    precision = resolve_precision(precision, device)
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size} must be at least 1")
    texts = list(texts)
    cfg = model.config
    if not texts:
        return torch.empty(0, cfg.d_model)
    max_length = min(max_length or cfg.embed_max_len or cfg.max_seq_len, cfg.max_seq_len)
    ids = token_ids(tokenizer, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)  # longest first
    pad = pad_id(tokenizer)

    starts = range(0, len(order), batch_size)
    if progress:
        starts = tqdm(starts, desc="embedding", unit="batch")
    out = torch.empty(len(texts), cfg.d_model)
    with evaluating(model):
        embed, context = _embedder(model, precision, compile, batch_size)
        with context:
            for start in starts:
                rows = order[start:start + batch_size]
                batch, mask = pad_rows([ids[i] for i in rows], pad, device=device)  # (B, T)
                uniform = len(ids[rows[0]]) == len(ids[rows[-1]])  # no padding: no mask
                vectors = embed(batch, None if uniform else mask)  # (B, d_model) fp32
                if normalize if normalize is not None else cfg.normalize_embeddings:
                    vectors = torch.nn.functional.normalize(vectors, dim=-1)
                out[rows] = vectors.cpu()
    return out


def token_ids(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """The token ids of each text with the special tokens, at most max_length of them: the same
    ids as ``tokenizer.encode_batch(texts, truncation=True, max_length=max_length)``, from one
    call to the Rust backend (which runs on all CPUs) instead of one call per text."""
    for text in texts:
        if not isinstance(text, str):
            raise InputError(f"text to encode must be a str, got {type(text).__name__}")
    try:
        rows = [encoding.ids for encoding in tokenizer.backend.encode_batch(texts)]
    except Exception:  # text the backend refuses: the wrapper says why, in one clear line
        return tokenizer.encode_batch(texts, truncation=True, max_length=max_length)["input_ids"]
    long = [i for i, row in enumerate(rows) if len(row) > max_length]
    if long:  # cut by the wrapper's rule (the special tokens are kept)
        cut = tokenizer.encode_batch([texts[i] for i in long], truncation=True,
                                     max_length=max_length)["input_ids"]
        for i, row in zip(long, cut, strict=True):
            rows[i] = row
    return rows


# ---------------------------------------------------------------------- how a batch is run

class _Prepared:
    """What encode_sentences keeps beside a model: a copy of it for inference (its weights
    cast to bf16, or the model's own weights shared) and that copy compiled, valid as long as
    the model's weights are those it was made from (`key`)."""

    def __init__(self, key: tuple | None, model: Transformer):
        self.key = key
        self.model = model
        self.compiled: Embed | None = None
        self.compile_failed = False


# Keyed by the user's model; the values never refer to it (a weak key would never go away).
_PREPARED: weakref.WeakKeyDictionary[Transformer, dict[str, _Prepared]] = (
    weakref.WeakKeyDictionary())


def _weights_key(model: Transformer) -> tuple | None:
    """Changes when any weight is replaced, moved or updated in place (an optimizer step);
    None where the weights cannot tell (tensors made under inference mode)."""
    try:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())
    except RuntimeError:
        return None


def _prepared(model: Transformer, dtype: torch.dtype | None, pack: bool = False) -> _Prepared:
    """The kept copy of `model` with its weights in `dtype` (None: the model's own weights,
    shared, not copied), made again when the model's weights have changed. `pack`: its bf16
    linear layers multiply a copy of their weights laid out once for oneDNN
    (`quantize.pack_linears`) instead of rearranging them at every batch."""
    key = _weights_key(model)
    entries = _PREPARED.setdefault(model, {})
    name = f"{dtype}, packed" if pack else str(dtype)
    entry = entries.get(name)
    if entry is None or key is None or entry.key != key:
        # Each parameter goes straight into the copy through deepcopy's memo: cast (the fp32
        # weights are never copied) or shared as it is; tied parameters stay tied.
        memo: dict[int, object] = {
            id(p): p if dtype is None else torch.nn.Parameter(p.detach().to(dtype),
                                                              requires_grad=False)
            for p in model.parameters()}
        clone = copy.deepcopy(model, memo)
        if dtype is not None:
            clone = clone.to(dtype)  # the floating-point buffers too
        if pack:
            pack_linears(clone)
        entry = entries[name] = _Prepared(key, clone.eval())
    return entry


def bf16_copy(model: Transformer) -> Transformer:
    """A bf16 copy of `model` for inference (eval mode), made once and kept until the model's
    weights change; the model itself is left as it is. A model already in bf16 is returned.
    Its linear layers are `quantize.PackedLinear`s: the same numbers, faster on a CPU."""
    if next(model.parameters()).dtype == torch.bfloat16:
        return model
    return _prepared(model, torch.bfloat16, pack=True).model


def _embedder(model: Transformer, precision: str, compile: bool, batch_size: int):
    """(embed(batch, mask) -> fp32 vectors (B, d_model) before normalisation, the context to
    run it in) for this model and precision."""
    dtype = next(model.parameters()).dtype
    if precision == "bf16" and dtype not in (torch.float32, torch.bfloat16):
        return _pooled(model), autocast(model_device(model), precision)  # fp16 weights
    cast = torch.bfloat16 if precision == "bf16" and dtype == torch.float32 else None
    if compile:
        return _compiled(_prepared(model, cast), batch_size), contextlib.nullcontext()
    plain = model if cast is None else _prepared(model, cast, pack=True).model
    return _pooled(plain), contextlib.nullcontext()


def _pooled(model: Transformer) -> Embed:
    return lambda batch, mask: model.sentence_embedding(batch, mask, normalize=False)


def _compiled(entry: _Prepared, batch_size: int) -> Embed:
    """The kept copy's `sentence_embedding` through torch.compile, falling back to the plain
    call if the compiler fails (no C++ compiler, an unsupported op, ...): the vectors are the
    same either way, up to rounding.

    The length dimension is marked dynamic, so one graph serves every length; the last, short
    batch is filled up to batch_size with copies of its last row, so that the batch dimension
    stays the one the graph was built for. Attention runs as matmul + softmax (SDPA's "math"
    kernel), which the compiler fuses; on a CPU that beats the flash kernel on short sentences.
    """
    from torch._inductor import config as inductor_config  # imported only when compiling

    plain = _pooled(entry.model)
    if entry.compile_failed:
        return plain
    if entry.compiled is None:
        entry.compiled = torch.compile(plain, dynamic=False)
    compiled = entry.compiled

    def embed(batch: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if entry.compile_failed:
            return plain(batch, mask)
        B = batch.shape[0]
        if mask is None:  # one graph: always a mask
            mask = torch.ones_like(batch)
        if B < batch_size:  # filled up to (batch_size, T)
            fill = batch_size - B
            batch = torch.cat([batch, batch[-1:].expand(fill, -1)])
            mask = torch.cat([mask, mask[-1:].expand(fill, -1)])
        torch._dynamo.maybe_mark_dynamic(batch, 1)
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        try:
            # Freezing (the weights become constants: pre-packed for the matrix units, the
            # activation fused in) is read when a graph is compiled, on a call with a new shape.
            with sdpa_kernel([SDPBackend.MATH]), inductor_config.patch(freezing=True):
                return compiled(batch, mask)[:B]  # (B, d_model)
        except QkvError:
            raise
        except Exception as error:  # the compiler's failure, not the input's
            entry.compile_failed = True
            first = str(error).splitlines()[0] if str(error) else ""
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {first}); "
                          "embedding without it", stacklevel=3)
            return plain(batch[:B], mask[:B])

    return embed
