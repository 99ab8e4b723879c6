"""Where PyTorch's fused (flash) attention starts beating the plain "math" kernel when training
in bf16 on this CPU: forward + backward of causal attention, both kernels timed alternately,
over a range of sequence lengths: the check for `qkv.hardware.FUSED_ATTENTION_FROM`.

    python benchmarks/attention_kernels.py                      # batch 8, 12 heads, d_head 64
    python benchmarks/attention_kernels.py --lengths 64 128 256 --heads 4 --d-head 32

Prints, per length, the best time of each kernel, the ratio math / fused, and the kernel that
qkv's training loop picks at that length.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from _common import CPU, race, threads
from torch.nn.attention import SDPBackend, sdpa_kernel

from qkv.hardware import FUSED_ATTENTION_FROM

KERNELS = {"math": SDPBackend.MATH, "fused": SDPBackend.FLASH_ATTENTION}


def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: SDPBackend) -> None:
    """One forward + backward pass of causal attention with `kernel`."""
    for t in (q, k, v):
        t.grad = None
    with sdpa_kernel([kernel]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(torch.ones_like(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 160, 192, 224, 256, 320])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per kernel (7)")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    n = threads(args.threads)
    print(f"causal attention, forward + backward, bf16, {n} threads, batch {args.batch}, "
          f"{args.heads} heads, d_head {args.d_head}; best of {args.rounds} rounds")
    print(f"{'T':>5} {'math ms':>9} {'fused ms':>9} {'math/fused':>11}  qkv picks")
    torch.manual_seed(0)
    for T in args.lengths:
        q, k, v = (torch.randn(args.batch, args.heads, T, args.d_head, device=CPU,
                               dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        # alternated rounds after a warm-up (kernel choice, allocation): a busy moment hits both
        best, _ = race({name: functools.partial(step, q, k, v, kernel)
                        for name, kernel in KERNELS.items()}, args.rounds)
        picks = "fused" if T >= FUSED_ATTENTION_FROM else "math"
        print(f"{T:>5} {1e3 * best['math']:>9.2f} {1e3 * best['fused']:>9.2f} "
              f"{best['math'] / best['fused']:>11.2f}  {picks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
