"""Decoding an encoder-decoder (translation, summarisation): the encoder reads the source once;
the decoder then writes the target one token at a time, attending to the encoder's output (the
"memory") and to the tokens it has written so far, with a KV cache.

    ids = qkv.generate.generate_seq2seq(model, src_ids, src_mask, beam_size=4)

- greedy (beam_size=1): the most likely next token every step.
- beam search: the `beam_size` best partial targets of each source are kept at each step, so a
  target whose first token is not the most likely one can still win overall. Finished targets
  are compared by their summed log-probability divided by length ** length_penalty (the length
  counts the end token).

A source of n tokens gets at most max_length_ratio * n + 10 target tokens (and never more than
max_new_tokens): a runaway translation is cut, the way fairseq's max_len_a/max_len_b cut it.
Beam search stops for a source once it holds `beam_size` finished targets and the best running
one, scored as if it ended now, cannot beat the worst of them (Hugging Face's default,
early_stopping=False): so `beam_size=4` picks the very tokens that `generate(num_beams=4)` picks.

Any model with the same four methods decodes here: the Transformer, and the recurrent
encoder-decoders of qkv.baselines (their "memory" is the encoder's states, their cache the
recurrent state):

    encode(src, src_mask) -> memory (B, S, d)      new_cache() -> cache with reorder(index)
    next_token_logits(tokens (B, 1), cache, memory=..., src_mask=...) -> (B, vocab) fp32

and so does qkv.ensemble.Ensemble, several translators averaging their predictions.
"""

from __future__ import annotations

from typing import Any

import torch

from .baselines import RNNTranslator
from .batching import evaluating
from .ensemble import Ensemble
from .errors import InputError
from .model import Transformer

#: What decodes here: the Transformer, a recurrent translator of qkv.baselines, or an ensemble
#: of them (qkv.ensemble).
Seq2Seq = Transformer | RNNTranslator | Ensemble

#: Tokens a target may have beyond max_length_ratio x its source's length.
LENGTH_SLACK = 10


@torch.inference_mode()
def generate_seq2seq(model: Seq2Seq, src_ids: torch.Tensor,
                     src_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                     beam_size: int = 1, length_penalty: float = 1.0, start_id: int | None = None,
                     eos_id: int | None = None,
                     max_length_ratio: float | None = None) -> list[list[int]]:
    """Translate-style decoding of an encoder-decoder: greedy (beam_size=1) or beam search.

    src_ids (B, S) and src_mask (B, S) are the source; the target starts with `start_id`
    (default: config.decoder_start_token_id, else bos) and ends at `eos_id`. Returns one list of
    target ids per source row, without the start token and the end token. max_length_ratio
    limits each target to ratio x its source length + LENGTH_SLACK tokens.
    """
    cfg = model.config
    if getattr(cfg, "family", None) not in ("encoder-decoder", "rnn"):
        raise InputError("generate_seq2seq needs an encoder-decoder model")
    if start_id is None:
        start_id = (cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None
                    else cfg.bos_token_id)
    eos_id = eos_id if eos_id is not None else cfg.eos_token_id
    if start_id is None:
        raise InputError("the model config has no decoder_start_token_id or bos_token_id; "
                         "pass start_id")
    if beam_size < 1:
        raise InputError(f"beam_size={beam_size} must be at least 1")
    if max_length_ratio is not None and max_length_ratio <= 0:
        raise InputError(f"max_length_ratio={max_length_ratio} must be positive")
    lengths = (src_mask.sum(-1).tolist() if src_mask is not None
               else [src_ids.shape[1]] * src_ids.shape[0])
    limits = [max_new_tokens if max_length_ratio is None else
              min(max_new_tokens, int(max_length_ratio * n) + LENGTH_SLACK) for n in lengths]
    with evaluating(model):
        memory = model.encode(src_ids, src_mask)  # (B, S, d_model)
        if beam_size == 1:
            return _greedy(model, memory, src_mask, limits, start_id, eos_id)
        return _beam_search(model, memory, src_mask, limits, beam_size, length_penalty,
                            start_id, eos_id)


def _greedy(model: Seq2Seq, memory: torch.Tensor, src_mask: torch.Tensor | None,
            limits: list[int], start_id: int, eos_id: int | None) -> list[list[int]]:
    """The most likely next token, every step, for every row until it ends (or reaches its
    length limit)."""
    cache: Any = model.new_cache()  # a DecoderCache, or an RNNCache
    token = torch.full((memory.shape[0], 1), start_id, dtype=torch.long, device=memory.device)
    rows: list[list[int]] = [[] for _ in range(memory.shape[0])]
    ended = [limit <= 0 for limit in limits]
    for step in range(max(limits, default=0)):
        if all(ended):
            break
        logits = model.next_token_logits(token, cache, memory=memory, src_mask=src_mask)
        token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        for b, t in enumerate(token[:, 0].tolist()):
            if ended[b]:
                continue
            ended[b] = t == eos_id or step + 1 >= limits[b]
            if t != eos_id:
                rows[b].append(t)
    return rows


def _beam_search(model: Seq2Seq, memory: torch.Tensor, src_mask: torch.Tensor | None,
                 limits: list[int], K: int, length_penalty: float, start_id: int,
                 eos_id: int | None) -> list[list[int]]:
    """Keep the K best partial translations of each source, scored by the sum of their token
    log-probabilities. A candidate among the K best that ends (or reaches the length limit) is
    finished: its score is divided by length ** length_penalty, so that long translations are
    not unfairly penalised, and the K best finished ones are kept."""
    B, device, inf = memory.shape[0], memory.device, float("inf")
    # Every source row is repeated K times: row b * K + k is beam k of source b.
    memory = memory.repeat_interleave(K, dim=0)  # (B*K, S, d_model)
    mask = None if src_mask is None else src_mask.repeat_interleave(K, dim=0)
    cache: Any = model.new_cache()  # a DecoderCache, or an RNNCache
    step_tokens = torch.full((B * K, 1), start_id, dtype=torch.long, device=device)
    scores = torch.full((B, K), -inf, device=device)
    scores[:, 0] = 0.0  # at the start all beams are the same: keep one
    history: list[list[int]] = [[] for _ in range(B * K)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [limit <= 0 for limit in limits]
    for step in range(max(limits, default=0)):
        if all(done):
            break
        logp = model.next_token_logits(step_tokens, cache, memory=memory,
                                       src_mask=mask).log_softmax(-1)  # (B*K, V)
        V = logp.shape[-1]
        total = (scores.view(-1, 1) + logp).view(B, K * V)  # every (beam, token); dead: -inf
        best, index = total.topk(min(2 * K, K * V), dim=-1)  # (B, 2K): spares for ended beams
        new_scores, rows, tokens = [], [], []
        for b in range(B):
            kept: list[tuple[float, int, int]] = []  # (score, beam row, next token)
            last = step + 1 >= limits[b]
            for rank, (score, i) in enumerate(zip(best[b].tolist(), index[b].tolist(),
                                                  strict=True)):
                if done[b] or score == -inf:
                    break
                row, t = b * K + i // V, i % V
                if rank < K and (t == eos_id or last):  # a finished translation
                    seq = history[row] + ([] if t == eos_id else [t])
                    finished[b].append((score / (step + 1) ** length_penalty, seq))
                if t != eos_id and len(kept) < K:
                    kept.append((score, row, t))
            finished[b] = sorted(finished[b], key=lambda c: -c[0])[:K]
            if not done[b]:
                done[b] = last or _cannot_improve(finished[b], kept, K, step + 1,
                                                  length_penalty)
            kept += [(-inf, b * K, start_id)] * (K - len(kept))  # dead beams fill the rest
            new_scores.append([score for score, _, _ in kept])
            rows += [row for _, row, _ in kept]
            tokens += [t for _, _, t in kept]
        scores = torch.tensor(new_scores, device=device)  # (B, K)
        history = [history[r] + [t] for r, t in zip(rows, tokens, strict=True)]
        cache.reorder(torch.tensor(rows, device=device), same_sources=True)  # b's beams
        step_tokens = torch.tensor(tokens, device=device)[:, None]  # (B*K, 1)
    return [max(f, key=lambda c: c[0])[1] if f else [] for f in finished]


def _cannot_improve(finished: list[tuple[float, list[int]]], kept: list[tuple[float, int, int]],
                    K: int, length: int, length_penalty: float) -> bool:
    """K finished translations, and the best running one, scored at its present length, is no
    better than the worst of them (Hugging Face's heuristic for early_stopping=False)."""
    if len(finished) < K:
        return False
    if not kept:
        return True
    return kept[0][0] / length ** length_penalty <= finished[-1][0]
