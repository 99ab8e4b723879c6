"""Recurrent encoder-decoders: the translators the Transformer replaced.

Without attention (Sutskever et al. 2014, "Sequence to Sequence Learning with Neural Networks"):

    source -> embed -> LSTM/GRU encoder -> its final state  (the whole sentence in one vector)
                                               |
    <s> y1 y2 ... -> embed -> LSTM/GRU decoder, started from that state -> Linear -> next token

Everything the decoder knows about the source must squeeze through the encoder's final state:
that fixed-size vector is the bottleneck, and long sentences suffer from it.

With additive attention (Bahdanau et al. 2015, "Neural Machine Translation by Jointly Learning to
Align and Translate"): the encoder is bidirectional, so every source token has a vector h_i
that has read the sentence both ways, and at every step the decoder looks back at all of them.
With its previous state s it scores each source token,

    e_i = v . tanh(W s + U h_i),    alpha_i = softmax_i(e_i),    c = sum_i alpha_i h_i,

and reads the context c together with the previous target token. The weights alpha are the
soft alignment between target and source words (the paper's figure 3); they are recorded by
`qkv.layers.attention.record_attention`, like the Transformer's cross-attention.

The decoding interface is the Transformer's (`encode`, `new_cache`, `next_token_logits`), so
qkv.seq2seq's greedy and beam search, the training objective and BLEU serve both. Source and
target share one embedding table (one joint vocabulary).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import ConfigError, InputError
from ..layers.dropout import Dropout

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}

#: A recurrent state: h (n_layers, B, H), with c for an LSTM.
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class RNNConfig:
    """The shape of a recurrent translator; saved as config.json with family "rnn"."""

    vocab_size: int
    cell: str = "lstm"          # "lstm" or "gru"
    attention: bool = False     # Bahdanau's additive attention over a bidirectional encoder
    d_embed: int = 256
    d_hidden: int = 512
    n_layers: int = 2           # of the encoder and of the decoder
    dropout: float = 0.3
    reverse_source: bool = False  # read the source backwards (Sutskever et al.; no attention)
    max_seq_len: int = 128      # tokens per sentence (the data's limit; an RNN has none)
    pad_token_id: int = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    decoder_start_token_id: int | None = None
    family: str = "rnn"

    def __post_init__(self) -> None:
        if self.family != "rnn":
            raise ConfigError(f"an RNNConfig has family 'rnn', not {self.family!r}")
        if self.cell not in CELLS:
            raise ConfigError(f"cell={self.cell!r} is not one of {', '.join(CELLS)}")
        for name in ("vocab_size", "d_embed", "d_hidden", "n_layers", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.reverse_source and self.attention:
            raise ConfigError("reverse_source is Sutskever's trick for the encoder without "
                              "attention; Bahdanau's bidirectional encoder reads both ways")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RNNConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"qkv_version"})
        if unknown:
            raise ConfigError(f"unknown RNN config field {unknown[0]!r}")
        return cls(**{k: v for k, v in data.items() if k in known})


def reverse_rows(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's first `lengths[b]` tokens in reverse order, its padding left where it is.

    Sutskever et al. (2014) read the source backwards: the first target words then sit a few
    steps from the source words they translate, instead of a whole sentence away, and their
    LSTM without attention gained almost 5 BLEU (25.9 -> 30.6)."""
    S = tokens.shape[1]
    at = torch.arange(S, device=tokens.device)[None]  # (1, S)
    index = torch.where(at < lengths[:, None], lengths[:, None] - 1 - at, at)
    return tokens.gather(1, index)


class AdditiveAttention(nn.Module):
    """Bahdanau's attention: score_i = v . tanh(W s + U h_i), softmax over the source tokens."""

    def __init__(self, d_query: int, d_key: int, d_attention: int):
        super().__init__()
        self.W = nn.Linear(d_query, d_attention, bias=False)
        self.U = nn.Linear(d_key, d_attention)
        self.v = nn.Linear(d_attention, 1, bias=False)
        self.recorded: list[torch.Tensor] | None = None  # set by `record_attention`

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        """U h_i for every source token, (B, S, d_attention): computed once per sentence."""
        return self.U(memory)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """query s (B, d_query), keys U h (B, S, d_attention), memory h (B, S, d_key), mask
        (B, S) true at real tokens -> (context (B, d_key), weights (B, S))."""
        scores = self.v(torch.tanh(self.W(query)[:, None] + keys))[..., 0]  # (B, S)
        if mask is not None:
            scores = scores.masked_fill(~mask.bool(), float("-inf"))
        weights = scores.float().softmax(dim=-1).to(memory.dtype)  # (B, S), each row sums to 1
        if self.recorded is not None:
            self.recorded.append(weights[:, None, None, :].detach())  # (B, 1, 1, S) per step
        context = torch.bmm(weights[:, None, :], memory)[:, 0]  # (B, d_key)
        return context, weights


class RNNCache:
    """What a recurrent decoder carries from one step to the next: its state (and the projected
    source keys of its attention). `reorder` keeps the rows beam search chooses."""

    def __init__(self) -> None:
        self.state: State | None = None
        self.keys: torch.Tensor | None = None  # (B, S, d_attention)
        self.steps = 0

    def __len__(self) -> int:
        return self.steps

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> None:
        """Keep rows `index`; with `same_sources` (beams of one source) the projected source
        keys stay as they are (see DecoderCache.reorder)."""
        if isinstance(self.state, tuple):
            self.state = (self.state[0].index_select(1, index),
                          self.state[1].index_select(1, index))
        elif self.state is not None:
            self.state = self.state.index_select(1, index)
        if self.keys is not None and not same_sources:
            self.keys = self.keys.index_select(0, index)


class RNNTranslator(nn.Module):
    """An LSTM or GRU encoder-decoder, with or without additive attention (see the module
    docstring). model(src, tgt, src_mask=...) -> logits (B, T, vocab_size), like a Transformer's."""

    def __init__(self, config: RNNConfig):
        super().__init__()
        self.config = cfg = config
        H, E = cfg.d_hidden, cfg.d_embed
        rnn = CELLS[cfg.cell]
        between = cfg.dropout if cfg.n_layers > 1 else 0.0
        self.embedding = nn.Embedding(cfg.vocab_size, E, padding_idx=cfg.pad_token_id)
        self.drop = Dropout(cfg.dropout)
        self.encoder = rnn(E, H, cfg.n_layers, batch_first=True, dropout=between,
                           bidirectional=cfg.attention)
        if cfg.attention:
            self.bridge = nn.Linear(2 * H, H)  # both directions' summaries -> first state
            self.attention = AdditiveAttention(H, 2 * H, H)
            self.decoder = rnn(E + 2 * H, H, cfg.n_layers, batch_first=True, dropout=between)
            self.out = nn.Linear(H + 2 * H + E, cfg.vocab_size)  # from [s_t; c_t; y_{t-1}]
        else:
            self.decoder = rnn(E, H, cfg.n_layers, batch_first=True, dropout=between)
            self.out = nn.Linear(H, cfg.vocab_size)

    # ------------------------------------------------------------------ encoder
    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The memory the decoder reads: without attention, the final state of every encoder
        layer, (B, 1, n_layers * H) (times 2 for an LSTM's h and c): one vector per sentence;
        with attention, the bidirectional vectors of all source tokens, (B, S, 2H)."""
        if src.dim() != 2:
            raise InputError(f"tokens must have shape (batch, length), got {tuple(src.shape)}")
        B, S = src.shape
        lengths = (src_mask.sum(-1) if src_mask is not None
                   else torch.full((B,), S)).clamp(min=1).cpu()
        if self.config.reverse_source:
            src = reverse_rows(src, lengths.to(src.device))
        x = self.drop(self.embedding(src))  # (B, S, E)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        outputs, state = self.encoder(packed)
        if self.config.attention:
            memory, _ = pad_packed_sequence(outputs, batch_first=True, total_length=S)
            return memory  # (B, S, 2H)
        parts = state if isinstance(state, tuple) else (state,)  # each (n_layers, B, H)
        return torch.cat([p.transpose(0, 1).reshape(B, -1) for p in parts], -1)[:, None]

    def initial_state(self, memory: torch.Tensor, src_mask: torch.Tensor | None) -> State:
        """The decoder's first state: the encoder's final one, or (with attention) tanh of a
        projection of the forward pass's last vector and the backward pass's first."""
        cfg, B, H = self.config, memory.shape[0], self.config.d_hidden
        if cfg.attention:
            last = ((src_mask.sum(-1) - 1).clamp(min=0) if src_mask is not None
                    else torch.full((B,), memory.shape[1] - 1, device=memory.device))
            forward_end = memory[torch.arange(B, device=memory.device), last, :H]  # (B, H)
            h = torch.tanh(self.bridge(torch.cat([forward_end, memory[:, 0, H:]], -1)))
            h = h[None].repeat(cfg.n_layers, 1, 1).contiguous()  # (n_layers, B, H)
            return (h, torch.zeros_like(h)) if cfg.cell == "lstm" else h
        flat = memory[:, 0].view(B, -1, cfg.n_layers, H).permute(1, 2, 0, 3)  # (parts, L, B, H)
        return (flat[0].contiguous(), flat[1].contiguous()) if cfg.cell == "lstm" else \
            flat[0].contiguous()

    # ------------------------------------------------------------------ decoder
    def step(self, tokens: torch.Tensor, cache: RNNCache, memory: torch.Tensor,
             src_mask: torch.Tensor | None) -> torch.Tensor:
        """One decoder step for every row: tokens (B,) -> logits (B, vocab_size)."""
        if cache.state is None:
            cache.state = self.initial_state(memory, src_mask)
            if self.config.attention:
                cache.keys = self.attention.project_keys(memory)
        e = self.drop(self.embedding(tokens))  # (B, E)
        if self.config.attention:
            top = cache.state[0] if isinstance(cache.state, tuple) else cache.state
            assert cache.keys is not None
            context, _ = self.attention(top[-1], cache.keys, memory, src_mask)  # (B, 2H)
            out, cache.state = self.decoder(torch.cat([e, context], -1)[:, None], cache.state)
            features = torch.cat([out[:, 0], context, e], -1)  # (B, H + 2H + E)
        else:
            out, cache.state = self.decoder(e[:, None], cache.state)  # (B, 1, H)
            features = out[:, 0]
        cache.steps += 1
        return self.out(self.drop(features))  # (B, vocab_size)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, *,
                src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T, vocab_size) predicting the token after each of tgt's.
        Without attention the decoder reads the whole target in one call; with attention each
        step needs the state the previous one left, so it runs step by step."""
        if tgt is None:
            raise InputError("an encoder-decoder model needs target tokens: model(src, tgt)")
        src_mask = padding_mask if src_mask is None else src_mask
        memory = self.encode(src, src_mask)
        if not self.config.attention:
            state = self.initial_state(memory, src_mask)
            out, _ = self.decoder(self.drop(self.embedding(tgt)), state)  # (B, T, H)
            return self.out(self.drop(out))  # (B, T, vocab_size)
        cache = RNNCache()
        return torch.stack([self.step(tgt[:, t], cache, memory, src_mask)
                            for t in range(tgt.shape[1])], dim=1)  # (B, T, vocab_size)

    def new_cache(self) -> RNNCache:
        return RNNCache()

    def next_token_logits(self, tokens: torch.Tensor, cache: RNNCache,
                          padding_mask: torch.Tensor | None = None,
                          positions: torch.Tensor | None = None,
                          memory: torch.Tensor | None = None,
                          src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits (B, vocab_size) of the token after `tokens` (B, T), the newest of each row
        (the cache holds the state after the earlier ones). As Transformer.next_token_logits."""
        if memory is None:
            raise InputError("a recurrent translator decodes from the encoder's memory: pass "
                             "memory=model.encode(src, src_mask)")
        logits = None
        for t in range(tokens.shape[1]):
            logits = self.step(tokens[:, t], cache, memory, src_mask)
        if logits is None:
            raise InputError("next_token_logits needs at least one token")
        return logits.float()

    def tied_weights(self) -> dict[str, str]:
        return {}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
