"""Masked language modelling (BERT's pre-training task) and fill-mask.

An encoder sees the whole sentence at once, so "predict the next token" would be trivial for it.
BERT (Devlin et al. 2019) hides some tokens instead and asks the model to recover them:

    the cat sat on the mat   ->   the cat [MASK] on the mat      target at position 2: "sat"

Of the tokens that may be chosen (not [CLS], [SEP], padding or another special token), 15% are
picked. Of those, 80% become [MASK], 10% a random token, and 10% stay as they are, so that the
model cannot learn "only [MASK] positions matter" (there is no [MASK] when the model is used
later). The loss is the cross-entropy at the picked positions only; every other label is -100,
PyTorch's "ignore this position".

    mask_tokens(ids, tokenizer)   -> (masked ids, labels)
    mlm_batch(texts, tokenizer)   -> {"input_ids", "attention_mask", "labels"}
    mlm_loss(model, batch)        -> scalar loss
    MLMBatches(lm_batches, tok)   -> (masked x, labels) for a next-token training loop
    masked_lm_objective           -> the objective of `qkv train --family encoder`
    fill_mask(model, tokenizer, "Paris is the [MASK] of France.")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F

from ..batching import evaluating, model_device, pad_id, pad_rows
from ..data import LMBatches, eval_batches
from ..errors import InputError
from ..model import Transformer
from ..tokenizer import Tokenizer
from ..train import LMData, Objective
from ..train.lm import loss_objective

#: The label of a position that takes no part in the loss (torch's cross_entropy default).
IGNORE_INDEX = -100


def special_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that are never masked nor predicted: pad, unk, [CLS], [SEP], [MASK], bos, eos."""
    ids = {tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
           tokenizer.mask_id, tokenizer.bos_id, tokenizer.eos_id}
    return sorted(i for i in ids if i is not None)


def mask_tokens(
    input_ids: torch.Tensor,
    tokenizer: Tokenizer | None = None,
    *,
    mlm_probability: float = 0.15,
    special_ids: Sequence[int] | None = None,
    mask_id: int | None = None,
    vocab_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a batch of token ids (B, T). Returns (masked ids, labels), both (B, T).

    Either pass the tokenizer, or its pieces: `special_ids`, `mask_id` and `vocab_size` (explicit
    values override the tokenizer's). Positions where `attention_mask` is 0 (padding) and special
    tokens are never chosen. Labels hold the original id where a token was chosen and -100
    elsewhere. Random replacements are drawn from the non-special part of the vocabulary.
    `generator` makes the masking reproducible.
    """
    if tokenizer is not None:
        special_ids = special_token_ids(tokenizer) if special_ids is None else special_ids
        mask_id = tokenizer.mask_id if mask_id is None else mask_id
        vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size
    if mask_id is None:
        raise InputError("masking needs a [MASK] token; this tokenizer has none")
    if vocab_size is None:
        raise InputError("mask_tokens needs the tokenizer or vocab_size")
    if not 0.0 < mlm_probability < 1.0:
        raise InputError(f"mlm_probability={mlm_probability} must be between 0 and 1")
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must have shape (batch, length), got "
                         f"{tuple(input_ids.shape)}")
    device = input_ids.device
    special = torch.tensor(sorted(set(special_ids or ())) or [-1], device=device)

    # 1. Which positions may be chosen: real, non-special tokens.
    allowed = ~torch.isin(input_ids, special)  # (B, T)
    if attention_mask is not None:
        allowed &= attention_mask.bool()

    # 2. Choose each allowed position with probability mlm_probability.
    chosen = torch.bernoulli(allowed * mlm_probability, generator=generator).bool()  # (B, T)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)

    # 3. Of the chosen: 80% -> [MASK]; half of the rest (10%) -> a random token; 10% unchanged.
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8, device=device),
                              generator=generator).bool() & chosen
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5, device=device),
                                generator=generator).bool() & chosen & ~to_mask
    ordinary = torch.ones(vocab_size, dtype=torch.bool, device=device)
    ordinary[special[(special >= 0) & (special < vocab_size)]] = False
    pool = ordinary.nonzero().squeeze(1)  # the ids a random replacement may take
    if len(pool) == 0:
        raise InputError("the vocabulary has no ordinary (non-special) tokens")
    random_ids = pool[torch.randint(len(pool), input_ids.shape, device=device,
                                    generator=generator)]

    masked = input_ids.clone()
    masked[to_mask] = mask_id
    masked[to_random] = random_ids[to_random]
    return masked, labels


def mlm_batch(
    examples: Sequence[str] | Sequence[Sequence[int]],
    tokenizer: Tokenizer,
    *,
    max_length: int | None = None,
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """A ready-to-train batch from texts (or lists of token ids).

    Returns {"input_ids": masked ids (B, T), "attention_mask": (B, T), "labels": (B, T)}.
    Texts are wrapped as [CLS] ... [SEP] and truncated to `max_length` tokens.
    """
    if len(examples) == 0:
        raise InputError("cannot make a masked-LM batch from an empty list")
    rows: list[list[int]]
    if isinstance(examples[0], str):
        rows = tokenizer.encode_batch([str(e) for e in examples], truncation=max_length
                                      is not None, max_length=max_length)["input_ids"]
    else:
        rows = [[int(i) for i in r][:max_length] if max_length else [int(i) for i in r]
                for r in examples]
    if any(len(r) == 0 for r in rows):
        raise InputError("cannot mask an empty sequence")
    ids, attention = pad_rows(rows, pad_id(tokenizer), device=device)
    masked, labels = mask_tokens(ids, tokenizer, mlm_probability=mlm_probability,
                                 attention_mask=attention, generator=generator)
    return {"input_ids": masked, "attention_mask": attention, "labels": labels}


def masked_positions(labels: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """Indices of the `labels` (N,) that are not -100, padded up to a multiple of `multiple`
    with the index of a label that is -100 (so the padding adds nothing to a loss).

    Why pad: the number of masked tokens changes from batch to batch, and on a CPU every new
    matrix shape makes oneDNN build and keep a new kernel (with its own copy of the weight
    layout): ~12 MB per shape for bert-tiny's output layer, 3 GB after a few minutes of
    training. Rounding the count up leaves a handful of shapes.
    """
    ignored = labels == IGNORE_INDEX
    index = (~ignored).nonzero().squeeze(1)
    extra = -len(index) % multiple
    if extra and bool(ignored.any()):
        filler = ignored.int().argmax()  # the first position without a label
        index = torch.cat((index, filler.expand(extra)))
    return index


def masked_logits(model: Transformer, h: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (M, vocab), labels (M,)) at the masked positions of hidden vectors h (B, T, d).

    Only these positions (about 15%, padded as in `masked_positions`) go through the output
    layer, the largest matrix of a BERT (d_model x vocab_size), and BERT's MLM transform.
    """
    labels = labels.flatten()
    index = masked_positions(labels)
    return model.logits(h.flatten(0, 1)[index]).float(), labels[index]


def masked_lm_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy at the masked positions: inputs x (B, T), labels y (B, T), -100 elsewhere."""
    h = model.hidden_states(x)  # (B, T, d)
    return F.cross_entropy(*masked_logits(model, h, y), reduction=reduction)


def masked_lm_objective(model: Transformer, data: LMData) -> Objective:
    """Masked language modelling (a BERT) on windows of the training stream: 15% of the tokens
    of every window are hidden (`MLMBatches`), the validation windows are masked once."""
    cfg = data.cfg
    windows = LMBatches(data.train_ids, data.context, cfg.batch_size, seed=cfg.seed)
    val = eval_batches(data.val_ids, data.context, cfg.batch_size, cfg.eval_windows)
    return loss_objective(MLMBatches(windows, data.tokenizer, seed=cfg.seed),
                          mask_fixed_batches(val, data.tokenizer, seed=cfg.seed),
                          masked_lm_loss, data.device, data.precision)


def mlm_loss(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the masked positions of a batch from `mlm_batch`."""
    h = model.encode(batch["input_ids"], batch.get("attention_mask"),
                     batch.get("token_type_ids"))  # (B, T, d)
    if not (batch["labels"] != IGNORE_INDEX).any():  # nothing masked: a zero with a graph
        return h.sum() * 0.0
    return F.cross_entropy(*masked_logits(model, h, batch["labels"]))


def mlm_metrics(model: Transformer, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss and accuracy at the masked positions, without gradients (for evaluation)."""
    with evaluating(model):
        h = model.encode(batch["input_ids"], batch.get("attention_mask"),
                         batch.get("token_type_ids"))
        logits, labels = masked_logits(model, h, batch["labels"])
        real = labels != IGNORE_INDEX  # the padding of masked_positions does not count
        n = int(real.sum())
        if n == 0:
            return {"loss": 0.0, "accuracy": 0.0, "masked": 0}
        loss = F.cross_entropy(logits, labels).item()
        accuracy = (logits.argmax(-1) == labels)[real].float().mean().item()
    return {"loss": loss, "accuracy": accuracy, "masked": n}


class MLMBatches:
    """Masked-LM batches from any stream of token windows: a drop-in for next-token training.

    Wraps an iterator of (x, y) batches (e.g. `qkv.data.LMBatches`) or of plain (B, T) id tensors
    and yields (masked x, labels). A training loop written for next-token prediction,
    `F.cross_entropy(model(x).flatten(0, 1), y.flatten())`, then trains a masked LM unchanged,
    because cross_entropy skips the label -100 by default. (An evaluation that averages over
    `y.numel()` must count only the labels that are not -100.)

    The masking of batch number n is seeded with (seed, n), so the state is plain JSON
    ({"seed", "drawn"} plus the wrapped stream's state) and a resumed run masks exactly as an
    uninterrupted one.
    """

    def __init__(self, batches: Any, tokenizer: Tokenizer | None = None, *,
                 mlm_probability: float = 0.15, special_ids: Sequence[int] | None = None,
                 mask_id: int | None = None, vocab_size: int | None = None, seed: int = 0):
        self.batches = batches
        self.iterator = iter(batches)
        self.options: dict[str, Any] = dict(
            mlm_probability=mlm_probability, special_ids=special_ids, mask_id=mask_id,
            vocab_size=vocab_size)
        self.tokenizer, self.seed, self.drawn = tokenizer, seed, 0

    def __iter__(self) -> MLMBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = next(self.iterator)
        x = item[0] if isinstance(item, (tuple, list)) else item  # (B, T)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.drawn)
        self.drawn += 1
        return mask_tokens(x, self.tokenizer, generator=generator, **self.options)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"seed": self.seed, "drawn": self.drawn}
        if hasattr(self.batches, "state_dict"):
            state["batches"] = self.batches.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.drawn = int(state["seed"]), int(state["drawn"])
        if "batches" in state:
            self.batches.load_state_dict(state["batches"])


def mask_fixed_batches(batches: Sequence[Any], tokenizer: Tokenizer | None = None, *,
                       seed: int = 1234, **options: Any) -> list[tuple[torch.Tensor,
                                                                         torch.Tensor]]:
    """Mask a fixed list of evaluation batches once, the same way every time it is called."""
    return list(MLMBatches(list(batches), tokenizer, seed=seed, **options))


# ---------------------------------------------------------------------------- fill-mask


def fill_mask(model: Transformer, tokenizer: Tokenizer, text: str,
              top_k: int = 5) -> list[list[dict[str, Any]]]:
    """The `top_k` most likely tokens for each [MASK] of `text`, one list per [MASK].

    Each candidate is {"token": id, "token_str": ..., "score": probability, "sequence": the text
    with that [MASK] filled in}. Special tokens are never proposed.
    """
    return fill_mask_batch(model, tokenizer, [text], top_k=top_k)[0]


def fill_mask_batch(model: Transformer, tokenizer: Tokenizer, texts: Sequence[str],
                    top_k: int = 5, batch_size: int = 32) -> list[list[list[dict[str, Any]]]]:
    """:func:`fill_mask` for several texts: one list (per [MASK]) of candidate lists per text."""
    if model.config.family != "encoder":
        raise InputError(f"fill-mask needs an encoder model, not a {model.config.family} one")
    mask_id = tokenizer.mask_id
    if mask_id is None:
        raise InputError("fill-mask needs a tokenizer with a [MASK] token")
    if top_k < 1:
        raise InputError(f"top_k={top_k} must be at least 1")
    if len(texts) == 0:
        raise InputError("no text to fill in")
    mask_token = tokenizer.id_to_token(mask_id)
    rows = tokenizer.encode_batch(list(texts))["input_ids"]
    limit = model.config.max_seq_len
    for text, row in zip(texts, rows, strict=True):
        if mask_id not in row:
            raise InputError(f"the text {text[:50]!r} has no {mask_token} token to fill in")
        if len(row) > limit:
            raise InputError(f"the text {text[:50]!r} is {len(row)} tokens long; the model "
                             f"reads at most {limit}")
    special = special_token_ids(tokenizer)
    top_k = min(top_k, model.config.vocab_size - len(special))
    device = model_device(model)
    results: list[list[list[dict[str, Any]]]] = []
    with evaluating(model):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            ids, attention = pad_rows(chunk, pad_id(tokenizer), device=device)
            h = model.encode(ids, attention)  # (B, T, d)
            where = ids == mask_id  # (B, T)
            logits = model.logits(h[where]).float()  # (M, vocab), masks in reading order
            logits[:, special] = float("-inf")
            probs = logits.softmax(-1)
            scores, best = probs.topk(top_k, dim=-1)  # (M, top_k)
            m = 0
            for row in chunk:
                per_mask = []
                for pos, token_id in enumerate(row):
                    if token_id != mask_id:
                        continue
                    per_mask.append([
                        _candidate(tokenizer, row, pos, int(t), float(s), special)
                        for s, t in zip(scores[m].tolist(), best[m].tolist(), strict=True)
                    ])
                    m += 1
                results.append(per_mask)
    return results


def _candidate(tokenizer: Tokenizer, row: list[int], pos: int, token_id: int, score: float,
               special: list[int]) -> dict[str, Any]:
    filled = list(row)
    filled[pos] = token_id
    # Drop [CLS]/[SEP]/padding but keep any other [MASK] visible in the sequence.
    keep = [t for t in filled if t not in special or t == tokenizer.mask_id]
    return {
        "token": token_id,
        "token_str": tokenizer.decode([token_id], skip_special_tokens=False),
        "score": score,
        "sequence": tokenizer.decode(keep, skip_special_tokens=False),
    }
