"""Hugging Face tokenizer folders in qkv.

A Hugging Face model folder holds its tokenizer in one of three ways; `load_tokenizer` reads each
as a qkv `Tokenizer`:

- ``tokenizer.json``: the "fast tokenizer" file, which is also qkv's own format;
- BERT's ``vocab.txt`` (one token per line, the line number is its id), with
  ``tokenizer_config.json`` for ``do_lower_case``: rebuilt as WordPiece with BERT's pipeline;
- GPT-2's ``vocab.json`` and ``merges.txt``: rebuilt as byte-level BPE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ..errors import TokenizerError
from ..tokenizer import Tokenizer
from ..vocabulary import (
    DEFAULT_SPECIAL_TOKENS,
    ROLE_NAMES,
    use_bert_pipeline,
    use_bert_post_processor,
)

#: The files that hold a tokenizer in a Hugging Face folder, in the order they are tried.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face folder (or a tokenizer.json file)."""
    path = Path(path)
    if path.is_file() or (path / "tokenizer.json").is_file():
        return Tokenizer.load(path)
    if (path / "vocab.txt").is_file():
        return Tokenizer(_bert_from_vocab_txt(path), kind="wordpiece")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return Tokenizer(_gpt2_from_vocab_and_merges(path), kind="bpe")
    if not path.exists():
        raise TokenizerError(f"tokenizer folder {path} does not exist")
    raise TokenizerError(
        f"directory {path} has no tokenizer.json, vocab.txt, or vocab.json with merges.txt")


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return value


def _bert_from_vocab_txt(directory: Path) -> BackendTokenizer:
    """Rebuild a BERT tokenizer from ``vocab.txt`` (one token per line, the line number is id)."""
    vocab_path = directory / "vocab.txt"
    try:
        text = vocab_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TokenizerError(f"file {vocab_path} is not valid UTF-8 text") from error
    # Split on "\n" only: a vocabulary may contain exotic line-separator characters as tokens.
    lines = text.removesuffix("\n").split("\n") if text else []
    vocab = {line.removesuffix("\r"): index for index, line in enumerate(lines)}
    if not vocab:
        raise TokenizerError(f"vocabulary file {vocab_path} is empty")

    config: dict[str, Any] = {}
    if (directory / "tokenizer_config.json").is_file():
        config = _read_json_object(directory / "tokenizer_config.json")
    lowercase = bool(config.get("do_lower_case", True))  # BertTokenizer's default
    unk = config.get("unk_token", "[UNK]")
    if not isinstance(unk, str):  # newer configs may store an AddedToken-like object
        unk = unk.get("content", "[UNK]")
    backend = BackendTokenizer(
        models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100)
    )
    use_bert_pipeline(
        backend,
        lowercase=lowercase,
        strip_accents=config.get("strip_accents"),
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
    )
    present = [token for token in DEFAULT_SPECIAL_TOKENS["wordpiece"] if token in vocab]
    backend.add_special_tokens(present)
    use_bert_post_processor(backend)
    return backend


def _gpt2_from_vocab_and_merges(directory: Path) -> BackendTokenizer:
    """Rebuild a GPT-2 style byte-level BPE tokenizer from ``vocab.json`` and ``merges.txt``."""
    vocab = _read_json_object(directory / "vocab.json")
    try:
        backend = BackendTokenizer(
            models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
        )
    except Exception as error:
        raise TokenizerError(
            f"{directory} has an unreadable vocab.json or merges.txt ({error})"
        ) from error
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [
        token
        for token in vocab
        if token in {name for names in ROLE_NAMES.values() for name in names}
    ]
    backend.add_special_tokens(specials)
    return backend
