"""Sentence embeddings, fast: one vector per text, for search, clustering and similarity.

An encoder (such as all-MiniLM-L6-v2) reads a sentence and gives one vector per token;
:meth:`Transformer.sentence_embedding` pools them into one vector per sentence
(``config.pooling``) and, if the config says so, scales it to length 1 so that a dot product
is the cosine similarity.

:func:`encode_sentences` runs that over many texts with three tricks that change the speed and
not the result:

- length-sorted batches: texts of similar length are batched together, so little compute is
  spent on padding; the vectors are put back in the input order at the end;
- bfloat16 autocast (``precision="bf16"``): matrix multiplies in bf16, which CPUs with AMX
  (and GPUs) run several times faster than fp32; norms and pooling stay in fp32. The default,
  ``"auto"``, uses it only where the hardware has fast bf16 (elsewhere it would be slower);
- inference mode: no autograd bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from .batching import evaluating, model_device, pad_id, pad_rows
from .errors import InputError
from .hardware import autocast, resolve_precision
from .model import Transformer
from .tokenizer import Tokenizer


def encode_sentences(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    precision: str = "auto",
    normalize: bool | None = None,
    progress: bool = False,
    max_length: int | None = None,
) -> torch.Tensor:
    """Embed `texts` as a (len(texts), d_model) float32 tensor, rows in the order of `texts`.

    normalize: None follows ``model.config.normalize_embeddings``; True/False forces it.
    max_length: longer texts are cut to this many tokens (default: config.embed_max_len, the
        sentence-transformers limit of a model loaded from one, else max_seq_len).
    precision: "bf16" (autocast; fast on CPUs with AMX and on GPUs), "fp32" (exact), or "auto"
        (bf16 where :func:`qkv.hardware.fast_bf16` says the hardware has it, else fp32).
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
    ids = tokenizer.encode_batch(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)  # longest first
    pad = pad_id(tokenizer)

    starts = range(0, len(order), batch_size)
    if progress:
        starts = tqdm(starts, desc="embedding", unit="batch")
    out = torch.empty(len(texts), cfg.d_model)
    with evaluating(model), autocast(device, precision):
        for start in starts:
            rows = order[start:start + batch_size]
            batch, mask = pad_rows([ids[i] for i in rows], pad, device=device)  # (B, T) each
            out[rows] = model.sentence_embedding(batch, mask, normalize).cpu()  # (B, d_model)
    return out
