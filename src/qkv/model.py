"""Transformer: the three families built from the same layers.

    encoder          BERT         tokens -> Encoder -> MLM head | sentence embedding | classifier
    decoder          GPT, Llama   tokens -> Decoder (causal) -> LM head -> next-token logits
    encoder-decoder  the paper    source -> Encoder -> memory
                                  target -> Decoder (causal, cross-attn to memory) -> LM head

A family is which stacks the model has: `encoder`, `decoder`, or both. Each stack turns token
vectors into contextual vectors the same way: add positions -> blocks -> final norm.

Masks follow one convention everywhere: a padding mask is (B, T) with 1/True for a real token and
0/False for padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar

import torch
from torch import nn

from .config import ModelConfig
from .errors import InputError
from .layers.attention import CrossAttention, SelfAttention
from .layers.block import DecoderBlock, DecoderCache, EncoderBlock
from .layers.dropout import Dropout
from .layers.embedding import TokenEmbedding, TypeEmbedding
from .layers.feedforward import make_feedforward
from .layers.heads import MLMTransform, Pooler, pool
from .layers.norm import make_norm
from .layers.position import LearnedPositions, RotaryEmbedding, SinusoidalPositions

#: Parameter names of earlier qkv versions -> today's, so checkpoints on disk keep loading.
RENAMED = {"tokens.weight": "token_embedding.weight"}


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with the parameter names of earlier qkv versions renamed (see RENAMED)."""
    return {RENAMED.get(k, k): v for k, v in state.items()}


# ---------------------------------------------------------------------- building the blocks

def _norm(cfg: ModelConfig) -> nn.Module:
    return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, bias=cfg.bias)


_Attention = TypeVar("_Attention", SelfAttention, CrossAttention)


def _attention(cfg: ModelConfig, kind: type[_Attention]) -> _Attention:
    return kind(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.bias,
                cfg.attention_dropout)


def encoder_block(cfg: ModelConfig) -> EncoderBlock:
    """One encoder block, its sublayers built as the config says."""
    return EncoderBlock(attn=_attention(cfg, SelfAttention), attn_norm=_norm(cfg),
                        ffn=make_feedforward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.bias),
                        ffn_norm=_norm(cfg),
                        pre_norm=cfg.norm_placement == "pre", dropout=cfg.dropout)


def decoder_block(cfg: ModelConfig, cross_attention: bool) -> DecoderBlock:
    """One decoder block; with cross_attention it also attends to the encoder's output."""
    return DecoderBlock(self_attn=_attention(cfg, SelfAttention), self_attn_norm=_norm(cfg),
                        cross_attn=_attention(cfg, CrossAttention) if cross_attention else None,
                        cross_attn_norm=_norm(cfg) if cross_attention else None,
                        ffn=make_feedforward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.bias),
                        ffn_norm=_norm(cfg),
                        pre_norm=cfg.norm_placement == "pre", dropout=cfg.dropout)


# ---------------------------------------------------------------------- the two stacks

class _Stack(nn.Module):
    """What both stacks share: adding positions (and segments), and the final norm."""

    def __init__(self, cfg: ModelConfig, token_types: bool):
        super().__init__()
        self.positions: nn.Module | None = None  # a vector per position, added to the token's
        self.rope: RotaryEmbedding | None = None  # or: queries and keys rotated by position
        if cfg.position == "learned":
            self.positions = LearnedPositions(cfg.max_seq_len, cfg.d_model, cfg.position_offset)
        elif cfg.position == "sinusoidal":
            self.positions = SinusoidalPositions(cfg.max_seq_len, cfg.d_model,
                                                 cfg.sinusoidal_layout)
        elif cfg.position == "rope":
            self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.types = TypeEmbedding(cfg.type_vocab_size, cfg.d_model) if token_types else None
        self.embed_norm = _norm(cfg) if cfg.embedding_norm else nn.Identity()
        self.drop = Dropout(cfg.dropout)
        self.norm = _norm(cfg) if cfg.final_norm else nn.Identity()

    def add_positions(self, x: torch.Tensor, positions: torch.Tensor,
                      token_types: torch.Tensor | None = None):
        """Token vectors (B, T, d) -> (what the first block reads, RoPE's angles or None)."""
        if self.positions is not None:
            x = x + self.positions(positions).to(x.dtype)
        if self.types is not None:  # BERT's segments: sentence A (0) or B (1)
            if token_types is None:
                token_types = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            x = x + self.types(token_types)
        rope = self.rope(positions) if self.rope is not None else None
        return self.drop(self.embed_norm(x)), rope


class Encoder(_Stack):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, token_types=cfg.type_vocab_size > 0)
        self.layers = nn.ModuleList(encoder_block(cfg) for _ in range(cfg.n_encoder_layers))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None,
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        """Token vectors (B, T, d_model) -> contextual vectors (B, T, d_model)."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)[None]  # (1, T)
        x, rope = self.add_positions(x, positions, token_types)  # (B, T, d_model)
        mask = None if padding_mask is None else padding_mask[:, None, None, :]  # (B, 1, 1, T)
        for block in self.layers:
            x = block(x, mask, rope)  # (B, T, d_model)
        return self.norm(x)  # (B, T, d_model)


class Decoder(_Stack):
    def __init__(self, cfg: ModelConfig, cross_attention: bool):
        super().__init__(cfg, token_types=False)
        self.layers = nn.ModuleList(
            decoder_block(cfg, cross_attention) for _ in range(cfg.n_decoder_layers))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None,
                cache: DecoderCache | list[DecoderCache] | None = None) -> torch.Tensor:
        """Token vectors (B, T, d_model) -> contextual vectors (B, T, d_model), causally.

        With a cache, x holds only the new positions and padding_mask covers past + new.
        With a list of caches, one per row, each row continues its own sequence (see
        `Transformer.next_token_logits`).
        """
        T = x.shape[1]
        caches: Iterable
        if isinstance(cache, list):
            if padding_mask is not None or memory is not None or len(cache) > x.shape[0]:
                raise InputError("a cache per row takes no padding mask and no memory, and at "
                                 "most one cache per row: each row continues its own "
                                 "decoder-only sequence")
            if positions is None:
                positions = _row_positions(cache, x.shape[0], T, x.device)  # (B, T)
            mask, caches = None, DecoderCache.per_row(cache, len(self.layers))
        else:
            past = len(cache) if cache is not None else 0
            if positions is None:
                positions = torch.arange(past, past + T, device=x.device)[None]  # (1, T)
            mask = _causal_padding_mask(padding_mask, T, past)  # (B, 1, T, past + T) or None
            caches = cache.layers if cache is not None else [None] * len(self.layers)
        x, rope = self.add_positions(x, positions)  # (B, T, d_model)
        if memory_mask is not None:
            memory_mask = memory_mask[:, None, None, :]  # (B, 1, 1, S)
        for block, layer_cache in zip(self.layers, caches, strict=True):
            x = block(x, mask, rope, memory, memory_mask, layer_cache)  # (B, T, d_model)
        return self.norm(x)  # (B, T, d_model)


def _row_positions(caches: list[DecoderCache], B: int, T: int,
                   device: torch.device) -> torch.Tensor:
    """Positions (B, T) of T new tokens per row: row r < len(caches) goes on from its cache's
    length; the filler rows after them count from 0."""
    past = torch.zeros(B, 1, dtype=torch.long)
    past[:len(caches), 0] = torch.tensor([len(c) for c in caches], dtype=torch.long)
    return (past + torch.arange(T)).to(device)  # (B, T)


def _causal_padding_mask(padding_mask: torch.Tensor | None, T: int,
                         past: int) -> torch.Tensor | None:
    """(B, past + T) padding mask -> (B, 1, T, past + T) keys each new query may see (the causal
    part is added by the attention itself). A (B, T, past + T) mask is taken as it is: several
    short sequences packed into one row see only their own tokens (qkv.tasks.sft)."""
    if padding_mask is None:
        return None
    if padding_mask.dim() == 3:  # packed sequences: which keys each query may see
        mask = padding_mask[:, None].clone()  # (B, 1, T, past + T)
    else:
        mask = padding_mask[:, None, None, :].expand(-1, 1, T, -1).clone()  # (B, 1, T, past + T)
    # A padding query may have no real key to look at; let it see itself so that the softmax
    # is defined (its output is never used).
    idx = torch.arange(T, device=padding_mask.device)
    mask[:, :, idx, past + idx] = True
    return mask


# ---------------------------------------------------------------------- the model

class Transformer(nn.Module):
    """A Transformer of any family, built from a ModelConfig."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.check_fits_memory()  # refused with its size before anything is allocated
        self.config = cfg = config
        self.token_embedding = TokenEmbedding(cfg.vocab_size, cfg.d_model, cfg.scale_embeddings)
        # The family is which stacks there are; the decoder of an encoder-decoder cross-attends.
        self.encoder = Encoder(cfg) if cfg.n_encoder_layers else None
        self.decoder = (Decoder(cfg, cross_attention=self.encoder is not None)
                        if cfg.n_decoder_layers else None)
        self.mlm_transform = (MLMTransform(cfg.d_model, cfg.activation,
                                           make_norm(cfg.norm, cfg.d_model, cfg.norm_eps))
                              if cfg.mlm_transform else nn.Identity())
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.pooler = Pooler(cfg.d_model) if cfg.pooler else None
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels) if cfg.num_labels else None
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 N), so the
        # sum over N layers keeps a variance independent of depth.
        n = max(1, cfg.n_encoder_layers + cfg.n_decoder_layers)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "ffn.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n))
        if cfg.scale_embeddings:  # vectors multiplied by sqrt(d_model): start them at N(0, 1/d)
            # (fairseq), so that a token's vector has about unit size per dimension, like the
            # sinusoidal positions added to it; at std 0.02 the positions drown the tokens and the
            # source barely moves the decoder's output at initialisation.
            nn.init.normal_(self.token_embedding.weight, std=cfg.d_model ** -0.5)
        if cfg.tie_embeddings:  # the output layer reuses the input embedding (Press & Wolf 2017)
            self.lm_head.weight = self.token_embedding.weight
        self.register_load_state_dict_pre_hook(_accept_old_names)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, tgt: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, *,
                src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None,
                token_types: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: DecoderCache | None = None) -> torch.Tensor:
        """Logits over the vocabulary, (B, T, vocab_size).

        decoder:          model(tokens, padding_mask=None)         next-token logits
        encoder:          model(tokens, padding_mask=None)         masked-LM logits
        encoder-decoder:  model(src, tgt, src_mask=None, tgt_mask=None)
        """
        if (tgt is not None) != (self.encoder is not None and self.decoder is not None):
            raise InputError(
                "an encoder-decoder model needs target tokens: model(src, tgt)" if tgt is None
                else f"a {self.config.family} model takes one token sequence, not (src, tgt); "
                "pass a padding mask by name: model(tokens, padding_mask=mask)")
        if self.decoder is None:  # encoder: tokens -> encoder -> head
            return self.logits(self.encode(tokens, padding_mask, token_types, positions))
        if self.encoder is None or tgt is None:  # decoder: tokens -> decoder -> head
            return self.decode(tokens, None, None, padding_mask, cache, positions)
        src_mask = padding_mask if src_mask is None else src_mask  # encoder-decoder:
        memory = self.encode(tokens, src_mask)  # the source becomes the memory (B, S, d_model)
        return self.decode(tgt, memory, src_mask, tgt_mask, cache, positions)

    def encode(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None,
               token_types: torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output, one vector per token: (B, T, d_model)."""
        if self.encoder is None:
            raise InputError("a decoder-only model has no encoder; use hidden_states()")
        x = self.token_embedding(_ids(tokens))  # (B, T, d_model)
        return self.encoder(x, _mask(padding_mask, tokens), positions, token_types)

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor | None = None,
               src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None,
               cache: DecoderCache | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder path: logits (B, T, vocab_size) predicting the token after each position.

        memory: the encoder's output (B, S, d_model) for an encoder-decoder, with its padding
        mask src_mask (B, S); None for a decoder-only model.
        """
        h = self._decoder_states(tokens, memory, src_mask, tgt_mask, cache, positions)
        return self.logits(h)  # (B, T, vocab_size)

    def next_token_logits(self, tokens: torch.Tensor, cache: DecoderCache | list[DecoderCache],
                          padding_mask: torch.Tensor | None = None,
                          positions: torch.Tensor | None = None,
                          memory: torch.Tensor | None = None,
                          src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits (B, vocab_size) of the token that follows `tokens` (B, T), the newest
        positions of each row; the cache (`new_cache()`) holds the earlier ones and grows by T.

        padding_mask (B, past + T) covers the cached positions too. An encoder-decoder passes
        the encoder's memory and src_mask. Only the last position goes through the output layer.

        cache may instead be a list of caches, one per row of a decoder-only batch: row r < len
        continues its own sequence (lengths may differ: no padding, no mask), attention runs row
        by row and every other layer on all B rows together; rows past the list are filler
        (logits without meaning). A server keeps B fixed, so that a row's numbers do not depend
        on how many other rows are live (qkv.serve).
        """
        h = self._decoder_states(tokens, memory, src_mask, padding_mask, cache, positions)
        return self.logits(h[:, -1]).float()  # (B, vocab_size)

    def _decoder_states(self, tokens, memory, src_mask, tgt_mask, cache, positions):
        if self.decoder is None:
            raise InputError("an encoder-only model has no decoder; use encode()")
        if memory is None and self.encoder is not None:
            raise InputError("an encoder-decoder model decodes from the encoder's memory: "
                             "pass memory=model.encode(src, src_mask)")
        if src_mask is not None and memory is not None and src_mask.shape != memory.shape[:2]:
            raise InputError(f"src_mask has shape {tuple(src_mask.shape)} but the source has "
                             f"shape {tuple(memory.shape[:2])}")
        x = self.token_embedding(_ids(tokens))  # (B, T, d_model)
        return self.decoder(x, _mask(tgt_mask, tokens, cache), positions, memory,
                            None if src_mask is None else src_mask.bool(), cache)

    # ------------------------------------------------------------------ heads
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer: hidden vectors -> scores over the vocabulary (before softmax)."""
        return self.lm_head(self.mlm_transform(h))

    def hidden_states(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's vectors, (B, T, d): the encoder's, or the decoder's for decoders
        (whose mask may also be (B, T, T), as decode's tgt_mask). `positions` (B, T): each
        token's position (default 0, 1, 2, ...)."""
        if self.encoder is not None:
            return self.encode(tokens, padding_mask, positions=positions)
        return self._decoder_states(tokens, None, None, padding_mask, None, positions)

    def sentence_embedding(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None,
                           normalize: bool | None = None) -> torch.Tensor:
        """One fp32 vector per sequence (B, d_model), pooled as config.pooling says (in fp32),
        scaled to length 1 if `normalize` says so (None: config.normalize_embeddings)."""
        padding_mask = _mask(padding_mask, tokens)
        h = self.hidden_states(tokens, padding_mask).float()  # (B, T, d_model)
        v = pool(h, padding_mask, self.config.pooling)  # (B, d_model)
        if self.config.normalize_embeddings if normalize is None else normalize:
            v = torch.nn.functional.normalize(v, dim=-1)
        return v

    def classify(self, tokens: torch.Tensor,
                 padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class scores (B, num_labels) from the sequence-classification head."""
        if self.classifier is None:
            raise InputError("this model has no classification head (config.labels is empty)")
        padding_mask = _mask(padding_mask, tokens)
        h = self.hidden_states(tokens, padding_mask)
        features = self.pooler(h) if self.pooler is not None else pool(
            h, padding_mask, self.config.pooling)
        return self.classifier(nn.functional.dropout(features, self.config.dropout,
                                                     self.training))

    # ------------------------------------------------------------------ helpers
    def new_cache(self, capacity: int | None = None) -> DecoderCache:
        """An empty KV cache for incremental decoding (next_token_logits). capacity: how many
        positions it will hold, when known (the buffers are then allocated once)."""
        return DecoderCache(self.config.n_decoder_layers, capacity)

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

    def tied_weights(self) -> dict[str, str]:
        """{name: name it shares storage with}: saved once in a checkpoint."""
        return {"lm_head.weight": "token_embedding.weight"} if self.config.tie_embeddings else {}


def _accept_old_names(module: nn.Module, state: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: rename parameters saved under earlier qkv names, in place."""
    for old, new in RENAMED.items():
        if prefix + old in state and prefix + new not in state:
            state[prefix + new] = state.pop(prefix + old)


def _ids(tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise InputError(f"tokens must be a torch tensor of ids, got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise InputError(f"tokens must have shape (batch, length), got {tuple(tokens.shape)}")
    return tokens


def _mask(padding_mask: torch.Tensor | None, tokens: torch.Tensor,
          cache: DecoderCache | list[DecoderCache] | None = None) -> torch.Tensor | None:
    """Check a (B, T) padding mask and make it bool; with a cache it also covers the past. A
    decoder also takes a (B, T, past + T) mask of the keys each query may see."""
    if padding_mask is None:
        return None
    past = len(cache) if isinstance(cache, DecoderCache) else 0
    expected = (tokens.shape[0], past + tokens.shape[1])
    if padding_mask.dim() == 3:
        expected = (tokens.shape[0], tokens.shape[1], past + tokens.shape[1])
    if tuple(padding_mask.shape) != expected:
        raise InputError(f"padding mask has shape {tuple(padding_mask.shape)}, expected "
                         f"{expected} (batch, {'past + ' if past else ''}length)")
    return padding_mask.bool()
