"""Transformer: the three families built from the same layers.

    encoder          BERT         tokens -> Encoder -> MLM head | pooled embedding | classifier
    decoder          GPT, Llama   tokens -> Decoder (causal) -> LM head -> next-token logits
    encoder-decoder  the paper    source -> Encoder -> memory
                                  target -> Decoder (causal, cross-attn to memory) -> LM head

Masks follow one convention everywhere: a padding mask is (B, T) with 1/True for a real token and
0/False for padding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .errors import InputError
from .layers.attention import KVCache
from .layers.block import DecoderBlock, EncoderBlock
from .layers.embedding import TokenEmbedding, TypeEmbedding
from .layers.feedforward import ACTIVATIONS
from .layers.norm import make_norm
from .layers.position import LearnedPositions, RotaryEmbedding, SinusoidalPositions


class _Stack(nn.Module):
    """What both stacks do before their blocks: add positions (and segments), norm, dropout."""

    def __init__(self, cfg: ModelConfig, token_types: bool):
        super().__init__()
        self.positions: nn.Module | None = None
        self.rope: RotaryEmbedding | None = None
        if cfg.position == "learned":
            self.positions = LearnedPositions(cfg.max_seq_len, cfg.d_model, cfg.position_offset)
        elif cfg.position == "sinusoidal":
            self.positions = SinusoidalPositions(cfg.max_seq_len, cfg.d_model,
                                                 cfg.sinusoidal_layout)
        elif cfg.position == "rope":
            self.rope = RotaryEmbedding(cfg.d_head, cfg.rope_theta)
        self.types = TypeEmbedding(cfg.type_vocab_size, cfg.d_model) if token_types else None
        self.embed_norm = (make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
                           if cfg.embedding_norm else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = (make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
                     if cfg.has_final_norm else None)

    def embed(self, x: torch.Tensor, positions: torch.Tensor,
              token_types: torch.Tensor | None = None):
        """x: token vectors (B, T, d). Returns (vectors to feed the blocks, rope angles or None)."""
        if self.positions is not None:
            x = x + self.positions(positions).to(x.dtype)
        if self.types is not None:
            if token_types is None:
                token_types = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            x = x + self.types(token_types)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        rope = self.rope(positions) if self.rope is not None else None
        return self.drop(x), rope

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.norm is not None else x


class Encoder(_Stack):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, token_types=cfg.type_vocab_size > 0)
        self.layers = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.encoder_layers))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None,
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)[None]  # (1, T)
        x, rope = self.embed(x, positions, token_types)
        mask = None if padding_mask is None else padding_mask[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, mask, rope)
        return self.finish(x)  # (B, T, d_model)


class Cache:
    """One (self-attention, cross-attention) KVCache pair per decoder layer."""

    def __init__(self, n_layers: int):
        self.layers = [(KVCache(), KVCache()) for _ in range(n_layers)]

    def __len__(self) -> int:  # how many positions are cached
        return len(self.layers[0][0]) if self.layers else 0

    def reorder(self, index: torch.Tensor) -> None:
        for self_cache, cross_cache in self.layers:
            self_cache.reorder(index)
            cross_cache.reorder(index)


class Decoder(_Stack):
    def __init__(self, cfg: ModelConfig, cross_attention: bool):
        super().__init__(cfg, token_types=False)
        self.layers = nn.ModuleList(
            DecoderBlock(cfg, cross_attention) for _ in range(cfg.decoder_layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        T = x.shape[1]
        past = len(cache) if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device)[None]  # (1, T)
        x, rope = self.embed(x, positions)
        mask = None
        if padding_mask is not None:  # covers past + new tokens: (B, past + T)
            mask = padding_mask[:, None, None, :].expand(-1, 1, T, -1).clone()  # (B, 1, T, Tk)
            # A padding query may have no real key to look at; let it see itself so that the
            # softmax is defined (its output is never used).
            idx = torch.arange(T, device=x.device)
            mask[:, :, idx, past + idx] = True
        if memory_mask is not None:
            memory_mask = memory_mask[:, None, None, :]  # (B, 1, 1, S)
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x = layer(x, mask, rope, memory, memory_mask, layer_cache)
        return self.finish(x)  # (B, T, d_model)


class MLMTransform(nn.Module):
    """BERT's masked-LM head before the output layer: dense -> activation -> norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = ACTIVATIONS.get(cfg.activation, ACTIVATIONS["gelu"])
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(h)))


class Pooler(nn.Module):
    """BERT's pooler: the first ([CLS]) token through dense + tanh."""

    def __init__(self, d_model: int):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))  # (B, d_model)


def pool(h: torch.Tensor, padding_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, d) -> (B, d): one vector per sequence, ignoring padding."""
    if padding_mask is None:
        padding_mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    m = padding_mask.to(h.dtype)[..., None]  # (B, T, 1)
    if how == "cls":
        return h[:, 0]
    if how == "last":  # the last real token, whichever side the padding is on
        last = (padding_mask.long() * torch.arange(h.shape[1], device=h.device)).argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    if how == "max":
        return h.masked_fill(m == 0, float("-inf")).amax(1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean


class Transformer(nn.Module):
    """A Transformer of any family, built from a ModelConfig."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        family = cfg.family
        self.tokens = TokenEmbedding(cfg.vocab_size, cfg.d_model, cfg.scale_embeddings)
        self.encoder = Encoder(cfg) if family != "decoder" else None
        self.decoder = Decoder(cfg, family == "encoder-decoder") if family != "encoder" else None
        self.mlm_transform = MLMTransform(cfg) if cfg.mlm_transform else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.pooler = Pooler(cfg.d_model) if cfg.pooler else None
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels) if cfg.num_labels else None
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 N), so the
        # sum over N layers keeps a variance independent of depth.
        n = max(1, cfg.encoder_layers + cfg.decoder_layers)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "ffn.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n))
        if cfg.tie_embeddings:  # the output layer reuses the input embedding (Press & Wolf 2017)
            self.lm_head.weight = self.tokens.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ the families
    def forward(
        self,
        tokens: torch.Tensor,
        tgt: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Logits over the vocabulary, (B, T, vocab_size).

        decoder:          model(tokens, padding_mask=None)         next-token logits
        encoder:          model(tokens, padding_mask=None)         masked-LM logits
        encoder-decoder:  model(src, tgt, src_mask=None, tgt_mask=None)
        """
        family = self.config.family
        if family == "encoder-decoder":
            if tgt is None:
                raise InputError("an encoder-decoder model needs target tokens: model(src, tgt)")
            src_mask = padding_mask if src_mask is None else src_mask
            memory = self.encode(tokens, src_mask)
            return self.decode(tgt, memory, src_mask, tgt_mask, cache=cache)
        if tgt is not None:
            raise InputError(f"a {family} model takes one token sequence, not (src, tgt); pass "
                             "a padding mask by name: model(tokens, padding_mask=mask)")
        if family == "encoder":
            return self.logits(self.encode(tokens, padding_mask, token_types, positions))
        h = self.decoder(self.tokens(_ids(tokens)), _mask(padding_mask, tokens, cache), positions,
                         cache=cache)
        return self.logits(h)

    def encode(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None,
               token_types: torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output, one vector per token: (B, T, d_model)."""
        if self.encoder is None:
            raise InputError("a decoder-only model has no encoder; use hidden_states()")
        tokens = _ids(tokens)
        return self.encoder(self.tokens(tokens), _mask(padding_mask, tokens), positions,
                            token_types)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor,
               src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None,
               cache: Cache | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder-decoder: target logits given the encoder's memory, (B, T, vocab_size)."""
        tgt = _ids(tgt)
        if src_mask is not None and src_mask.shape != memory.shape[:2]:
            raise InputError(f"src_mask has shape {tuple(src_mask.shape)} but the source has "
                             f"shape {tuple(memory.shape[:2])}")
        h = self.decoder(self.tokens(tgt), _mask(tgt_mask, tgt, cache), positions, memory,
                         None if src_mask is None else src_mask.bool(), cache)
        return self.logits(h)

    # ------------------------------------------------------------------ heads
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer: hidden vectors -> scores over the vocabulary (before softmax)."""
        if self.mlm_transform is not None:
            h = self.mlm_transform(h)
        return self.lm_head(h)

    def hidden_states(self, tokens: torch.Tensor,
                      padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's vectors, (B, T, d): the encoder's, or the decoder's for decoders."""
        if self.encoder is not None:
            return self.encode(tokens, padding_mask)
        tokens = _ids(tokens)
        return self.decoder(self.tokens(tokens), _mask(padding_mask, tokens))

    def embed(self, tokens: torch.Tensor,
              padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One vector per sequence (B, d_model), pooled as config.pooling says."""
        padding_mask = _mask(padding_mask, tokens)
        v = pool(self.hidden_states(tokens, padding_mask), padding_mask, self.config.pooling)
        if self.config.normalize_embeddings:
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
    def new_cache(self) -> Cache:
        """An empty KV cache for incremental decoding."""
        return Cache(self.config.decoder_layers)

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

    def tied_weights(self) -> dict[str, str]:
        """{name: name it shares storage with}: saved once in a checkpoint."""
        return {"lm_head.weight": "tokens.weight"} if self.config.tie_embeddings else {}


def _ids(tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise InputError(f"tokens must be a torch tensor of ids, got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise InputError(f"tokens must have shape (batch, length), got {tuple(tokens.shape)}")
    return tokens


def _mask(padding_mask: torch.Tensor | None, tokens: torch.Tensor,
          cache: Cache | None = None) -> torch.Tensor | None:
    """Check a (B, T) padding mask and make it bool; with a cache it also covers the past."""
    if padding_mask is None:
        return None
    past = len(cache) if cache is not None else 0
    expected = (tokens.shape[0], past + tokens.shape[1])
    if tuple(padding_mask.shape) != expected:
        raise InputError(f"padding mask has shape {tuple(padding_mask.shape)}, expected "
                         f"{expected} (batch, {'past + ' if past else ''}length)")
    return padding_mask.bool()
