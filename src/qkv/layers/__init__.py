"""The boxes of the Transformer diagram, one small file each."""

from .attention import CrossAttention, KVCache, SelfAttention, attention, record_attention
from .block import DecoderBlock, DecoderCache, EncoderBlock
from .dropout import Dropout
from .embedding import TokenEmbedding, TypeEmbedding
from .feedforward import FeedForward, GatedFeedForward
from .heads import MLMTransform, Pooler, pool
from .norm import LayerNorm, RMSNorm
from .position import LearnedPositions, RotaryEmbedding, SinusoidalPositions, sinusoidal_table

__all__ = [
    "CrossAttention", "DecoderBlock", "DecoderCache", "Dropout", "EncoderBlock", "FeedForward",
    "GatedFeedForward", "KVCache", "LayerNorm", "LearnedPositions", "MLMTransform", "Pooler",
    "RMSNorm", "RotaryEmbedding", "SelfAttention", "SinusoidalPositions", "TokenEmbedding",
    "TypeEmbedding", "attention", "pool", "record_attention", "sinusoidal_table",
]
