"""Tokenizers: turning text into integer ids and back.

A Transformer never sees characters. It sees a sequence of integers, the *token ids*, each one an
index into the embedding table. A tokenizer is the two-way map between the two worlds::

    "Olá, mundo!"  --encode-->  [412, 9, 1187, 5]  --decode-->  "Olá, mundo!"

qkv supports three kinds of tokenizer, from simplest to most practical:

``"char"``
    Every distinct character of the training text is one token. The vocabulary is tiny and the
    idea is obvious, but sequences are long. Characters never seen in training become ``<unk>``.
``"bpe"``
    Byte-level Byte-Pair Encoding, as in GPT-2. Text is first turned into UTF-8 bytes, so the
    256 byte values are the starting vocabulary and *any* string can be encoded; training then
    repeatedly merges the most frequent adjacent pair into a new token. Decoding is exact.
``"wordpiece"``
    BERT's scheme. Text is normalised (optionally lowercased and stripped of accents), split on
    whitespace and punctuation, and each word is cut greedily into the longest pieces found in the
    vocabulary; pieces that continue a word start with ``##``. Decoding is *lossy*: the original
    case, accents and spacing cannot be recovered ("Hello,  World" decodes as "hello, world").

:class:`Tokenizer` is a thin, readable wrapper around the Rust-backed
`tokenizers <https://huggingface.co/docs/tokenizers>`_ library; the wrapped
``tokenizers.Tokenizer`` is available as :attr:`Tokenizer.backend`. A trained tokenizer is saved
as a single standard ``tokenizer.json`` that Hugging Face ``transformers`` can read too.

Special tokens
--------------
Special tokens are vocabulary entries with a job rather than a meaning: padding short sequences
(``pad``), standing for unknown text (``unk``), marking the beginning or end of a document
(``bos``, ``eos``), hiding a word for masked language modelling (``mask``), and BERT's sentence
markers (``cls``, ``sep``). qkv does not store which token plays which role anywhere except in the
token strings themselves: on load (and after training) the roles are recognised by name, for
example ``[PAD]`` or ``<pad>`` is the padding token and ``<|endoftext|>`` is both ``bos`` and
``eos``. See :data:`ROLE_NAMES`. Likewise the ``kind`` is read back from the type of the backend
model (BPE, WordPiece, or WordLevel with a one-character splitter for ``"char"``).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tokenizers import (
    Encoding,
    models,
    pre_tokenizers,
)
from tokenizers import Tokenizer as BackendTokenizer

from qkv.batching import pad_id, pad_rows
from qkv.errors import InputError, QkvError, TokenizerError
from qkv.io import atomic_write_text
from qkv.vocabulary import (
    DEFAULT_SPECIAL_TOKENS,
    KINDS,
    ROLE_NAMES,
    Kind,
    first_present,
    learn_vocabulary,
)

if TYPE_CHECKING:
    import torch

class Tokenizer:
    """Text <-> token ids, for one of the kinds ``"char"``, ``"bpe"`` or ``"wordpiece"``.

    Create one with :meth:`train` or :meth:`load`; wrapping an existing ``tokenizers.Tokenizer``
    directly also works (``Tokenizer(backend)``).
    """

    def __init__(self, backend: BackendTokenizer, kind: str | None = None) -> None:
        self.backend = backend
        # Padding and truncation are done per call by encode_batch, never silently by the backend
        # (a tokenizer.json from the Hub may switch on padding to 128 tokens, for example).
        self.backend.no_padding()
        self.backend.no_truncation()
        self._kind = kind if kind is not None else _infer_kind(backend)
        self._special_tokens = _infer_roles(backend)
        self._merges: tuple[dict[tuple[str, str], int], dict[str, int]] | None = None

    # ------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        kind: Kind = "bpe",
        vocab_size: int | None = None,
        special_tokens: Sequence[str] | None = None,
        lowercase: bool = True,
        min_frequency: int | None = None,
    ) -> Tokenizer:
        """Learn a vocabulary from a corpus and return the new tokenizer.

        Args:
            texts: the training text, as any iterable of strings (a list, a generator, or
                ``qkv.data.text_chunks(files)`` to stream files); a single ``str`` is one text.
            kind: ``"char"``, ``"bpe"`` or ``"wordpiece"`` (see the module docstring).
            vocab_size: the largest vocabulary to build, special tokens included. Defaults to
                8000 for bpe and wordpiece, and to "every character" for char (if given for char,
                only the most frequent characters are kept).
            special_tokens: token strings reserved first, at ids 0, 1, 2, ... Defaults to
                :data:`DEFAULT_SPECIAL_TOKENS` for the kind. Roles are recognised by name
                (:data:`ROLE_NAMES`).
            lowercase: wordpiece only: lowercase and strip accents before splitting (like
                ``bert-base-uncased``).
            min_frequency: a merge (bpe, wordpiece) or a character (char) must be seen at least
                this often to enter the vocabulary. Defaults to 2 for bpe/wordpiece, 1 for char.
        """
        if kind not in KINDS:
            raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
        specials = list(DEFAULT_SPECIAL_TOKENS[kind] if special_tokens is None else special_tokens)
        if len(set(specials)) != len(specials):
            raise TokenizerError(f"special_tokens {specials} contains duplicates")
        if vocab_size is not None and vocab_size <= len(specials):
            raise TokenizerError(
                f"vocab_size {vocab_size} leaves no room after the {len(specials)} special tokens"
            )
        if min_frequency is None:
            min_frequency = 1 if kind == "char" else 2

        backend = learn_vocabulary(texts, kind, vocab_size, specials, min_frequency, lowercase)
        return cls(backend, kind=kind)

    # ------------------------------------------------------------------ properties

    @property
    def kind(self) -> str:
        """``"char"``, ``"bpe"`` or ``"wordpiece"`` (``"wordlevel"``/``"unigram"`` if loaded)."""
        return self._kind

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> dict[str, str]:
        """Role -> token string, for the roles this tokenizer has (e.g. ``{"pad": "[PAD]"}``)."""
        return dict(self._special_tokens)

    def _role_id(self, role: str) -> int | None:
        token = self._special_tokens.get(role)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token, or None."""
        return self._role_id("pad")

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown-text token, or None."""
        return self._role_id("unk")

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None."""
        return self._role_id("bos")

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, or None."""
        return self._role_id("eos")

    @property
    def mask_id(self) -> int | None:
        """Id of the mask token (masked language modelling), or None."""
        return self._role_id("mask")

    @property
    def cls_id(self) -> int | None:
        """Id of BERT's ``[CLS]`` (start of input, used for classification), or None."""
        return self._role_id("cls")

    @property
    def sep_id(self) -> int | None:
        """Id of BERT's ``[SEP]`` (end of a segment), or None."""
        return self._role_id("sep")

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of one id, or None if the id is out of range."""
        return self.backend.id_to_token(token_id)

    def get_vocab(self) -> dict[str, int]:
        """The whole vocabulary as token string -> id."""
        return self.backend.get_vocab(with_added_tokens=True)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
            f"special_tokens={self._special_tokens})"
        )

    # ------------------------------------------------------------------ encoding and decoding

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The token strings of ``text`` (handy to see how a text is cut up)."""
        _check_text(text)
        return self._backend_encode(text, None, add_special_tokens).tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text.

        With ``add_special_tokens`` a wordpiece tokenizer wraps the text as ``[CLS] ... [SEP]``.
        char and bpe tokenizers add nothing (the GPT-2 convention): append :attr:`eos_id`
        yourself where a document ends.
        """
        _check_text(text)
        return self._backend_encode(text, None, add_special_tokens).ids

    def encode_pair(
        self, text_a: str, text_b: str, add_special_tokens: bool = True
    ) -> dict[str, list[int]]:
        """Encode two texts as one input, ``[CLS] a [SEP] b [SEP]`` for wordpiece.

        Returns ``{"input_ids": ..., "token_type_ids": ...}``; the token type is 0 for the first
        segment and 1 for the second (BERT's segment embeddings).
        """
        _check_text(text_a)
        _check_text(text_b)
        encoding = self._backend_encode(text_a, text_b, add_special_tokens)
        return {"input_ids": encoding.ids, "token_type_ids": encoding.type_ids}

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of token ids (a list or a 1-D tensor).

        char and bpe decode exactly: ``decode(encode(s)) == s``. wordpiece cannot restore case,
        accents or spacing, because the normaliser and the pre-tokenizer threw them away.
        """
        ids = self._check_ids(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(
        self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        """:meth:`decode` for each row of a batch (a list of lists or a 2-D tensor)."""
        return [self.decode(row, skip_special_tokens) for row in _to_list(batch)]

    def encode_batch(
        self,
        texts: str | Sequence[str],
        padding: bool | Literal["longest", "max_length"] = False,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: Literal["pt"] | None = None,
        padding_side: Literal["right", "left"] = "right",
        text_pairs: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Encode several texts at once, optionally truncated and padded to a rectangle.

        Args:
            texts: the texts (a single ``str`` is a batch of one).
            padding: ``False`` leaves each row its own length; ``True`` or ``"longest"`` pads
                every row to the longest one; ``"max_length"`` pads every row to ``max_length``.
            truncation: cut rows to at most ``max_length`` tokens (special tokens are kept).
            max_length: the length limit for ``truncation`` and ``padding="max_length"``.
            add_special_tokens: as in :meth:`encode`.
            return_tensors: ``None`` for lists of lists, ``"pt"`` for ``torch.long`` tensors of
                shape ``(batch, length)``.
            padding_side: ``"right"`` (usual for training and encoders) or ``"left"`` (needed
                to generate a batch with a decoder, so that every row ends with real text).
            text_pairs: optional second segments, one per text (BERT sentence pairs).

        Returns:
            ``{"input_ids": ..., "attention_mask": ...}``, plus ``"token_type_ids"`` when
            ``text_pairs`` is given. In ``attention_mask`` 1 marks a real token and 0 padding.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for text in texts:
            _check_text(text)
        pairs: list[str | None] = [None] * len(texts)
        if text_pairs is not None:
            pairs = list(text_pairs)
            if len(pairs) != len(texts):
                raise InputError(
                    f"got {len(texts)} texts but {len(pairs)} text_pairs; they must match"
                )
            for text in pairs:
                _check_text(text)
        if padding not in (False, True, "longest", "max_length"):
            raise InputError(
                f"padding must be False, True, 'longest' or 'max_length', not {padding!r}"
            )
        if padding_side not in ("right", "left"):
            raise InputError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
        if return_tensors not in (None, "pt"):
            raise InputError(f"return_tensors must be None or 'pt', not {return_tensors!r}")
        if (truncation or padding == "max_length") and max_length is None:
            raise InputError("truncation and padding='max_length' need max_length to be set")
        if max_length is not None and max_length < 1:
            raise InputError(f"max_length must be a positive number of tokens, not {max_length}")

        limit = max_length if truncation else None
        encodings = [
            self._backend_encode(text, pair, add_special_tokens, limit)
            for text, pair in zip(texts, pairs, strict=True)
        ]
        rows = [encoding.ids for encoding in encodings]
        type_rows = [encoding.type_ids for encoding in encodings]
        masks = [[1] * len(row) for row in rows]

        if padding:
            longest = max((len(row) for row in rows), default=0)
            target = max_length if padding == "max_length" else longest
            assert target is not None
            if longest > target:
                raise InputError(
                    f"a sequence of {longest} tokens is longer than max_length {target}; "
                    "pass truncation=True"
                )
            ids, mask = pad_rows(rows, pad_id(self), padding_side, length=target)  # (B, T)
            types, _ = pad_rows(type_rows, 0, padding_side, length=target)  # (B, T)
            rows, masks, type_rows = ids.tolist(), mask.tolist(), types.tolist()

        batch: dict[str, Any] = {"input_ids": rows, "attention_mask": masks}
        if text_pairs is not None:
            batch["token_type_ids"] = type_rows
        if return_tensors == "pt":
            batch = {name: _to_tensor(value, name) for name, value in batch.items()}
        return batch

    def encode_sampled(self, texts: Sequence[str], dropout: float,
                       rng: random.Random) -> list[list[int]]:
        """BPE-dropout (Provilkov et al. 2020): each text cut into tokens with some merges left
        out at random, so that a word is seen in several segmentations during training.

        Byte-level BPE builds each word by merging adjacent pieces, the earliest-learned merge
        first. Here every merge that could apply is skipped with probability ``dropout`` at each
        step (the best of those kept is applied), so a word sometimes stays in smaller pieces.
        With ``dropout=0`` this gives exactly the ids of :meth:`encode_batch` without special
        tokens. ``rng`` makes the sampling reproducible (an epoch of a run has its own). For
        training only: the model is then evaluated on the usual, deterministic segmentation.
        """
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"BPE-dropout must be in [0, 1), not {dropout}")
        ranks, vocab = self._merge_table()
        normalizer, pre_tokenizer = self.backend.normalizer, self.backend.pre_tokenizer
        out = []
        for text in texts:
            _check_text(text)
            if normalizer is not None:
                text = normalizer.normalize_str(text)
            ids: list[int] = []
            for word, _ in pre_tokenizer.pre_tokenize_str(text):
                pieces = list(word)
                while len(pieces) > 1:
                    best, at = None, -1
                    for i in range(len(pieces) - 1):
                        rank = ranks.get((pieces[i], pieces[i + 1]))
                        # a merge no better than the best kept so far cannot win: no draw
                        if rank is not None and (best is None or rank < best) \
                                and rng.random() >= dropout:
                            best, at = rank, i
                    if best is None:
                        break
                    pieces[at:at + 2] = [pieces[at] + pieces[at + 1]]
                ids.extend(vocab[piece] for piece in pieces)
            out.append(ids)
        return out

    def _merge_table(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        """(rank of each merge, id of each piece) of a byte-level BPE, read once."""
        if self._merges is None:
            model = json.loads(self.backend.to_str())["model"]
            byte_level = isinstance(self.backend.pre_tokenizer, pre_tokenizers.ByteLevel)
            if model.get("type") != "BPE" or not byte_level or model.get(
                    "continuing_subword_prefix") or model.get("end_of_word_suffix"):
                raise TokenizerError("BPE-dropout needs a byte-level BPE tokenizer (kind "
                                     f"'bpe'); this one is {self.kind!r}")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                      for m in model["merges"]]
            self._merges = ({(a, b): i for i, (a, b) in enumerate(merges)}, model["vocab"])
        return self._merges

    def __call__(self, texts: str | Sequence[str], **kwargs: Any) -> dict[str, Any]:
        """Same as :meth:`encode_batch` (a single ``str`` is a batch of one)."""
        return self.encode_batch(texts, **kwargs)

    def _backend_encode(
        self, text: str, pair: str | None, add_special_tokens: bool, max_length: int | None = None
    ) -> Encoding:
        """Run the backend pipeline, truncating the text (never the special tokens) if asked.

        The steps are the backend's own: encode each segment without special tokens, cut the
        segments to fit, then let the post-processor add ``[CLS]``/``[SEP]`` and token types.
        """
        try:
            first = self.backend.encode(text, add_special_tokens=False)
            second = None if pair is None else self.backend.encode(pair, add_special_tokens=False)
        except Exception as error:  # the backend raises a plain Exception
            raise self._encoding_error(text if pair is None else text + pair, error) from error
        if max_length is not None:
            room = max_length
            if add_special_tokens:
                room -= self.backend.num_special_tokens_to_add(pair is not None)
            if room < 0:
                raise InputError(f"max_length {max_length} is too small to hold the special tokens")
            _truncate_longest_first(first, second, room)
        return self.backend.post_process(first, second, add_special_tokens)

    def _encoding_error(self, text: str, error: Exception) -> QkvError:
        """A clear error for text the backend refused (a char tokenizer without ``<unk>``)."""
        vocab = self.backend.get_vocab()
        if self.kind == "char" and self.unk_id is None:
            unknown = next((char for char in text if char not in vocab), None)
            if unknown is not None:
                return InputError(
                    f"character {unknown!r} is not in the vocabulary of this char tokenizer, "
                    "which has no <unk> token"
                )
        return TokenizerError(f"the tokenizer could not encode {text[:40]!r} ({error})")

    def _check_ids(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        ids = _to_list(ids)
        size = self.vocab_size
        for token_id in ids:
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                raise InputError(f"token ids must be integers, got {token_id!r}")
            if not 0 <= token_id < size:
                raise InputError(
                    f"token id {token_id} is out of range for a vocabulary of {size} tokens"
                )
        return ids

    # ------------------------------------------------------------------ saving and loading

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the tokenizer as ``tokenizer.json`` and return the file's path.

        ``path`` may be a ``.json`` file name or a directory (created if needed), in which case
        the file is ``path/tokenizer.json``. The write is atomic: a crash leaves either the old
        file or the new one, never half a file.
        """
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.backend.to_str(pretty=True))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a ``tokenizer.json`` file, or the one in a model directory.

        That is qkv's own format and the Hugging Face "fast tokenizer" format. Hugging Face
        directories with only BERT's ``vocab.txt`` or GPT-2's ``vocab.json`` + ``merges.txt``
        are read by :func:`qkv.hf.tokenizer.load_tokenizer` (and by ``qkv.load``).
        """
        path = Path(path)
        if not path.exists():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        if path.is_dir():
            if not (path / "tokenizer.json").is_file():
                raise TokenizerError(
                    f"directory {path} has no tokenizer.json (a Hugging Face vocab.txt or "
                    "vocab.json is read by qkv.hf.tokenizer.load_tokenizer)")
            path = path / "tokenizer.json"
        return cls(_read_tokenizer_json(path))


# ---------------------------------------------------------------------- loading helpers


def _read_tokenizer_json(path: Path) -> BackendTokenizer:
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)  # a clearer message for broken JSON than the backend's
        return BackendTokenizer.from_str(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path} is not a valid tokenizer.json ({error})") from error
    except OSError as error:
        raise TokenizerError(f"tokenizer file {path} cannot be read ({error.strerror})") from error
    except Exception as error:  # the backend reports a bad structure as a plain Exception
        raise TokenizerError(f"{path} is not a valid tokenizer.json ({error})") from error


# ---------------------------------------------------------------------- inference of kind and roles


def _infer_kind(backend: BackendTokenizer) -> str:
    """Read the kind back from the backend's model type (nothing else is stored)."""
    model = backend.model
    if isinstance(model, models.BPE):
        return "bpe"
    if isinstance(model, models.WordPiece):
        return "wordpiece"
    if isinstance(model, models.WordLevel):
        # qkv's char tokenizers are word-level models over one-character "words".
        return "char" if isinstance(backend.pre_tokenizer, pre_tokenizers.Split) else "wordlevel"
    return type(model).__name__.lower()


def _infer_roles(backend: BackendTokenizer) -> dict[str, str]:
    """Role -> token, recognising registered special tokens by name (see ROLE_NAMES)."""
    specials = [
        token.content for token in backend.get_added_tokens_decoder().values() if token.special
    ]
    roles: dict[str, str] = {}
    for role, names in ROLE_NAMES.items():
        token = first_present(names, specials)
        if token is not None:
            roles[role] = token
    return roles


# ---------------------------------------------------------------------- small helpers


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise InputError(f"text to encode must be a str, got {type(text).__name__}")


def _to_list(values: Any) -> list[Any]:
    """A tensor or any sequence as a plain Python list."""
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


def _truncate_longest_first(first: Encoding, second: Encoding | None, room: int) -> None:
    """Cut one segment, or two (always the longer one first), to ``room`` tokens in total."""
    length_a = len(first.ids)
    length_b = 0 if second is None else len(second.ids)
    while length_a + length_b > room:
        if length_a >= length_b:
            length_a -= 1
        else:
            length_b -= 1
    first.truncate(length_a)
    if second is not None:
        second.truncate(length_b)


def _to_tensor(rows: list[list[int]], name: str) -> torch.Tensor:
    import torch

    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise InputError(
            f"cannot make a tensor of {name} with rows of different lengths; pass padding=True"
        )
    if not rows:
        return torch.zeros((0, 0), dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)
