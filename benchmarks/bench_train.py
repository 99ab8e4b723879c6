"""Training speed of qkv against Hugging Face `GPT2LMHeadModel`, and qkv's time to a loss.

Three measurements (each prints its result line; `--only` picks one):

  throughput  training tokens/s of one full step (forward, loss, backward, clip, AdamW) for the
              same GPT-2-shaped model built by both libraries, random weights and random tokens,
              same batch. Hugging Face runs fp32 (as people use it); qkv its best CPU settings
              (bf16 autocast where the CPU has it). Two shapes:
                baby   nanoGPT's Shakespeare baby: 4 layers, 4 heads, d=128, context 64,
                       vocab 65, batch 12
                gpt2   GPT-2 124M, batch 4 x 256 (a few steps only: it is slow on a CPU)
              The libraries alternate in rounds; each one's best round counts, so a burst of
              other work on the machine hurts neither more than the other.
  ttl         wall seconds until `qkv.train.train` reaches val loss <= 1.886 on tiny Shakespeare
              with the baby shape (nanoGPT's reference recipe takes 135 s on a 2-core CPU).
  quality     the same recipe for a fixed number of steps in bf16 and in fp32: final val loss.

    python benchmarks/bench_train.py                      # all three (about 8 minutes)
    python benchmarks/bench_train.py --only throughput --shapes baby
    python benchmarks/bench_train.py --only ttl
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import qkv  # noqa: E402
from qkv.hardware import (  # noqa: E402
    autocast,
    resolve_precision,
    set_threads,
    training_attention,
)
from qkv.train import TrainConfig, train  # noqa: E402

SHAPES = {  # name: (ModelConfig overrides of the gpt2-124m preset, batch, context, timed steps)
    "baby": (dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, max_seq_len=64), 12, 64,
             40),
    "gpt2": (dict(max_seq_len=256), 4, 256, 3),
}

# The recipe of the time-to-loss run: nanoGPT's baby shape, trained the qkv way.
BABY_RECIPE = dict(preset="gpt-char-tiny", batch_size=32, lr=4e-3, min_lr=4e-4,
                   warmup_steps=40, max_steps=800, eval_every=100, eval_windows=1000,
                   beta2=0.99, weight_decay=0.1, log_every=50, seed=1337)


# ---------------------------------------------------------------------- throughput

def qkv_step(cfg: qkv.ModelConfig, batch: torch.Tensor, precision: str, compile: bool = False):
    """One training step exactly as qkv.train's loop does it (`--compile`: torch.compile)."""
    from qkv.train.lm import next_token_loss
    from qkv.train.optim import make_optimizer

    model = qkv.Transformer(cfg).train()
    loss_fn = torch.compile(next_token_loss) if compile else next_token_loss
    optimizer = make_optimizer(model, 1e-4, 0.1, fused=True)
    device = torch.device("cpu")
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        with training_attention(device, precision):
            with autocast(device, precision):
                loss = loss_fn(model, x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def hf_step(cfg: qkv.ModelConfig, batch: torch.Tensor):
    """The same step with transformers' GPT2LMHeadModel in fp32 (loss from `labels`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len,
                        n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(hf_cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x = batch[:, :-1]

    def step() -> None:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def throughput(shape: str, precision: str, rounds: int, compile: bool) -> None:
    overrides, B, T, steps = SHAPES[shape]
    cfg = qkv.presets.get("gpt2-124m", **overrides)  # GPT-2's architecture: same as HF's
    torch.manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (B, T + 1))
    steppers = {"qkv": qkv_step(cfg, batch, precision)}
    if compile:
        steppers["qkv+compile"] = qkv_step(cfg, batch, precision, compile=True)
    steppers["HF"] = hf_step(cfg, batch)
    best = dict.fromkeys(steppers, 0.0)
    warm = 2 if shape == "gpt2" else 5
    compile_seconds = 0.0
    for name, step in steppers.items():
        start = time.perf_counter()
        for _ in range(warm):
            step()
        if name == "qkv+compile":
            compile_seconds = time.perf_counter() - start
    for _ in range(rounds):
        for name, step in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best[name] = max(best[name], steps * B * T / (time.perf_counter() - start))
    n = sum(p.numel() for p in qkv.Transformer(cfg).parameters())
    ours = max((k for k in steppers if k != "HF"), key=best.get)
    detail = ", ".join(f"{k} {v:,.0f}" for k, v in best.items())
    note = f"; torch.compile took {compile_seconds:.0f} s" if compile else ""
    print(f"train {shape} ({n / 1e6:.1f}M params, batch {B}x{T}, qkv {precision}, HF fp32, "
          f"{torch.get_num_threads()} threads; {detail}{note})", flush=True)
    print(f"  qkv {best[ours]:,.0f} tok/s, HF {best['HF']:,.0f} tok/s, "
          f"ratio {best[ours] / best['HF']:.2f}  [{shape}: {ours}]", flush=True)


# ---------------------------------------------------------------------- time to loss, quality

def baby_run(out: Path, precision: str, target: float | None, max_steps: int | None = None,
             threads: int | None = None):
    """Train the baby shape on tiny Shakespeare; stop at the first evaluation <= target."""
    reached: list[float] = []
    start = time.perf_counter()

    class Reached(Exception):
        pass

    def watch(record):
        if target is not None and record.get("val_loss", math.inf) <= target:
            reached.append(time.perf_counter() - start)
            raise Reached

    recipe = {**BABY_RECIPE, **({"max_steps": max_steps} if max_steps else {})}
    cfg = TrainConfig(**recipe, out=str(out), precision=precision, progress=False,
                      threads=threads)
    try:
        result = train(cfg, callback=watch)
    except Reached:
        result = None
    return reached[0] if reached else None, result, time.perf_counter() - start


def time_to_loss(precision: str, target: float, threads: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        seconds, result, wall = baby_run(Path(tmp) / "run", precision, target, threads=threads)
        log = qkv.train.read_log(Path(tmp) / "run")
    evals = [(r["step"], r["val_loss"], r["elapsed"]) for r in log if "val_loss" in r]
    if seconds is None:
        print(f"time to val loss {target}: NOT reached in {wall:.0f} s "
              f"(best {min(v for _, v, _ in evals):.4f}); evaluations: {evals}")
        return
    step, val, _ = evals[-1]
    tokens = step * BABY_RECIPE["batch_size"] * 64
    print(f"time to val loss {target} (baby shape, qkv {precision}): {seconds:.1f} s wall "
          f"(val {val:.4f} at step {step}, {tokens / 1e6:.2f}M tokens); nanoGPT reference "
          f"135 s, ratio {135 / seconds:.2f}", flush=True)


def quality(steps: int, threads: int | None) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("bf16", "fp32"):
            _, result, wall = baby_run(Path(tmp) / precision, precision, None, steps, threads)
            results[precision] = (result.val_loss, wall)
    (b, tb), (f, tf) = results["bf16"], results["fp32"]
    print(f"quality after {steps} steps (baby shape): val loss bf16 {b:.4f} ({tb:.0f} s), "
          f"fp32 {f:.4f} ({tf:.0f} s), difference {100 * (b - f) / f:+.2f}%", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("throughput", "ttl", "quality"))
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["baby", "gpt2"])
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="qkv's precision (auto: bf16 where the CPU has it)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (3)")
    parser.add_argument("--compile", nargs="*", choices=sorted(SHAPES), default=["baby"],
                        help="shapes for which qkv is also timed with torch.compile (baby)")
    parser.add_argument("--target", type=float, default=1.886, help="val loss of the ttl run")
    parser.add_argument("--quality-steps", type=int, default=800)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: one per idle CPU)")
    args = parser.parse_args()
    set_threads(args.threads)  # default: one per idle CPU (the same for both libraries)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    with contextlib.suppress(KeyboardInterrupt):
        if args.only in (None, "throughput"):
            for shape in args.shapes:
                throughput(shape, precision, args.rounds, shape in args.compile)
        if args.only in (None, "ttl"):
            time_to_loss(precision, args.target, args.threads)
        if args.only in (None, "quality"):
            quality(args.quality_steps, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
