"""qkv.data: corpus files, the tokenize-once memmap cache, and language-model batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkv.data.tokens as tokens_module
from qkv import InputError, Tokenizer
from qkv.data import (
    BUNDLED,
    LMBatches,
    corpus_files,
    eval_batches,
    fast_encoder,
    fingerprint,
    fit_tokenizer,
    split,
    text_chunks,
    tokenize_corpus,
)

TEXT = BUNDLED.read_text(encoding="utf-8")[:20_000].rsplit("\n", 1)[0] + "\n"


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "shakespeare.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_bundled_corpus_is_tiny_shakespeare():
    assert corpus_files(None) == [BUNDLED]
    assert BUNDLED.stat().st_size == 1_115_394
    assert (BUNDLED.parent / "tiny_shakespeare.SOURCE.md").is_file()


def test_corpus_files_of_a_folder_are_sorted_and_skip_hidden(tmp_path):
    (tmp_path / "b.txt").write_text("bee\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("ay\n")
    (tmp_path / ".hidden").write_text("no\n")
    assert corpus_files(tmp_path) == [tmp_path / "b.txt", tmp_path / "sub" / "a.txt"]
    with pytest.raises(InputError, match="does not exist"):
        corpus_files(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no files"):
        corpus_files(tmp_path / "empty")


def test_bad_files_are_reported_in_one_sentence(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="is empty"):
        fingerprint([empty])
    binary = tmp_path / "image.png"
    binary.write_bytes(bytes([0x89, 0x50, 0x4E, 0x47, 0xFF, 0xFE, 0x00, 0x10]))
    with pytest.raises(InputError, match="not UTF-8|binary"):
        fingerprint([binary])
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"abc\x00def\n")
    with pytest.raises(InputError, match="NUL"):
        fingerprint([nul])


def test_text_chunks_stream_files_at_line_ends(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("héllo\nwörld")  # multi-byte characters, no final newline
    b.write_text("line one\nline two\n")
    pieces = list(text_chunks([a, b], chunk_bytes=4))
    assert "".join(pieces) == "héllo\nwörld\nline one\nline two\n"
    assert all(p.endswith("\n") for p in pieces)


def test_fingerprint_follows_the_content(corpus, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(TEXT)
    assert fingerprint([corpus]) == fingerprint([other])
    other.write_text(TEXT + "!")
    assert fingerprint([corpus]) != fingerprint([other])


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenized_cache_equals_encoding_the_whole_text(corpus, tmp_path, kind):
    tok = fit_tokenizer([corpus], kind, 300 if kind == "bpe" else None, tmp_path / "cache")
    ids = tokenize_corpus([corpus], tok, tmp_path / "cache")
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert np.array_equal(np.asarray(ids), np.array(tok.encode(TEXT)))


def test_the_cache_is_reused_until_the_text_changes(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    tok = fit_tokenizer([corpus], "char", cache_dir=cache)
    first = tokenize_corpus([corpus], tok, cache)
    assert len(list(cache.glob("tokens-*.bin"))) == 1

    def refuse(_):
        raise AssertionError("the text was tokenized again")

    monkeypatch.setattr(tokens_module, "fast_encoder", refuse)
    again = tokenize_corpus([corpus], tok, cache)  # a cache hit: no tokenizing at all
    assert np.array_equal(first, again)
    assert fit_tokenizer([corpus], "char", cache_dir=cache).get_vocab() == tok.get_vocab()
    monkeypatch.undo()
    corpus.write_text(TEXT.replace("First", "Worst"))
    changed = tokenize_corpus([corpus], tok, cache)
    assert len(list(cache.glob("tokens-*.bin"))) == 2
    assert not np.array_equal(np.asarray(first), np.asarray(changed))


def test_fast_char_encoder_matches_the_tokenizer_with_unknown_and_special_text():
    tok = Tokenizer.train(["abc\n"], kind="char")
    encode = fast_encoder(tok)
    for text in ["abcab\n", "abz\n", "a<|endoftext|>b\n", ""]:
        assert encode(text).tolist() == tok.encode(text)


def test_split_holds_out_the_end_and_rejects_a_tiny_corpus():
    ids = np.arange(1000)
    train, val = split(ids, 0.1, context=32)
    assert len(train) == 900 and val[0] == 900
    with pytest.raises(InputError, match="too short"):
        split(np.arange(100), 0.1, context=32)


def test_batches_are_shifted_windows_and_resume_exactly():
    ids = np.arange(10_000, dtype=np.uint16)
    batches = LMBatches(ids, context=16, batch_size=4, seed=3)
    x, y = next(batches)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    next(batches)
    state = batches.state_dict()
    expected = [next(batches) for _ in range(3)]
    other = LMBatches(ids, context=16, batch_size=4, seed=99)
    other.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, [next(other) for _ in range(3)], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert other.drawn == 5
    same_seed = LMBatches(ids, context=16, batch_size=4, seed=3)
    assert torch.equal(next(same_seed)[0], x)


def test_eval_batches_are_fixed_and_spread_over_the_text():
    ids = np.arange(5000)
    a = eval_batches(ids, 10, 8, max_windows=50)
    b = eval_batches(ids, 10, 8, max_windows=50)
    starts = torch.cat([x[:, 0] for x, _ in a])
    assert len(starts) == 50 and starts[0] == 0 and starts[-1] == 5000 - 11
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b, strict=True))


def test_a_stream_too_short_for_one_window_is_an_input_error():
    with pytest.raises(InputError, match="10 tokens cannot fill a window of 17"):
        LMBatches(np.arange(10, dtype=np.uint16), context=16, batch_size=4, seed=0)
