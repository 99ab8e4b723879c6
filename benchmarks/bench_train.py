"""Training speed of qkv against Hugging Face GPT-2 (fp32 and bf16 autocast), measured in one run.

Three measurements (`--only` picks one):

  throughput  training tokens/s of one full step (forward, loss, backward, clip, fused AdamW)
              for the same GPT-2-shaped model built by qkv and by transformers'
              `GPT2LMHeadModel`, random weights and tokens, same batch. qkv runs its best CPU
              settings (bf16 autocast where the CPU has it; also with torch.compile for the
              shapes in --compile); Hugging Face runs fp32, and fp32 weights under
              `torch.autocast("cpu", dtype=torch.bfloat16)`; a nanoGPT-style model
              (_nanogpt.py) runs fp32, as nanoGPT trains on a CPU. Each row also prints its
              fraction of the hardware limit: tokens/s x training FLOPs per token / the
              measured bf16 matmul ceiling (_common.matmul_ceiling). Two shapes:
                baby   nanoGPT's Shakespeare "baby GPT": 4 layers, 4 heads, d=128, context 64,
                       vocabulary 65, batch 12
                gpt2   GPT-2 124M, batch 4 x 256
  ttl         wall seconds to a validation loss (default 1.886) on the bundled tiny Shakespeare,
              baby shape, from the start of the run (data preparation and evaluations count):
                qkv    `qkv.train.train` with qkv's recipe for the shape (batch 32, lr 4e-3)
                peer   `GPT2LMHeadModel` of the same shape (GPT-2's layers, biases included,
                       where nanoGPT's baby has none) trained here with the hyperparameters of
                       nanoGPT's published CPU "baby GPT" run (batch 12, context 64, AdamW
                       lr 1e-3 -> 1e-4, 100 warm-up steps, cosine over 2,000 steps, betas
                       (0.9, 0.99), weight decay 0.1, clip 1.0, dropout 0; evaluation every 250
                       steps), once in fp32 and once with bf16 autocast. Past step 2,000 it goes
                       on at lr 1e-4, as nanoGPT's schedule does, up to --peer-max-steps.
              Both sides are scored on the same 1,000 fixed windows of the last 10% of the text.
  quality     qkv's recipe for a fixed number of steps in bf16 and in fp32: final val loss.

Every speed is measured in one process with matched threads; the throughput contenders run in
alternating rounds after a warm-up round and each one's best round counts (see _common.py).

    python benchmarks/bench_train.py                      # everything (about 11 minutes)
    python benchmarks/bench_train.py --quick              # a smoke run (about a minute)
    python benchmarks/bench_train.py --only throughput --shapes baby
    python benchmarks/bench_train.py --only ttl --peers fp32
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    BABY_RECIPE,
    BUNDLED,
    CPU,
    autocast,
    eval_batches,
    hf_gpt2,
    make_optimizer,
    matmul_ceiling,
    next_token_loss,
    param_count,
    peer_adamw,
    peer_autocast,
    print_table,
    race,
    resolve_precision,
    split,
    threads,
    train_baby,
    training_attention,
)
from _nanogpt import NanoGPT, nanogpt_adamw

import qkv

# name: (overrides of the gpt2-124m preset, batch, context, steps per timed round)
SHAPES = {
    "baby": (dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, max_seq_len=64), 12, 64, 40),
    "gpt2": (dict(max_seq_len=256), 4, 256, 3),
}
QUICK_STEPS = {"baby": 5, "gpt2": 1}

# nanoGPT's published CPU "baby GPT" run on Shakespeare characters (its README: the
# train_shakespeare_char config with --device=cpu --compile=False --eval_iters=20
# --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
# --lr_decay_iters=2000 --dropout=0.0; the rest from that config and train.py's defaults).
NANOGPT_BABY = dict(batch=12, context=64, n_layers=4, n_heads=4, d_model=128, dropout=0.0,
                    lr=1e-3, min_lr=1e-4, warmup=100, decay_steps=2000, betas=(0.9, 0.99),
                    weight_decay=0.1, grad_clip=1.0, eval_every=250, seed=1337,
                    eval_windows=BABY_RECIPE["eval_windows"])  # qkv's validation windows


# ---------------------------------------------------------------------- throughput

def qkv_step(cfg: qkv.ModelConfig, batch: torch.Tensor, precision: str, compile: bool = False):
    """One training step as qkv.train's loop takes it (`compile`: with torch.compile)."""
    model = qkv.Transformer(cfg).train()
    loss_fn = torch.compile(next_token_loss) if compile else next_token_loss
    optimizer = make_optimizer(model, 1e-4, 0.1, fused=True)
    x, y = batch[:, :-1], batch[:, 1:]  # (B, T) inputs and their next tokens

    def step() -> None:
        with training_attention(CPU, precision, x.shape[1]):
            with autocast(CPU, precision):
                loss = loss_fn(model, x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.model = model  # type: ignore[attr-defined]
    return step


def hf_step(cfg: qkv.ModelConfig, batch: torch.Tensor, precision: str):
    """The same step with transformers' GPT2LMHeadModel: fp32, or bf16 autocast."""
    model = hf_gpt2(cfg.vocab_size, cfg.max_seq_len, cfg.d_model, cfg.n_layers,
                    cfg.n_heads).train()
    optimizer = peer_adamw(model, 1e-4, 0.1)
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        with peer_autocast(precision):
            logits = model(input_ids=x).logits  # (B, T, vocab)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def nanogpt_step(cfg: qkv.ModelConfig, batch: torch.Tensor, bias: bool):
    """The same step with the nanoGPT-style model of _nanogpt.py, in fp32 as nanoGPT runs on a
    CPU (`bias`: with biases, as GPT-2; nanoGPT's baby is run without)."""
    model = NanoGPT(cfg.vocab_size, cfg.max_seq_len, cfg.d_model, cfg.n_layers, cfg.n_heads,
                    bias).train()
    optimizer = nanogpt_adamw(model, 1e-4, 0.1)
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def flops_per_token(cfg: qkv.ModelConfig, context: int) -> float:
    """Training FLOPs of one token, as nanoGPT's estimate_mfu (PaLM, appendix B): 6 per weight
    that multiplies (every parameter but the position table; the tied output layer counts) and
    12 * layers * d_model * context for the attention scores and their weighted sum."""
    n = qkv.Transformer(cfg).num_parameters() - cfg.max_seq_len * cfg.d_model
    return 6 * n + 12 * cfg.n_layers * cfg.d_model * context


def throughput(shape: str, precision: str, rounds: int, steps: int, compile: bool,
               n_threads: int, ceiling: float) -> None:
    overrides, B, T, _ = SHAPES[shape]
    cfg = qkv.presets.get("gpt2-124m", **overrides)  # GPT-2's architecture, as HF builds it
    torch.manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (B, T + 1))
    steppers = {f"qkv {precision}": qkv_step(cfg, batch, precision)}
    if compile:
        steppers[f"qkv {precision} +compile"] = qkv_step(cfg, batch, precision, compile=True)
    steppers["HF fp32"] = hf_step(cfg, batch, "fp32")
    steppers["HF bf16 autocast"] = hf_step(cfg, batch, "bf16")
    bias = shape != "baby"  # nanoGPT's baby GPT is run with bias=False
    nano = f"nanoGPT fp32{'' if bias else ' (no biases)'}"
    steppers[nano] = nanogpt_step(cfg, batch, bias)

    def repeat(step):
        def run() -> None:
            for _ in range(steps):
                step()
        return run

    best, warm = race({name: repeat(step) for name, step in steppers.items()}, rounds)
    speeds = {name: steps * B * T / seconds for name, seconds in best.items()}
    per_token = flops_per_token(cfg, T)
    notes = {name: f"{100 * speed * per_token / ceiling:4.1f}% of the bf16 matmul ceiling"
             for name, speed in speeds.items()}
    if compile:
        name = f"qkv {precision} +compile"
        notes[name] += f" (warm-up round with compiling: {warm[name]:.0f} s)"
    n = param_count(steppers[f"qkv {precision}"].model)
    print_table(f"train {shape}: {n / 1e6:.1f}M params, batch {B} x {T}, fused AdamW, "
                f"{n_threads} threads, best of {rounds} rounds of {steps} steps; "
                f"{per_token / 1e9:.3f} GFLOP/token, bf16 matmul ceiling "
                f"{ceiling / 1e12:.2f} TFLOP/s", speeds, "tok/s", notes)


# ---------------------------------------------------------------------- time to loss

def nanogpt_lr(step: int, r: dict) -> float:
    """nanoGPT's schedule: linear warm-up, cosine decay to min_lr at decay_steps, then min_lr."""
    if step < r["warmup"]:
        return r["lr"] * (step + 1) / (r["warmup"] + 1)
    if step > r["decay_steps"]:
        return r["min_lr"]
    done = (step - r["warmup"]) / (r["decay_steps"] - r["warmup"])  # 0 -> 1
    return r["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * done)) * (r["lr"] - r["min_lr"])


@torch.inference_mode()
def peer_val_loss(model: torch.nn.Module, batches, precision: str) -> float:
    """Mean cross-entropy per token over fixed (x, y) batches."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with peer_autocast(precision):
            logits = model(input_ids=x).logits  # (B, T, vocab)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                 reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def peer_time_to_loss(precision: str, target: float, max_steps: int,
                      recipe: dict) -> tuple[float | None, list[tuple[int, float, float]]]:
    """Train the nanoGPT baby recipe on GPT2LMHeadModel until val loss <= target.

    Returns (seconds to the target or None, [(step, val loss, seconds)] of every evaluation)."""
    start = time.perf_counter()
    B, T = recipe["batch"], recipe["context"]
    text = BUNDLED.read_text(encoding="utf-8")
    chars = sorted(set(text))  # nanoGPT's character vocabulary (65 for tiny Shakespeare)
    index = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    train_ids, val_ids = split(ids, 0.1, T)  # the split qkv's loop makes
    val = eval_batches(val_ids, T, BABY_RECIPE["batch_size"], recipe["eval_windows"])
    train_ids = torch.from_numpy(np.ascontiguousarray(train_ids))
    offsets = torch.arange(T + 1)

    torch.manual_seed(recipe["seed"])
    model = hf_gpt2(len(chars), T, recipe["d_model"], recipe["n_layers"], recipe["n_heads"],
                    recipe["dropout"]).train()
    optimizer = peer_adamw(model, recipe["lr"], recipe["weight_decay"], recipe["betas"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    evaluations: list[tuple[int, float, float]] = []
    for step in range(max_steps):
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(step, recipe)
        starts = torch.randint(len(train_ids) - T, (B,), generator=generator)
        window = train_ids[starts[:, None] + offsets]  # (B, T + 1)
        x, y = window[:, :-1], window[:, 1:]
        with peer_autocast(precision):
            logits = model(input_ids=x).logits  # (B, T, vocab)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % recipe["eval_every"] == 0 or step + 1 == max_steps:
            loss_now = peer_val_loss(model, val, precision)
            evaluations.append((step + 1, loss_now, time.perf_counter() - start))
            if loss_now <= target:
                return evaluations[-1][2], evaluations
    return None, evaluations


def time_to_loss(precision: str, target: float, peers: list[str], peer_max_steps: int,
                 n_threads: int, quick: bool) -> None:
    quick_evals = dict(eval_every=25, eval_windows=200)  # frequent, short evaluations
    qkv_recipe = dict(**quick_evals, max_steps=200) if quick else {}
    peer_recipe = {**NANOGPT_BABY, **(quick_evals if quick else {})}
    seconds: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        reached, _, wall = train_baby(run, precision, target, threads=n_threads, **qkv_recipe)
        evals = [(r["step"], r["val_loss"]) for r in qkv.train.read_log(run) if "val_loss" in r]
    name = f"qkv {precision}"
    seconds[name] = reached
    step, val = evals[-1] if evals else (0, math.nan)
    batch = BABY_RECIPE["batch_size"]
    notes[name] = (f"val {val:.4f} at step {step} ({step * batch * 64 / 1e6:.2f}M tokens; "
                   f"qkv recipe, batch {batch})" if reached else
                   f"NOT reached in {wall:.0f} s; best {min(v for _, v in evals):.4f}")
    for precision_peer in peers:
        name = "HF fp32" if precision_peer == "fp32" else "HF bf16 autocast"
        reached, evaluations = peer_time_to_loss(precision_peer, target, peer_max_steps,
                                                 peer_recipe)
        seconds[name] = reached
        step, val, wall = evaluations[-1]
        tokens = step * peer_recipe["batch"] * peer_recipe["context"]
        notes[name] = (f"val {val:.4f} at step {step} ({tokens / 1e6:.2f}M tokens; "
                       "nanoGPT baby recipe)" if reached else
                       f"NOT reached in {step} steps, {wall:.0f} s; best "
                       f"{min(v for _, v, _ in evaluations):.4f}")
        at_end = [v for s, v, _ in evaluations if s == peer_recipe["decay_steps"]]
        if step > peer_recipe["decay_steps"] and at_end:
            notes[name] += (f"; {at_end[0]:.4f} at step {peer_recipe['decay_steps']}, the end "
                            "of its schedule")
    print_table(f"time to val loss {target}, baby shape, tiny Shakespeare, {n_threads} threads "
                "(wall seconds from the start, lower is better)", seconds, "s", notes,
                digits=1, lower_is_better=True)


# ---------------------------------------------------------------------- quality

def quality(steps: int, n_threads: int) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("bf16", "fp32"):
            _, result, wall = train_baby(Path(tmp) / precision, precision, None,
                                         threads=n_threads, max_steps=steps)
            results[precision] = (result.val_loss, wall)
    (b, tb), (f, tf) = results["bf16"], results["fp32"]
    print(f"quality after {steps} steps (qkv, baby shape): val loss bf16 {b:.4f} ({tb:.0f} s), "
          f"fp32 {f:.4f} ({tf:.0f} s), difference {100 * (b - f) / f:+.2f}%", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in about a minute: the baby shape only, 1 round of 5 "
                        "steps, no compile, a loose ttl target (2.8), 30 quality steps; the "
                        "numbers mean nothing")
    parser.add_argument("--only", choices=("throughput", "ttl", "quality"))
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                        help="throughput shapes (baby gpt2; quick: baby)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="qkv's precision (auto: bf16 where the CPU has it)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating timed rounds after the warm-up round (3; quick 1)")
    parser.add_argument("--compile", nargs="*", choices=sorted(SHAPES), default=None,
                        help="shapes for which qkv is also timed with torch.compile "
                        "(baby; quick: none)")
    parser.add_argument("--target", type=float, default=None,
                        help="val loss of the ttl run (1.886, nanoGPT's baby result; quick 2.8)")
    parser.add_argument("--peers", nargs="*", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="the Hugging Face runs of ttl (fp32 bf16)")
    parser.add_argument("--peer-max-steps", type=int, default=3000,
                        help="the ttl peer stops here if it has not reached the target (3000)")
    parser.add_argument("--quality-steps", type=int, default=None, help="(800; quick 30)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for everything (default: one per idle CPU)")
    args = parser.parse_args()
    shapes = args.shapes or (["baby"] if args.quick else ["baby", "gpt2"])
    rounds = args.rounds or (1 if args.quick else 3)
    compile_shapes = args.compile if args.compile is not None else ([] if args.quick else
                                                                    ["baby"])
    target = args.target or (2.8 if args.quick else 1.886)
    quality_steps = args.quality_steps or (30 if args.quick else 800)

    n_threads = threads(args.threads)
    precision = resolve_precision(args.precision, CPU)
    with contextlib.suppress(KeyboardInterrupt):
        if args.only in (None, "throughput"):
            ceiling = matmul_ceiling()  # this machine's bf16 FLOP/s, with these threads
            for shape in shapes:
                steps = QUICK_STEPS[shape] if args.quick else SHAPES[shape][3]
                throughput(shape, precision, rounds, steps, shape in compile_shapes, n_threads,
                           ceiling)
        if args.only in (None, "ttl"):
            time_to_loss(precision, target, args.peers, args.peer_max_steps, n_threads,
                         args.quick)
        if args.only in (None, "quality"):
            quality(quality_steps, n_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
