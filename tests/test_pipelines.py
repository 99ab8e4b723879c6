"""qkv.pipeline: output shapes for a string and for a list, each task, and clear errors."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.errors import InputError
from qkv.pipelines import pipeline
from qkv.tasks.classify import with_classifier

TEXTS = ["the film was good", "the plot was bad", "a long and winding story about a film"]


@pytest.fixture(scope="module")
def tok() -> qkv.Tokenizer:
    return qkv.Tokenizer.train(TEXTS * 3, kind="wordpiece", vocab_size=100)


def encoder(tok, labels=()) -> qkv.Transformer:
    cfg = qkv.ModelConfig(family="encoder", vocab_size=tok.vocab_size, d_model=32, n_layers=2,
                          n_heads=4, max_seq_len=16)
    model = qkv.Transformer(cfg)
    return with_classifier(model, list(labels)) if labels else model


def test_text_classification_shapes(tok, tmp_path):
    qkv.save(encoder(tok, ["negative", "neutral", "positive"]), tok, tmp_path / "clf")
    clf = pipeline("sentiment-analysis", model=str(tmp_path / "clf"))
    one = clf("the film was good")
    assert isinstance(one, list) and len(one) == 1 and set(one[0]) == {"label", "score"}
    assert one[0]["label"] in ("negative", "neutral", "positive") and 0 < one[0]["score"] <= 1
    many = clf(TEXTS)
    assert len(many) == 3 and all(isinstance(r, dict) for r in many)
    ranked = clf(TEXTS, top_k=2)
    assert len(ranked) == 3 and all(len(r) == 2 for r in ranked)
    assert ranked[0][0]["score"] >= ranked[0][1]["score"]
    every = clf("the film was good", top_k=None)
    assert sorted(r["label"] for r in every) == ["negative", "neutral", "positive"]
    assert abs(sum(r["score"] for r in every) - 1) < 1e-5
    assert every[0] == one[0]


def test_long_texts_are_truncated_to_max_seq_len(tok):
    clf = pipeline("text-classification", model=(encoder(tok, ["a", "b"]), tok))
    assert len(clf(["film " * 100, "good"])) == 2  # 100+ tokens, the model reads 16


def test_fill_mask_shapes(tok):
    fill = pipeline("fill-mask", model=(encoder(tok), tok))
    one = fill("the [MASK] was good", top_k=3)
    assert len(one) == 3 and isinstance(one[0], dict) and "token_str" in one[0]
    two = fill("the [MASK] was [MASK]", top_k=2)
    assert len(two) == 2 and all(len(c) == 2 for c in two)
    batch = fill(["the [MASK] was good", "the plot was [MASK]"], top_k=2)
    assert len(batch) == 2 and all(len(r) == 2 and isinstance(r[0], dict) for r in batch)


def test_feature_extraction_shapes(tok):
    model = encoder(tok)
    emb = pipeline("feature-extraction", model=model, tokenizer=tok)
    one, many = emb("the film was good"), emb(TEXTS)
    assert one.shape == (32,) and many.shape == (3, 32)
    ids = torch.tensor([tok.encode("the film was good")])
    torch.testing.assert_close(one, model.eval().sentence_embedding(ids)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many[0], one, rtol=1e-5, atol=1e-5)
    unit = emb(TEXTS, normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3))


def test_text_generation_shapes():
    tok = qkv.Tokenizer.train(TEXTS * 3, kind="char")
    gpt = qkv.Transformer(qkv.ModelConfig(family="decoder", vocab_size=tok.vocab_size,
                                          d_model=32, n_layers=1, n_heads=4, max_seq_len=64))
    gen = pipeline("text-generation", model=(gpt, tok))
    one = gen("the ", max_new_tokens=5, seed=0)
    assert len(one) == 1 and one[0]["generated_text"].startswith("the ")
    assert len(one[0]["generated_text"]) <= len("the ") + 5  # may stop early at <|endoftext|>
    assert gen("the ", max_new_tokens=5, seed=0) == one  # the seed makes it reproducible
    many = gen(["the ", "a "], max_new_tokens=3, temperature=0, return_full_text=False)
    assert len(many) == 2 and all(len(r) == 1 and len(r[0]["generated_text"]) <= 3
                                  for r in many)


def gpt(tok):
    return qkv.Transformer(qkv.ModelConfig(family="decoder", vocab_size=tok.vocab_size,
                                           d_model=32, n_layers=1, n_heads=4))


@pytest.mark.parametrize(("task", "model", "message"), [
    ("summarize", encoder, "unknown task 'summarize'"),
    ("fill-mask", None, "needs a model"),  # sentiment-analysis has a packaged default
    ("sentiment-analysis", encoder, "no classification head"),
    ("fill-mask", gpt, "fill-mask needs an encoder"),
    ("text-generation", encoder, "text-generation needs a decoder model, not an encoder"),
])
def test_a_task_the_model_cannot_do_is_refused(tok, task, model, message):
    with pytest.raises(InputError, match=message):
        pipeline(task, model=None if model is None else (model(tok), tok))


@pytest.mark.parametrize(("inputs", "message"), [([], "empty list"), (["ok", 3], "must be a str")])
def test_bad_inputs_to_a_pipeline_are_refused(tok, inputs, message):
    clf = pipeline("text-classification", model=(encoder(tok, ["a", "b"]), tok))
    with pytest.raises(InputError, match=message):
        clf(inputs)
