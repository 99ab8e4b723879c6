"""Training throughput on one process against several (torchrun, DDP), and GPU MFU.

  cpu   `qkv train` on the bundled tiny Shakespeare, nanoGPT's "baby GPT" shape (4 layers,
        4 heads, d=128, context 64, global batch 32, fp32), three ways on this machine's cores:
          1 process x 1 thread      1 process x N threads      N processes x 1 thread (DDP)
        Each run is a real `python -m qkv train` (the N processes through torchrun); tokens/s is
        the median of the log lines after the first quarter of the updates (warm-up). The
        global batch is the same, so all three compute the same updates.
  gpu   (only where CUDA is present) GPT-2 124M, bf16 autocast, batch 8 x 1024, fused AdamW: the
        model FLOPs utilisation (MFU; Chowdhery et al. 2022, PaLM, appendix B) of one training
        step, with and without torch.compile:
            MFU = tokens/s x (6 N + 12 L d T) / peak FLOP/s      (N parameters, L layers,
                                                                 width d, context T)
        --peak-tflops sets the peak (default 989: an H100 SXM's dense bf16).

    python benchmarks/bench_distributed.py            # cpu (and gpu where there is one)
    python benchmarks/bench_distributed.py --quick    # a smoke run (well under a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SRC = Path(__file__).resolve().parents[1] / "src"


def qkv_train(out: Path, steps: int, nproc: int, threads: int, batch: int) -> float:
    """tokens/s of one `qkv train` run (median of the log lines past the warm-up)."""
    args = ["train", "--preset", "gpt-char-tiny", "--n-layers", "4", "--d-model", "128",
            "--n-heads", "4", "--context", "64", "--batch-size", str(batch),
            "--max-steps", str(steps), "--eval-every", str(steps), "--eval-windows", "32",
            "--log-every", "1", "--precision", "fp32", "--device", "cpu", "--dropout", "0",
            "--threads", str(threads), "--no-progress", "--sample-tokens", "0",
            "--out", str(out), "--cache-dir", str(out.parent / "cache")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", "-m", "qkv"] if nproc > 1 else \
        [sys.executable, "-m", "qkv"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(threads)}
    subprocess.run(launcher + args, env=env, check=True, stdout=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in lines if r["step"] > steps // 4]
    return statistics.median(speeds)


def cpu(quick: bool) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = max(2, cores or 2)
    steps, batch = (8, 8) if quick else (60, 32)
    print(f"cpu: {cores} cores, torch {torch.__version__}, baby GPT, global batch {batch} x 64 "
          f"tokens, {steps} updates per run")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("1 process x 1 thread", 1, 1), (f"1 process x {n} threads", 1, n),
                (f"{n} processes x 1 thread (DDP, gloo)", n, 1)]
        for name, nproc, threads in rows:
            t0 = time.perf_counter()
            speed = qkv_train(Path(tmp) / name.replace(" ", "_"), steps, nproc, threads, batch)
            print(f"  {name:<38} {speed:>10,.0f} tokens/s   ({time.perf_counter() - t0:.0f} s "
                  "wall, start-up included)")


def gpu_speed(cfg: Any, batch: int, T: int, steps: int, compiled: bool) -> float:
    """tokens/s of GPT-2 training steps in bf16 on the GPU (after 3 warm-up steps)."""
    from qkv import Transformer
    from qkv.train import make_optimizer, next_token_loss

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    optimizer = make_optimizer(model, 6e-4, 0.1, fused=True)
    loss_fn = torch.compile(next_token_loss) if compiled else next_token_loss
    x = torch.randint(0, cfg.vocab_size, (batch, T + 1), device=device)
    for i in range(3 + steps):
        if i == 3:  # after the warm-up (and compilation)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return steps * batch * T / (time.perf_counter() - t0)


def gpu(quick: bool, peak_tflops: float) -> None:
    from qkv import ModelConfig, Transformer

    cfg = ModelConfig(family="decoder", vocab_size=50304, d_model=768, n_layers=12, n_heads=12,
                      max_seq_len=1024, dropout=0.0)
    batch, T = (2, 256) if quick else (8, 1024)
    steps = 3 if quick else 20
    n = sum(p.numel() for p in Transformer(cfg).parameters())  # tied weights counted once
    flops_per_token = 6 * n + 12 * cfg.n_layers * cfg.d_model * T
    print(f"gpu: {torch.cuda.get_device_name()}, GPT-2 124M ({n / 1e6:.0f}M parameters), bf16, "
          f"batch {batch} x {T}, peak {peak_tflops} TFLOP/s")
    for compiled in (False, True):
        tokens_s = gpu_speed(cfg, batch, T, steps, compiled)
        mfu = tokens_s * flops_per_token / (peak_tflops * 1e12)
        print(f"  {'torch.compile' if compiled else 'eager':<14} {tokens_s:>12,.0f} tokens/s "
              f"  MFU {100 * mfu:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--only", choices=("cpu", "gpu"))
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    if args.only in (None, "cpu"):
        cpu(args.quick)
    if args.only in (None, "gpu"):
        if torch.cuda.is_available():
            gpu(args.quick, args.peak_tflops)
        else:
            print("gpu: no CUDA device here; MFU not measured")


if __name__ == "__main__":
    main()
