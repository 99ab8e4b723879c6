"""Learning a vocabulary from text: the trainers behind `Tokenizer.train`.

- char: count the characters, keep them (the most frequent if the vocabulary is capped);
- bpe: byte-level Byte-Pair Encoding (GPT-2): the 256 byte values are the starting vocabulary,
  and the most frequent adjacent pair is merged into a new token, again and again;
- wordpiece (BERT): words are cut into the longest known pieces, ``##`` marks a continuation.

The BPE and WordPiece merges are learned by the Rust `tokenizers` library. Also here: BERT's
text clean-up and ``[CLS] ... [SEP]`` wrapping, shared with `qkv.hf.tokenizer`, and the names
that mark a special token's role.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from qkv.errors import InputError, TokenizerError

Kind = Literal["char", "bpe", "wordpiece"]
KINDS: tuple[str, ...] = ("char", "bpe", "wordpiece")

#: The special tokens a freshly trained tokenizer gets when ``special_tokens`` is not given.
DEFAULT_SPECIAL_TOKENS: dict[str, list[str]] = {
    # pad = 0 is handy (zero-initialised padding embeddings); "<|endoftext|>" is both bos and eos.
    "char": ["<pad>", "<unk>", "<|endoftext|>"],
    # Byte-level BPE can encode anything, so it needs no <unk>.
    "bpe": ["<pad>", "<|endoftext|>"],
    # Exactly BERT's five special tokens.
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
}

#: For each role, the token strings that play it, in order of preference. The first one present in
#: the tokenizer (as a registered special token) wins.
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "bos": ("<bos>", "<s>", "[BOS]", "<|startoftext|>", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": ("<eos>", "</s>", "[EOS]", "<|endoftext|>", "<|end_of_text|>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
}

#: Default vocabulary size for the learned kinds ("char" keeps every character by default).
DEFAULT_VOCAB_SIZE = 8000

# One match per character, newlines included ("." would skip "\n").
_ONE_CHARACTER = Regex(r"[\s\S]")


def learn_vocabulary(texts: Iterable[str], kind: str, vocab_size: int | None,
                     specials: list[str], min_frequency: int,
                     lowercase: bool) -> BackendTokenizer:
    """A backend tokenizer of `kind` trained on `texts` (see `Tokenizer.train` for the rest)."""
    corpus = _Texts(texts)
    if kind == "char":
        backend = _train_char(corpus, vocab_size, specials, min_frequency)
    elif kind == "bpe":
        backend = _train_bpe(corpus, vocab_size or DEFAULT_VOCAB_SIZE, specials, min_frequency)
    else:
        backend = _train_wordpiece(corpus, vocab_size or DEFAULT_VOCAB_SIZE, specials,
                                   min_frequency, lowercase)
    if corpus.characters_seen == 0:
        raise TokenizerError("cannot train a tokenizer on an empty corpus")
    return backend


# ---------------------------------------------------------------------- the training texts


class _Texts:
    """The training texts, checked as they are read; counts their characters so that training
    on nothing can be reported."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = [texts] if isinstance(texts, str) else texts
        self.characters_seen = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if not isinstance(text, str):
                hint = " (read files with qkv.data.text_chunks)" if isinstance(
                    text, os.PathLike) else ""
                raise InputError(f"training data must be strings of text, got "
                                 f"{type(text).__name__}{hint}")
            self.characters_seen += len(text)
            if text:
                yield text


# ---------------------------------------------------------------------- the three trainers


def _train_char(
    corpus: _Texts, vocab_size: int | None, specials: list[str], min_frequency: int
) -> BackendTokenizer:
    """Character level: count characters, keep them (the most frequent if capped), sort."""
    counts: Counter[str] = Counter()
    for chunk in corpus:
        counts.update(chunk)
    for token in specials:
        counts.pop(token, None)  # a one-character special token keeps its special id
    kept = [char for char, count in counts.items() if count >= min_frequency]
    if vocab_size is not None and len(kept) > vocab_size - len(specials):
        # Most frequent first, ties broken by the character itself so the result is deterministic.
        kept.sort(key=lambda char: (-counts[char], char))
        kept = kept[: vocab_size - len(specials)]
    vocab = {token: index for index, token in enumerate(specials)}
    for char in sorted(kept):
        vocab[char] = len(vocab)

    unk = first_present(ROLE_NAMES["unk"], specials) or "<unk>"
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Split(_ONE_CHARACTER, behavior="isolated")
    backend.decoder = decoders.Fuse()  # join the characters back with nothing in between
    backend.add_special_tokens(specials)
    return backend


def _train_bpe(
    corpus: _Texts, vocab_size: int, specials: list[str], min_frequency: int
) -> BackendTokenizer:
    """Byte-level BPE (GPT-2): bytes are the alphabet, frequent pairs are merged into tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small for byte-level BPE, which needs at least "
            f"{len(alphabet) + len(specials)} tokens (256 bytes plus the special tokens)"
        )
    backend = BackendTokenizer(models.BPE())
    # add_prefix_space=False keeps decoding exact: no space is invented before the first word.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,  # all 256 bytes, even unseen ones: any text can be encoded
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return backend


def _train_wordpiece(
    corpus: _Texts, vocab_size: int, specials: list[str], min_frequency: int, lowercase: bool
) -> BackendTokenizer:
    """WordPiece with BERT's normaliser, pre-tokenizer, post-processor and decoder."""
    unk = first_present(ROLE_NAMES["unk"], specials) or "[UNK]"
    backend = BackendTokenizer(models.WordPiece(unk_token=unk, max_input_chars_per_word=100))
    use_bert_pipeline(backend, lowercase=lowercase, strip_accents=None)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    use_bert_post_processor(backend)
    return backend


def use_bert_pipeline(
    backend: BackendTokenizer,
    lowercase: bool,
    strip_accents: bool | None,
    handle_chinese_chars: bool = True,
) -> None:
    """BERT's text clean-up, word splitting and ``##`` decoding, shared by train and load."""
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,  # drop control characters, turn all whitespace into " "
        handle_chinese_chars=handle_chinese_chars,  # each CJK ideograph becomes its own word
        strip_accents=strip_accents,  # None: strip accents exactly when lowercasing
        lowercase=lowercase,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on spaces and punctuation
    backend.decoder = decoders.WordPiece(prefix="##")


def use_bert_post_processor(backend: BackendTokenizer) -> None:
    """Wrap inputs as ``[CLS] A [SEP]`` and pairs as ``[CLS] A [SEP] B [SEP]`` (B has type 1)."""
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        return  # custom special tokens without BERT's markers: nothing to wrap with
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def first_present(names: Iterable[str], available: Sequence[str]) -> str | None:
    for name in names:
        if name in available:
            return name
    return None
