"""Baselines: the models the Transformer replaced, kept to be compared with it in one harness.

    baselines/rnn.py   LSTM/GRU encoder-decoders, without attention (Sutskever et al. 2014) and
                       with additive attention over a bidirectional encoder (Bahdanau et al. 2015)

They train through the same loop (`qkv train --family rnn`), on the same data and tokenizer,
decode with the same beam search and are scored with the same BLEU as the Transformer.
"""

from .rnn import AdditiveAttention, RNNCache, RNNConfig, RNNTranslator

__all__ = ["AdditiveAttention", "RNNCache", "RNNConfig", "RNNTranslator"]
