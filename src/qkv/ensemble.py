"""An ensemble of translators: several models trained apart decode as one.

    ensemble = Ensemble([model_a, model_b])          # same vocabulary and special tokens
    generate_seq2seq(ensemble, src_ids, src_mask, beam_size=5)

At each step every member reads the target so far (each with its own encoder output and its own
KV cache) and gives its next-token distribution; the ensemble's is their average,

    p(y_t | y_<t, x) = 1/M * sum_m p_m(y_t | y_<t, x)

so a token must convince most members, not only one. Models trained from different random
starts make partly independent errors, and averaging them is the oldest dependable gain in
machine translation (Hansen & Salamon 1990 for networks in general; Sutskever et al. 2014 and
Vaswani et al.'s WMT systems ensemble too). Checkpoint averaging (`average_last`) averages the
*weights* of one run, which costs nothing at decoding time; an ensemble averages the
*predictions* of separate runs, and decoding costs M times as much.

The ensemble has the four methods seq2seq.py decodes with, so greedy decoding and beam search
are the ones a single model uses:

- encode: each member's memory (B, S_m, d_m), flattened by row and laid side by side, so
  that beam search can repeat it by rows as it repeats a single model's;
- new_cache: one cache per member, reordered together;
- next_token_logits: the log of the averaged probabilities (B, V), fp32; already normalised,
  so beam search's log_softmax leaves it as it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .baselines import RNNTranslator
from .errors import InputError
from .model import Transformer

Member = Transformer | RNNTranslator

#: Config fields the members must share: they read and write the same token ids.
SHARED = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


class EnsembleCache:
    """One decoding cache per member; beam search reorders them all at once."""

    def __init__(self, caches: list[Any]) -> None:
        self.caches = caches

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> None:
        for cache in self.caches:
            cache.reorder(index, same_sources=same_sources)


class Ensemble(nn.Module):
    """Translators that decode as one by averaging their next-token probabilities."""

    def __init__(self, members: Sequence[Member]) -> None:
        super().__init__()
        if not members:
            raise InputError("an ensemble needs at least one model")
        first = members[0].config
        for i, m in enumerate(members[1:], start=2):
            for name in SHARED:
                a, b = getattr(first, name, None), getattr(m.config, name, None)
                if a != b:
                    raise InputError(f"ensemble member {i} has {name}={b}, member 1 has {a}: "
                                     "the members must share one vocabulary")
        self.members = nn.ModuleList(members)  # registered: eval(), to(), parameters()
        self._members: list[Member] = list(members)  # the same, typed
        # the first member's config, with the shortest context of all (sources are cut to it)
        self._config = dataclasses.replace(
            first, max_seq_len=min(m.config.max_seq_len for m in members))
        self._layout: list[tuple[torch.Size, torch.dtype]] | None = None  # set by encode

    @property
    def config(self) -> Any:
        """The first member's config (vocabulary, special ids, family), with the shortest
        context of the members."""
        return self._config

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every member's memory, flattened per row and laid side by side: (B, sum S_m * d_m).
        The members' shapes and dtypes are kept until the next encode."""
        memories = [m.encode(src, src_mask) for m in self._members]  # each (B, S_m, d_m)
        self._layout = [(x.shape[1:], x.dtype) for x in memories]
        dtype = memories[0].dtype
        for x in memories[1:]:
            dtype = torch.promote_types(dtype, x.dtype)
        return torch.cat([x.flatten(1).to(dtype) for x in memories], dim=1)

    def new_cache(self) -> EnsembleCache:
        return EnsembleCache([m.new_cache() for m in self._members])

    def next_token_logits(self, tokens: torch.Tensor, cache: EnsembleCache,
                          memory: torch.Tensor | None = None,
                          src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log(1/M sum_m p_m) (B, V) in fp32, for the token after `tokens` (B, T)."""
        layout = self._layout
        sizes = [math.prod(shape) for shape, _ in layout or []]
        if memory is None or layout is None or memory.shape[1] != sum(sizes):
            raise InputError("an ensemble decodes from the memory its own encode() returned: "
                             "pass memory=ensemble.encode(src, src_mask)")
        parts = [x.reshape(x.shape[0], *shape).to(dtype) for x, (shape, dtype)
                 in zip(memory.split(sizes, dim=1), layout, strict=True)]  # (B, S_m, d_m)
        logp = torch.stack([
            m.next_token_logits(tokens, c, memory=x, src_mask=src_mask).float().log_softmax(-1)
            for m, c, x in zip(self._members, cache.caches, parts, strict=True)])  # (M, B, V)
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))
