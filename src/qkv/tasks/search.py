"""Semantic search: find the passages whose meaning is closest to a query.

    passages --encoder--> unit vectors E (N, d)         built once, saved as an index on disk
    query    --encoder--> unit vector  q (d,)
    scores = E @ q  (N,)   cosine similarities; the top k are the answer

A sentence encoder such as all-MiniLM-L6-v2 was trained so that texts with similar meaning get
vectors pointing the same way, whatever words they use: "a dog running on the beach" finds
"A brown dog runs along the shore". With unit vectors the cosine similarity is a plain dot
product, so exact search over the whole index is one matrix product; that is fast for up to
millions of passages on a CPU.

An index directory:
    embeddings.safetensors   "embeddings": the matrix E, (count, dims), fp32 or fp16, rows of
                             length 1; "probe": the vector of a fixed sentence (fp32), by which
                             the index recognises the model that made it
    passages.jsonl           one JSON line per row: {"id", "text", "source", "line"}
    index.json               model name/path, dims, normalize, count, dtype, qkv version
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._version import __version__
from ..batching import model_device
from ..embeddings import encode_sentences
from ..errors import CheckpointError, InputError
from ..hardware import resolve_precision
from ..io import (
    CONFIG,
    atomic_write_safetensors,
    atomic_write_text,
    read_json_object,
    read_jsonl_objects,
    read_safetensors,
    storage_errors,
)

if TYPE_CHECKING:
    from ..model import Transformer
    from ..tokenizer import Tokenizer

DEFAULT_MODEL = "all-MiniLM-L6-v2"
FORMAT = "qkv-search-index"
EMBEDDINGS, PASSAGES, INFO = "embeddings.safetensors", "passages.jsonl", "index.json"
TEXT_SUFFIXES = (".txt", ".md")
#: Embedded with the index's model when it is built, and again with the model of every query:
#: if the two vectors differ, the query vectors would live in another space than the index.
PROBE_TEXT = "A probe sentence that tells which model made an embedding."
PROBE_MIN_COSINE = 0.98


def embed_texts(model: Transformer, tokenizer: Tokenizer, texts: Sequence[str],
                batch_size: int = 64, precision: str = "auto",
                progress: bool = False) -> torch.Tensor:
    """Unit-length sentence vectors (N, d_model), float32, in the order of `texts`."""

    return encode_sentences(model, tokenizer, list(texts), batch_size=batch_size,
                            precision=resolve_precision(precision, model_device(model)),
                            normalize=True, progress=progress)


# ---------------------------------------------------------------------------- the corpus


def read_corpus(path: str | Path, passage_words: int = 120) -> list[dict[str, Any]]:
    """Passages {"text", "source", "line"} from a text file or a folder of .txt/.md files.

    A file: one passage per non-empty line (line numbers from 1). A folder: every .txt and .md
    file below it (in sorted order) is cut into paragraphs at blank lines; consecutive
    paragraphs are joined while the passage stays within `passage_words` words, and a longer
    paragraph is cut into pieces of `passage_words` words. "line" is where a passage starts.
    """
    path = Path(path)
    if passage_words < 1:
        raise InputError(f"passage-words must be at least 1, got {passage_words}")
    if path.is_file():
        passages = [{"text": line.strip(), "source": path.name, "line": i + 1}
                    for i, line in enumerate(_read_text(path).split("\n")) if line.strip()]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise InputError(f"folder {path} has no .txt or .md files")
        passages = []
        for file in files:
            source = file.relative_to(path).as_posix()
            passages += _paragraph_passages(_read_text(file), source, passage_words)
    else:
        raise InputError(f"corpus {path} does not exist")
    if not passages:
        raise InputError(f"corpus {path} has no text")
    return passages


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path} is not valid UTF-8 text (line {line})") from None


def _paragraph_passages(text: str, source: str, limit: int) -> list[dict[str, Any]]:
    # 1. paragraphs: runs of non-blank lines, each with the line it starts on
    paragraphs: list[tuple[int, list[str]]] = []
    current: list[str] = []
    start = 0
    for i, line in enumerate(text.split("\n")):
        if line.strip():
            if not current:
                start = i + 1
            current += line.split()
        elif current:
            paragraphs.append((start, current))
            current = []
    if current:
        paragraphs.append((start, current))
    # 2. passages: join short paragraphs, cut long ones
    passages: list[dict[str, Any]] = []
    words: list[str] = []
    first = 0
    for start, para in paragraphs:
        if words and len(words) + len(para) > limit:
            passages.append({"text": " ".join(words), "source": source, "line": first})
            words = []
        if not words:
            first = start
        words += para
        while len(words) > limit:
            passages.append({"text": " ".join(words[:limit]), "source": source, "line": first})
            words = words[limit:]
    if words:
        passages.append({"text": " ".join(words), "source": source, "line": first})
    return passages


# ---------------------------------------------------------------------------- the index


def check_index_target(path: str | Path) -> Path:
    """InputError unless an index may be written to `path`: a folder (or nothing) that does not
    hold a model."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a directory")
    if (path / CONFIG).is_file():
        raise InputError(f"{path} holds a model (it has {CONFIG}); write the index to "
                         "another directory")
    return path


@dataclass
class SearchIndex:
    """Passage vectors (count, dims) with their passages and a description of the model."""

    embeddings: torch.Tensor
    passages: list[dict[str, Any]]
    info: dict[str, Any]
    probe: torch.Tensor | None = None  # (dims,) the model's vector for PROBE_TEXT

    def __len__(self) -> int:
        return len(self.passages)

    def save(self, path: str | Path, dtype: str = "fp32") -> Path:
        """Write the index directory (atomically, file by file). dtype "fp16" halves its size."""

        if dtype not in ("fp32", "fp16"):
            raise InputError(f"index dtype {dtype!r} is not one of fp32, fp16")
        path = check_index_target(path)
        with storage_errors(path):
            path.mkdir(parents=True, exist_ok=True)
        matrix = self.embeddings.to(torch.float16 if dtype == "fp16" else torch.float32)
        tensors = {"embeddings": matrix.contiguous()}
        if self.probe is not None:
            tensors["probe"] = self.probe.float().contiguous()
        atomic_write_safetensors(path / EMBEDDINGS, tensors)
        lines = "".join(json.dumps({"id": i, **p}, ensure_ascii=False) + "\n"
                        for i, p in enumerate(self.passages))
        atomic_write_text(path / PASSAGES, lines)
        info = {**self.info, "format": FORMAT, "count": len(self), "dtype": dtype,
                "dims": int(self.embeddings.shape[1]), "qkv_version": __version__}
        atomic_write_text(path / INFO, json.dumps(info, indent=2) + "\n")
        self.info = info
        return path

    @classmethod
    def load(cls, path: str | Path) -> SearchIndex:
        """Read an index directory written by :meth:`save` (vectors come back as fp32)."""
        path = Path(path)
        if not (path / INFO).is_file():
            raise InputError(f"{path} is not a search index (no {INFO}); build one with "
                             "`qkv embed`")
        info = read_json_object(path / INFO)
        if info.get("format") != FORMAT:
            raise CheckpointError(f"{path / INFO} is not a qkv search index")
        passages = read_jsonl_objects(path / PASSAGES)
        for n, row in enumerate(passages, 1):
            if not isinstance(row.get("text"), str):
                raise CheckpointError(f"{path / PASSAGES}, line {n}: a passage needs a \"text\" "
                                      "string; rebuild the index with `qkv embed`")
        tensors = read_safetensors(path / EMBEDDINGS)
        if "embeddings" not in tensors:
            raise CheckpointError(f"{path / EMBEDDINGS} holds no \"embeddings\" tensor")
        matrix = tensors["embeddings"].float()
        if matrix.dim() != 2 or matrix.shape[0] != len(passages) or matrix.shape[0] != info.get(
                "count"):
            raise CheckpointError(f"the index in {path} is inconsistent: {matrix.shape[0]} "
                                  f"vectors, {len(passages)} passages, count {info.get('count')}")
        probe = tensors.get("probe")
        if probe is not None and probe.shape != (matrix.shape[1],):
            raise CheckpointError(f"{path / EMBEDDINGS}: the probe vector has shape "
                                  f"{list(probe.shape)}, not [{matrix.shape[1]}]")
        for p in passages:
            p.pop("id", None)
        return cls(matrix, passages, info, probe)

    def check_model(self, model: Transformer, tokenizer: Tokenizer,
                    model_name: str | None = None) -> None:
        """Raise InputError unless `model` embeds like the model the index was built with."""
        built_with = self.info.get("model", "another model")
        dims = self.embeddings.shape[1]
        if model.config.d_model != dims:
            raise InputError(f"this index was built with {built_with} ({dims} dimensions); "
                             f"{model_name or 'the query model'} gives {model.config.d_model}; "
                             "query with the same model or rebuild the index")
        if self.probe is None:
            return
        vector = embed_texts(model, tokenizer, [PROBE_TEXT], precision="fp32")[0]
        cosine = float(vector @ self.probe)
        if cosine < PROBE_MIN_COSINE:
            raise InputError(f"this index was built with {built_with}, and "
                             f"{model_name or 'the query model'} embeds text differently "
                             f"(probe similarity {cosine:.2f}); query with {built_with} or "
                             "rebuild the index")

    def search(self, query_vectors: torch.Tensor, top_k: int = 3) -> list[list[dict[str, Any]]]:
        """The `top_k` passages per query vector (Q, d), best first: {"score", "rank", ...}."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top-k must be a whole number of at least 1, got {top_k!r}")
        dims = self.embeddings.shape[1]
        if not isinstance(query_vectors, torch.Tensor) or query_vectors.dim() != 2 or \
                query_vectors.shape[1] != dims:
            shape = list(query_vectors.shape) if isinstance(query_vectors, torch.Tensor) else \
                type(query_vectors).__name__
            raise InputError(f"query vectors must be a (queries, {dims}) tensor for this index, "
                             f"got {shape}")
        q = torch.nn.functional.normalize(query_vectors.float(), dim=-1)  # (Q, d)
        scores = q @ self.embeddings.T  # (Q, N): cosine similarity of every pair
        best, rows = scores.topk(min(top_k, len(self)), dim=-1)  # (Q, k)
        return [[{"rank": r + 1, "score": float(s), "id": int(i), **self.passages[int(i)]}
                 for r, (s, i) in enumerate(zip(bs.tolist(), rs.tolist(), strict=True))]
                for bs, rs in zip(best, rows, strict=True)]


def build_index(model: Transformer, tokenizer: Tokenizer,
                passages: Sequence[dict[str, Any]] | Sequence[str], model_name: str = "",
                batch_size: int = 64, precision: str = "auto",
                progress: bool = False) -> SearchIndex:
    """Embed every passage (dicts with "text", or plain strings) into a :class:`SearchIndex`."""
    if len(passages) == 0:
        raise InputError("there are no passages to index")
    items = [p if isinstance(p, dict) else {"text": p} for p in passages]
    for p in items:
        if not isinstance(p.get("text"), str):
            raise InputError("every passage needs a text string")
    matrix = embed_texts(model, tokenizer, [p["text"] for p in items], batch_size, precision,
                         progress)
    probe = embed_texts(model, tokenizer, [PROBE_TEXT], precision="fp32")[0]
    info = {"model": model_name or "unnamed model", "normalize": True,
            "pooling": model.config.pooling, "precision": resolve_precision(precision),
            "probe_text": PROBE_TEXT}
    return SearchIndex(matrix, list(items), info, probe)


def query_index(index: SearchIndex, model: Transformer, tokenizer: Tokenizer,
                queries: Sequence[str], top_k: int = 3, model_name: str | None = None,
                check: bool = True) -> list[list[dict[str, Any]]]:
    """Search `index` for each query text; checks first that `model` is the index's model."""
    if isinstance(queries, str):
        queries = [queries]
    if len(queries) == 0:
        raise InputError("no query to search for")
    if check:
        index.check_model(model, tokenizer, model_name)
    vectors = embed_texts(model, tokenizer, queries, precision=index.info.get("precision",
                                                                              "auto"))
    return index.search(vectors, top_k)
