"""Where the time of one qkv training step goes: torch.profiler over the GPT-2 124M step of
bench_train.py (batch 4 x 256, bf16 autocast where the CPU has it, fused AdamW, clipping).

    python benchmarks/profile_step.py                 # GPT-2 124M (about a minute)
    python benchmarks/profile_step.py --shape baby    # nanoGPT's baby shape

Prints the step time, tokens/s, the fraction of the bf16 matmul ceiling, then the operators by
self CPU time (docs/performance.md reads this table).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import CPU, matmul_ceiling, resolve_precision, threads
from bench_train import SHAPES, flops_per_token, qkv_step
from torch.profiler import ProfilerActivity, profile

import qkv


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=25, help="operators shown (25)")
    args = p.parse_args()
    n_threads = threads(args.threads)
    precision = resolve_precision(args.precision, CPU)
    overrides, B, T, _ = SHAPES[args.shape]
    cfg = qkv.presets.get("gpt2-124m", **overrides)
    torch.manual_seed(0)
    step = qkv_step(cfg, torch.randint(0, cfg.vocab_size, (B, T + 1)), precision)
    for _ in range(2):  # allocation, kernel choice, weight packing
        step()
    best = min(_timed(step) for _ in range(3))
    per_s = B * T / best
    fraction = per_s * flops_per_token(cfg, T) / matmul_ceiling()
    print(f"{args.shape}, {precision}, {n_threads} threads: {best:.3f} s per step, "
          f"{per_s:,.0f} tokens/s, {100 * fraction:.1f}% of the bf16 matmul ceiling")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40,
        max_shapes_column_width=60))
    return 0


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
