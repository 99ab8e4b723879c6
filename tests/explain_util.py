"""Tiny models of every family and a live explainer server, for the explain tests."""

from __future__ import annotations

import torch

import qkv
from serve_util import free_port  # noqa: F401 (re-exported)
from serve_util import live_server as live  # noqa: F401 (re-exported)

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?:;'\n0123456789"
CORPUS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog ran",
          "the animal did not cross the street because it was tired"] * 4


def char_tokenizer() -> qkv.Tokenizer:
    return qkv.Tokenizer.train([ALPHABET], kind="char")


def decoder(position: str = "learned", seed: int = 0, **overrides):
    """A random 2-layer decoder over characters, with spread-out logits."""
    tok = char_tokenizer()
    torch.manual_seed(seed)
    base = dict(family="decoder", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4,
                max_seq_len=128, position=position, tie_embeddings=False)
    model = qkv.Transformer(qkv.ModelConfig(**{**base, **overrides})).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model, tok


def encoder(labels: tuple[str, ...] = ("negative", "positive")):
    """A random BERT-like encoder (post-norm, wordpiece, [MASK]) with a classifier head."""
    tok = qkv.Tokenizer.train(CORPUS, kind="wordpiece", vocab_size=90)
    torch.manual_seed(1)
    cfg = qkv.ModelConfig(family="encoder", vocab_size=tok.vocab_size, d_model=32, n_layers=2,
                          n_heads=4, max_seq_len=64, norm_placement="post", final_norm=False,
                          embedding_norm=True, type_vocab_size=2, mask_token_id=tok.mask_id,
                          labels=list(labels), pooling="cls",
                          pooler=True, mlm_transform=True)
    return qkv.Transformer(cfg).eval(), tok


def seq2seq():
    tok = char_tokenizer()
    torch.manual_seed(2)
    cfg = qkv.ModelConfig(family="encoder-decoder", vocab_size=tok.vocab_size, d_model=32,
                          n_layers=2, n_heads=4, max_seq_len=64, position="sinusoidal",
                          bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                          decoder_start_token_id=tok.bos_id, lm_head_bias=True)
    model = qkv.Transformer(cfg).eval()
    with torch.no_grad():  # keep its own translations away from the end token for a while
        model.lm_head.bias[tok.eos_id] = -30.0
    return model, tok


def rnn():
    """A random GRU translator with Bahdanau attention over characters."""
    from qkv.baselines import RNNConfig, RNNTranslator

    tok = char_tokenizer()
    torch.manual_seed(3)
    cfg = RNNConfig(vocab_size=tok.vocab_size, cell="gru", attention=True, d_embed=16,
                    d_hidden=24, n_layers=1, dropout=0.0, max_seq_len=64,
                    pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                    decoder_start_token_id=tok.bos_id)
    model = RNNTranslator(cfg).eval()
    with torch.no_grad():  # its own translations run for a while before the end token
        model.out.bias[tok.eos_id] = -30.0
    return model, tok


def save_rnn(model, tok, folder) -> None:
    """Write a recurrent translator's directory as `qkv train --family rnn` does."""
    from qkv.checkpoint import CONFIG, TOKENIZER, WEIGHTS, save_weights

    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / WEIGHTS, model.tied_weights())
    model.config.to_json(folder / CONFIG)
    tok.save(folder / TOKENIZER)
