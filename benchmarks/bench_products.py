"""Decoding's matrix products alone: how fast each kernel reads GPT-2 124M's weights.

A decoding step multiplies every weight matrix by a few rows (one per sequence), so its speed is
the speed at which a kernel streams the weights from memory. This script takes the 49 weight
matrices one GPT-2 124M step reads (12 layers x 4 linear layers, plus the 50,257-row output
layer), each its own tensor so that no matrix sits in the cache from the call before, and
multiplies all of them by 1 and by 8 rows, the way each contender does it:

  nn.Linear          `F.linear` with bf16 weights: what a model with bf16 weights runs,
                     Hugging Face's included (its GPT-2 `Conv1D` calls `addmm`, the same kernel)
  packed (qkv)       `qkv.quantize.PackedLinear`: the weight laid out once in oneDNN's blocked
                     layout (what `qkv generate --dtype bf16`, `qkv serve` and `encode_sentences`
                     run)
  torch.mv           the matrix-vector kernel (1 row only), qkv's bf16 decoding path before
                     the packed one
  int8 (qkv)         `qkv.quantize.Int8Linear`, inputs rounded on one range per batch: FBGEMM
                     at 1 row, oneDNN's int8 kernel at 8 (`quantize.ONEDNN_FROM_ROWS`)
  int8-rows (qkv)    the same with each input row rounded on its own range (`qkv serve --dtype
                     int8`)

Printed: milliseconds for the 49 products, the weight bytes read per second, and that over the
measured copy bandwidth (`_common.copy_bandwidth`, bytes read + written). Best of --rounds
rounds, the contenders interleaved.

    python benchmarks/bench_products.py            # about 30 seconds
    python benchmarks/bench_products.py --rounds 10 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from _common import copy_bandwidth, threads
from torch.nn import functional as F

import qkv
from qkv.quantize import Int8Linear, PackedLinear

warnings.filterwarnings("ignore", message=".*quantiz")  # torch's notes on its quantized APIs


def gpt2_linears(dtype: torch.dtype) -> list[torch.nn.Linear]:
    """The 49 linear layers of one GPT-2 124M decoding step, random weights, in `dtype`."""
    cfg = qkv.presets.get("gpt2-124m")
    d, ff = cfg.d_model, cfg.d_ff
    shapes = [(d, 3 * d), (d, d), (d, ff), (ff, d)] * cfg.n_layers + [(d, cfg.vocab_size)]
    return [torch.nn.Linear(i, o, bias=o != cfg.vocab_size).to(dtype) for i, o in shapes]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: one per idle CPU)")
    args = parser.parse_args()
    n_threads = threads(args.threads)
    bandwidth = copy_bandwidth()
    torch.manual_seed(0)
    bf16 = gpt2_linears(torch.bfloat16)
    packed = [PackedLinear(layer) for layer in bf16]
    int8 = [Int8Linear.from_linear(layer.float()) for layer in gpt2_linears(torch.float32)]
    rows8 = [Int8Linear(m.dequantized(), m.bias, activations="int8-rows") for m in int8]
    bf16_bytes = sum(m.weight.nbytes for m in bf16)
    int8_bytes = sum(m.qweight.nbytes + m.scale.nbytes for m in int8)
    print(f"GPT-2 124M's 49 decoding products, {bf16_bytes / 1e6:.0f} MB of bf16 weights "
          f"({int8_bytes / 1e6:.0f} MB int8); copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"{n_threads} threads; best of {args.rounds} rounds", flush=True)
    layers = {"bf16": bf16, "packed": packed, "int8": int8, "int8-rows": rows8}
    for rows in (1, 8):
        runs = contenders(rows, layers, bf16_bytes, int8_bytes)
        best = race(runs, args.rounds)
        print(f"{rows} row(s):")
        base = best["nn.Linear bf16"]
        for name, seconds in best.items():
            rate = runs[name][1] / seconds
            print(f"  {name:20s} {seconds * 1e3:6.1f} ms  {rate / 1e9:5.1f} GB/s of weights = "
                  f"{rate / bandwidth:4.0%} of copy b/w   {base / seconds:4.2f}x nn.Linear bf16",
                  flush=True)
    return 0


def contenders(rows: int, layers: dict[str, list], bf16_bytes: int,
               int8_bytes: int) -> dict[str, tuple]:
    """name -> (one call: all 49 products of `rows` rows, weight bytes it reads)."""
    bf16 = layers["bf16"]
    x16 = {m.in_features: torch.randn(rows, m.in_features).to(torch.bfloat16) for m in bf16}
    x32 = {k: v.float() for k, v in x16.items()}
    runs = {
        "nn.Linear bf16": (lambda: [F.linear(x16[m.in_features], m.weight, m.bias)
                                    for m in bf16], bf16_bytes),
        "packed bf16 (qkv)": (lambda: [m(x16[m.in_features]) for m in layers["packed"]],
                              bf16_bytes),
        "int8 (qkv)": (lambda: [m(x32[m.in_features]) for m in layers["int8"]], int8_bytes),
        "int8-rows (qkv)": (lambda: [m(x32[m.in_features]) for m in layers["int8-rows"]],
                            int8_bytes),
    }
    if rows == 1:
        runs["torch.mv bf16"] = (lambda: [torch.mv(m.weight, x16[m.in_features][0])
                                          for m in bf16], bf16_bytes)
    return runs


@torch.inference_mode()
def race(runs: dict, rounds: int) -> dict[str, float]:
    """Best seconds of one call of each run, the runs interleaved, after one warm-up call."""
    for fn, _ in runs.values():
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, (fn, _) in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


if __name__ == "__main__":
    sys.exit(main())
