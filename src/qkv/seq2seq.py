"""Decoding an encoder-decoder (translation, summarisation): the encoder reads the source once;
the decoder then writes the target one token at a time, attending to the encoder's output (the
"memory") and to the tokens it has written so far, with a KV cache.

    ids = qkv.generate.generate_seq2seq(model, src_ids, src_mask, beam_size=4)

- greedy (beam_size=1): the most likely next token every step.
- beam search: the `beam_size` best partial targets of each source are kept at each step, so a
  target whose first token is not the most likely one can still win overall. Finished targets
  are compared by their summed log-probability divided by length ** length_penalty.
"""

from __future__ import annotations

import torch

from .batching import evaluating
from .errors import InputError
from .model import Transformer


@torch.inference_mode()
def generate_seq2seq(model: Transformer, src_ids: torch.Tensor,
                     src_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                     beam_size: int = 1, length_penalty: float = 1.0, start_id: int | None = None,
                     eos_id: int | None = None) -> list[list[int]]:
    """Translate-style decoding of an encoder-decoder: greedy (beam_size=1) or beam search.

    src_ids (B, S) and src_mask (B, S) are the source; the target starts with `start_id`
    (default: config.decoder_start_token_id, else bos) and ends at `eos_id`. Returns one list of
    target ids per source row, without the start token and the end token.
    """
    cfg = model.config
    if cfg.family != "encoder-decoder":
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
    with evaluating(model):
        memory = model.encode(src_ids, src_mask)  # (B, S, d_model)
        if beam_size == 1:
            return _greedy(model, memory, src_mask, max_new_tokens, start_id, eos_id)
        return _beam_search(model, memory, src_mask, max_new_tokens, beam_size, length_penalty,
                            start_id, eos_id)


def _greedy(model: Transformer, memory: torch.Tensor, src_mask: torch.Tensor | None,
            max_new_tokens: int, start_id: int, eos_id: int | None) -> list[list[int]]:
    """The most likely next token, every step, for every row until it ends."""
    cache = model.new_cache()
    token = torch.full((memory.shape[0], 1), start_id, dtype=torch.long, device=memory.device)
    rows: list[list[int]] = [[] for _ in range(memory.shape[0])]
    ended = [False] * len(rows)
    for _ in range(max_new_tokens):
        logits = model.next_token_logits(token, cache, memory=memory, src_mask=src_mask)
        token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        for b, t in enumerate(token[:, 0].tolist()):
            ended[b] = ended[b] or t == eos_id
            if not ended[b]:
                rows[b].append(t)
        if all(ended):
            break
    return rows


def _beam_search(model: Transformer, memory: torch.Tensor, src_mask: torch.Tensor | None,
                 max_new_tokens: int, K: int, length_penalty: float, start_id: int,
                 eos_id: int | None) -> list[list[int]]:
    """Keep the K best partial translations of each source, scored by the sum of their token
    log-probabilities; finished ones are compared after dividing that sum by
    length ** length_penalty, so that long translations are not unfairly penalised."""
    B, device, inf = memory.shape[0], memory.device, float("inf")
    # Every source row is repeated K times: row b * K + k is beam k of source b.
    memory = memory.repeat_interleave(K, dim=0)  # (B*K, S, d_model)
    mask = None if src_mask is None else src_mask.repeat_interleave(K, dim=0)
    cache = model.new_cache()
    step = torch.full((B * K, 1), start_id, dtype=torch.long, device=device)
    scores = torch.full((B, K), -inf, device=device)
    scores[:, 0] = 0.0  # at the start all beams are the same: keep one
    history: list[list[int]] = [[] for _ in range(B * K)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        logp = model.next_token_logits(step, cache, memory=memory, src_mask=mask).log_softmax(-1)
        V = logp.shape[-1]
        total = (scores.view(-1, 1) + logp).view(B, K * V)  # every (beam, token); dead: -inf
        best, index = total.topk(2 * K, dim=-1)  # (B, 2K): spares for beams that end here
        rows, tokens = [], []
        for b in range(B):
            kept: list[tuple[float, int, int]] = []  # (score, beam row, next token)
            for score, i in zip(best[b].tolist(), index[b].tolist(), strict=True):
                if len(finished[b]) >= K or len(kept) == K or score == -inf:
                    break
                row, t = b * K + i // V, i % V
                if t == eos_id:
                    seq = history[row]
                    finished[b].append((score / max(1, len(seq) + 1) ** length_penalty, seq))
                else:
                    kept.append((score, row, t))
            kept += [(-inf, b * K, start_id)] * (K - len(kept))  # dead beams fill the rest
            scores[b] = torch.tensor([score for score, _, _ in kept])
            rows += [row for _, row, _ in kept]
            tokens += [t for _, _, t in kept]
        history = [history[r] + [t] for r, t in zip(rows, tokens, strict=True)]
        if all(len(f) >= K for f in finished) or scores.max() == -inf:
            break
        cache.reorder(torch.tensor(rows, device=device))
        step = torch.tensor(tokens, device=device)[:, None]  # (B*K, 1)
    results = []
    for b in range(B):
        alive = [(float(scores[b, k]) / max(1, len(history[b * K + k])) ** length_penalty,
                  history[b * K + k]) for k in range(K) if scores[b, k] > -inf]
        results.append(max(finished[b] + alive, key=lambda c: c[0], default=(0.0, []))[1])
    return results
