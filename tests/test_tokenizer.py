"""Tests for qkv.tokenizer: round trips, batches, save/load, errors, parity with transformers."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from qkv.data import text_chunks
from qkv.errors import InputError, TokenizerError
from qkv.hf.tokenizer import load_tokenizer
from qkv.tokenizer import Tokenizer

# Strings that break naive tokenizers: accents, emoji (4 UTF-8 bytes), CJK, whitespace runs.
TRICKY = [
    "",
    "atenção à ação",
    "Olá, mundo! 😀",
    "日本語のテキスト",
    "  multiple   spaces\tand\ttabs\n",
    "line one\nline two\n\n\nend",
    "ALL CAPS and MiXeD",
    "naïve café",
    " ",
    "\n",
]

# A small corpus that contains every character of TRICKY, so the char tokenizer knows them all.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need; the transformer reads tokens, not characters.",
    "atenção à ação, naïve café, Olá, mundo! 😀",
    "日本語のテキスト",
    "  multiple   spaces\tand\ttabs\n",
    "line one\nline two\n\n\nend",
    "ALL CAPS and MiXeD case TEXT",
] * 5


@pytest.fixture(scope="module")
def trained() -> dict[str, Tokenizer]:
    """One small tokenizer of each kind, trained once for the whole module."""
    return {
        "char": Tokenizer.train(CORPUS, kind="char"),
        "bpe": Tokenizer.train(CORPUS, kind="bpe", vocab_size=400),
        "wordpiece": Tokenizer.train(CORPUS, kind="wordpiece", vocab_size=300),
    }


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize("text", TRICKY, ids=repr)
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_is_exact(trained: dict[str, Tokenizer], kind: str, text: str) -> None:
    tokenizer = trained[kind]
    ids = tokenizer.encode(text)
    assert all(isinstance(token_id, int) for token_id in ids)
    assert tokenizer.decode(ids) == text


def test_bpe_round_trips_text_it_never_saw(trained: dict[str, Tokenizer]) -> None:
    # Byte-level BPE starts from all 256 bytes, so unseen scripts still encode and decode exactly.
    text = "Ωμέγα ✓ 🚀🚀 Привет\r\n\x00 ﷽"
    tokenizer = trained["bpe"]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.unk_id is None


def test_char_tokenizer_has_one_token_per_character(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["char"]
    text = "Olá 😀\n"
    assert tokenizer.tokenize(text) == list(text)
    assert len(tokenizer.encode(text)) == len(text)


def test_char_vocabulary_is_sorted_with_special_tokens_first() -> None:
    tokenizer = Tokenizer.train(["cab", "bca\n"], kind="char")
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<unk>", "<|endoftext|>")] == [0, 1, 2]
    assert [vocab[c] for c in ("\n", "a", "b", "c")] == [3, 4, 5, 6]
    assert tokenizer.vocab_size == len(tokenizer) == 7
    # Training again gives exactly the same ids.
    assert Tokenizer.train(["bca\n", "cab"], kind="char").get_vocab() == vocab


def test_char_vocab_size_keeps_the_most_frequent_characters() -> None:
    tokenizer = Tokenizer.train(["aaaa", "bbb", "cc", "d"], kind="char", vocab_size=3 + 2)
    assert tokenizer.vocab_size == 5
    assert tokenizer.encode("ab") == [3, 4]
    assert tokenizer.encode("d") == [tokenizer.unk_id]


def test_char_unknown_character_becomes_unk(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["char"]
    ids = tokenizer.encode("aT€")  # "€" never appears in the corpus
    assert ids[-1] == tokenizer.unk_id
    assert tokenizer.decode(ids) == "aT"  # [UNK] is special, so it is skipped


def test_char_without_unk_rejects_unknown_characters() -> None:
    tokenizer = Tokenizer.train(["abc"], kind="char", special_tokens=["<pad>"])
    with pytest.raises(InputError, match="character '€' is not in the vocabulary"):
        tokenizer.encode("a€")


def test_wordpiece_round_trip_after_normalisation(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["wordpiece"]
    text = "the quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    assert tokenizer.decode(ids) == text
    # Lossy by design: case, accents and spacing are normalised away.
    assert tokenizer.decode(tokenizer.encode("The  QUICK\tfox")) == "the quick fox"
    assert tokenizer.decode(tokenizer.encode("ação")) == "acao"


def test_wordpiece_pair_has_token_types(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["wordpiece"]
    pair = tokenizer.encode_pair("the fox", "the dog")
    first, second = tokenizer.encode("the fox"), tokenizer.encode("the dog")
    assert pair["input_ids"] == first + second[1:]
    assert pair["token_type_ids"] == [0] * len(first) + [1] * (len(second) - 1)


def test_decode_accepts_a_tensor(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["bpe"]
    ids = tokenizer.encode("Olá, mundo!")
    assert tokenizer.decode(torch.tensor(ids)) == "Olá, mundo!"


# ---------------------------------------------------------------------- special tokens


def test_default_special_token_ids(trained: dict[str, Tokenizer]) -> None:
    char, bpe, wordpiece = trained["char"], trained["bpe"], trained["wordpiece"]
    assert (char.pad_id, char.unk_id, char.bos_id, char.eos_id) == (0, 1, 2, 2)
    assert (char.mask_id, char.cls_id, char.sep_id) == (None, None, None)
    assert (bpe.pad_id, bpe.unk_id, bpe.bos_id, bpe.eos_id) == (0, None, 1, 1)
    assert (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id) == (0, 1, 2)
    assert (wordpiece.sep_id, wordpiece.mask_id, wordpiece.bos_id) == (3, 4, None)
    assert {kind: t.kind for kind, t in trained.items()} == {k: k for k in trained}


def test_special_tokens_are_skipped_when_decoding(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["bpe"]
    ids = [tokenizer.bos_id, *tokenizer.encode("fox"), tokenizer.eos_id]
    assert tokenizer.decode(ids) == "fox"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|endoftext|>fox<|endoftext|>"
    assert tokenizer.id_to_token(tokenizer.pad_id) == "<pad>"
    assert tokenizer.token_to_id("<|endoftext|>") == tokenizer.eos_id


def test_custom_special_tokens_get_roles_by_name() -> None:
    tokenizer = Tokenizer.train(CORPUS, kind="bpe", vocab_size=300, special_tokens=["<s>", "</s>"])
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, None)
    # Without a pad token, padding falls back to eos (any id works: the mask hides it).
    batch = tokenizer.encode_batch(["a", "the fox"], padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.eos_id


# ---------------------------------------------------------------------- batches


def test_right_padding_and_attention_mask(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["char"]
    batch = tokenizer.encode_batch(["ab", "abcd", ""], padding=True)
    pad = tokenizer.pad_id
    a, b, c, d = tokenizer.encode("abcd")
    assert batch["input_ids"] == [[a, b, pad, pad], [a, b, c, d], [pad] * 4]
    assert batch["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]


def test_left_padding_and_attention_mask(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["char"]
    batch = tokenizer.encode_batch(["ab", "abcd"], padding=True, padding_side="left")
    pad = tokenizer.pad_id
    a, b, c, d = tokenizer.encode("abcd")
    assert batch["input_ids"] == [[pad, pad, a, b], [a, b, c, d]]
    assert batch["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_no_padding_keeps_ragged_rows(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["char"]
    batch = tokenizer.encode_batch(["ab", "abcd"])
    assert [len(row) for row in batch["input_ids"]] == [2, 4]
    assert batch["attention_mask"] == [[1, 1], [1, 1, 1, 1]]


def test_truncation_and_max_length_padding(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["char"]
    batch = tokenizer.encode_batch(
        ["abcdefgh", "ab"], padding="max_length", truncation=True, max_length=5
    )
    assert batch["input_ids"][0] == tokenizer.encode("abcde")
    assert batch["input_ids"][1] == tokenizer.encode("ab") + [tokenizer.pad_id] * 3
    assert batch["attention_mask"] == [[1] * 5, [1, 1, 0, 0, 0]]


def test_truncation_keeps_cls_and_sep(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["wordpiece"]
    text = "the quick brown fox jumps over the lazy dog"
    ids = tokenizer.encode_batch([text], truncation=True, max_length=4)["input_ids"][0]
    assert len(ids) == 4
    assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    assert ids[1:3] == tokenizer.encode(text, add_special_tokens=False)[:2]


def test_return_tensors_pt(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["bpe"]
    batch = tokenizer(["the fox", "a", "Olá, mundo! 😀"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape and ids.shape[0] == 3
    assert ids.shape[1] == max(len(tokenizer.encode(t)) for t in ["the fox", "a", "Olá, mundo! 😀"])
    assert mask.sum(dim=1).tolist() == [len(tokenizer.encode(t)) for t in ["the fox", "a"]] + [
        ids.shape[1]
    ]


def test_call_with_one_string_is_a_batch_of_one(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["bpe"]
    batch = tokenizer("the fox", return_tensors="pt")
    assert batch["input_ids"].shape == (1, len(tokenizer.encode("the fox")))


def test_batch_errors(trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["char"]
    with pytest.raises(InputError, match="rows of different lengths"):
        tokenizer.encode_batch(["ab", "abc"], return_tensors="pt")
    with pytest.raises(InputError, match="need max_length"):
        tokenizer.encode_batch(["ab"], truncation=True)
    with pytest.raises(InputError, match="longer than max_length 2"):
        tokenizer.encode_batch(["abc"], padding="max_length", max_length=2)
    with pytest.raises(InputError, match="must be a str"):
        tokenizer.encode(42)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="token id 9999 is out of range"):
        tokenizer.decode([1, 9999])


# ---------------------------------------------------------------------- save and load


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_save_load_gives_identical_tokenizer(
    trained: dict[str, Tokenizer], kind: str, tmp_path: Path
) -> None:
    tokenizer = trained[kind]
    written = tokenizer.save(tmp_path / "model")
    assert written == tmp_path / "model" / "tokenizer.json"
    for source in (written, written.parent, str(written)):
        loaded = Tokenizer.load(source)
        assert loaded.kind == kind
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.special_tokens == tokenizer.special_tokens
        for role in ("pad", "unk", "bos", "eos", "mask", "cls", "sep"):
            assert getattr(loaded, f"{role}_id") == getattr(tokenizer, f"{role}_id")
        for text in TRICKY:
            assert loaded.encode(text) == tokenizer.encode(text)
            assert loaded.decode(loaded.encode(text)) == tokenizer.decode(tokenizer.encode(text))


def test_save_to_a_json_file_name(trained: dict[str, Tokenizer], tmp_path: Path) -> None:
    written = trained["char"].save(tmp_path / "my_tokenizer.json")
    assert written == tmp_path / "my_tokenizer.json"
    assert Tokenizer.load(written).get_vocab() == trained["char"].get_vocab()


def test_save_is_atomic_and_leaves_no_temporary_files(
    trained: dict[str, Tokenizer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained["char"].save(tmp_path)
    trained["bpe"].save(tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    assert Tokenizer.load(tmp_path).kind == "bpe"

    # A failure at the last step leaves the old file intact and cleans up the temporary one.
    def broken_replace(source: str, target: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        trained["wordpiece"].save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    assert Tokenizer.load(tmp_path).kind == "bpe"


def test_load_gpt2_style_vocab_and_merges(trained: dict[str, Tokenizer], tmp_path: Path) -> None:
    tokenizer = trained["bpe"]
    tokenizer.backend.model.save(str(tmp_path))  # writes vocab.json and merges.txt
    assert {p.name for p in tmp_path.iterdir()} == {"vocab.json", "merges.txt"}
    loaded = load_tokenizer(tmp_path)
    assert loaded.kind == "bpe"
    assert (loaded.pad_id, loaded.eos_id) == (tokenizer.pad_id, tokenizer.eos_id)
    for text in TRICKY:
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


# ---------------------------------------------------------------------- training from files


def test_train_from_files_matches_train_from_texts(tmp_path: Path) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("Olá 😀\nsecond line\n", encoding="utf-8")
    second.write_bytes("日本語\r\n".encode())
    from_files = Tokenizer.train(text_chunks([first, second]), kind="char")
    from_texts = Tokenizer.train(["Olá 😀\nsecond line\n", "日本語\r\n"], kind="char")
    assert from_files.get_vocab() == from_texts.get_vocab()
    assert from_files.decode(from_files.encode("日本語\r\n")) == "日本語\r\n"
    bpe = Tokenizer.train(text_chunks([first, second]), kind="bpe", vocab_size=300)
    assert bpe.decode(bpe.encode("second 日本語")) == "second 日本語"


def test_train_from_a_generator_or_one_text() -> None:
    tokenizer = Tokenizer.train((line for line in CORPUS), kind="wordpiece", vocab_size=200)
    assert tokenizer.kind == "wordpiece" and tokenizer.vocab_size <= 200
    one = Tokenizer.train("banana", kind="char")  # one str is one text, not six
    assert set(one.get_vocab()) - set(one.special_tokens.values()) == {"a", "b", "n"}


# ---------------------------------------------------------------------- errors


def test_load_missing_file() -> None:
    with pytest.raises(TokenizerError, match="tokenizer file runs/nothing/tokenizer.json does not"):
        Tokenizer.load("runs/nothing/tokenizer.json")


def test_load_directory_without_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": ', '{"hello": 1}', "\xff\xfe"])
def test_load_corrupt_json(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(TokenizerError, match="is not a valid tokenizer.json"):
        Tokenizer.load(path)


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
@pytest.mark.parametrize("corpus", [[], [""], ["", ""]], ids=["no texts", "one empty", "two"])
def test_empty_corpus(kind: str, corpus: list[str]) -> None:
    with pytest.raises(TokenizerError, match="cannot train a tokenizer on an empty corpus"):
        Tokenizer.train(corpus, kind=kind)


def test_empty_training_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TokenizerError, match="empty corpus"):
        Tokenizer.train(text_chunks([empty]), kind="bpe")


def test_non_utf8_training_file(tmp_path: Path) -> None:
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"hello \xff\xfe\x00 world")
    with pytest.raises(InputError, match=r"data\.bin is not UTF-8 text"):
        Tokenizer.train(text_chunks([binary]), kind="bpe")


@pytest.mark.parametrize("call, error, message", [
    (lambda: Tokenizer.train(CORPUS, kind="unigram"), TokenizerError,  # type: ignore[arg-type]
     "unknown tokenizer kind 'unigram'"),
    (lambda: Tokenizer.train(CORPUS, kind="bpe", vocab_size=100), TokenizerError,
     "too small for byte-level BPE"),
    (lambda: Tokenizer.train(CORPUS, kind="char", vocab_size=3), TokenizerError,
     "leaves no room after the 3 special tokens"),
    (lambda: Tokenizer.train(CORPUS, special_tokens=["<s>", "<s>"]), TokenizerError,
     "contains duplicates"),
    (lambda: Tokenizer.train([b"bytes"], kind="char"), InputError,  # type: ignore[list-item]
     "must be strings of text, got bytes"),
    (lambda: Tokenizer.train([Path("notes.txt")], kind="char"), InputError,
     "got \\w*Path \\(read files with qkv.data.text_chunks\\)"),
])
def test_bad_training_arguments(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------------- BPE-dropout


def test_bpe_dropout_samples_other_segmentations_that_decode_to_the_same_text(
        trained: dict[str, Tokenizer]) -> None:
    tokenizer = trained["bpe"]
    texts = [*CORPUS[:7], *TRICKY]
    plain = tokenizer.encode_batch(texts, add_special_tokens=False)["input_ids"]
    assert tokenizer.encode_sampled(texts, 0.0, random.Random(0)) == plain  # the usual cut
    sampled = tokenizer.encode_sampled(texts, 0.5, random.Random(1))
    assert sum(map(len, sampled)) > sum(map(len, plain))  # merges were left out
    assert [tokenizer.decode(row) for row in sampled] == texts  # still the same text
    assert tokenizer.encode_sampled(texts, 0.5, random.Random(1)) == sampled  # seeded
    assert tokenizer.encode_sampled(texts, 0.5, random.Random(2)) != sampled
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        tokenizer.encode_sampled(texts, 1.0, random.Random(0))
    with pytest.raises(TokenizerError, match="byte-level BPE"):
        trained["wordpiece"].encode_sampled(texts, 0.1, random.Random(0))
