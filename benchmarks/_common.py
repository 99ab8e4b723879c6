"""What the benchmark scripts share: the timing method, threads, the table, the peers' helpers.

The method, the same in every script:
- qkv and its peers run in one process, on the same inputs, with the same number of threads;
- every contender is called once (or more) untimed first: allocations, kernel choice, weight
  packing and torch.compile happen there;
- then timed rounds in which each contender runs once, the order reversed every other round,
  so a burst of other work on the machine hurts none of them more than the others;
- each contender's best round counts, and the table prints qkv's ratio to every peer.

The peers are Hugging Face models used as their users use them: fp32, and fp32 weights under
`torch.autocast("cpu", dtype=torch.bfloat16)`, the one-line bf16 setting that is the fair
comparison on a CPU with AMX (and, where it is faster, weights cast to bf16).

Run the scripts as `python benchmarks/<name>.py`: Python then finds this module next to them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# The few qkv internals the benchmarks use; everything else they call is qkv's public API
# (qkv.load, qkv.Transformer, qkv.presets, qkv.quantize_int8, qkv.train, qkv.embeddings). If a
# refactor moves one of these, this block is the one place to change.
from qkv.data import BUNDLED, eval_batches, split  # the bundled corpus, qkv's validation windows
from qkv.generate import decode_tokens  # token ids in, token ids out (no tokenizer needed)
from qkv.hardware import autocast, cpu_has_bf16, resolve_precision, set_threads, training_attention
from qkv.hub import packaged_minilm_path  # the pip-installed all-MiniLM-L6-v2
from qkv.quantize import Int8Linear, pack_linears  # bytes per step; the bf16 decode path
from qkv.train import next_token_loss  # one training step's loss, as qkv's loop takes it
from qkv.train.optim import make_optimizer

__all__ = [
    "autocast", "BABY_RECIPE", "BUNDLED", "CPU", "DATA", "decode_tokens", "eval_batches",
    "hf_gpt2", "Int8Linear", "make_optimizer", "next_token_loss", "packaged_minilm_path",
    "param_count", "peer_adamw", "peer_autocast", "print_table", "race", "resolve_precision",
    "set_threads", "split", "threads", "train_baby", "training_attention", "pack_linears",
    "copy_bandwidth", "matmul_ceiling",
]

DATA = Path(__file__).resolve().parent / "data"  # the benchmarks' data, inside the repository
CPU = torch.device("cpu")

#: qkv's own recipe for nanoGPT's "baby" shape (4 layers, 4 heads, d=128, context 64) on the
#: bundled tiny Shakespeare: used for the time-to-loss run and for the quality checks.
BABY_RECIPE = dict(preset="gpt-char-tiny", batch_size=32, lr=4e-3, min_lr=4e-4,
                   warmup_steps=40, max_steps=800, eval_every=100, eval_windows=1000,
                   beta2=0.99, weight_decay=0.1, log_every=50, seed=1337)


# ---------------------------------------------------------------------- timing and output

def race(runs: dict[str, Callable[[], Any]], rounds: int,
         warmup: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """Time each run the benchmark way; returns (best seconds of one call, warm-up seconds).

    Every run is called `warmup` times untimed, then `rounds` times, once per round, in an order
    that reverses every other round.
    """
    warm = {}
    for name, fn in runs.items():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        warm[name] = time.perf_counter() - start
    best = dict.fromkeys(runs, math.inf)
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            runs[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, warm


def print_table(title: str, values: dict[str, float | None], unit: str,
                notes: dict[str, str] | None = None, digits: int = 0,
                lower_is_better: bool = False) -> None:
    """One line per contender: its value, and for qkv's rows (names that start with "qkv") the
    ratio to each peer (every other row), written so that above 1 means qkv is better: qkv/peer
    for a speed, peer/qkv for a time (`lower_is_better`). A value of None prints as "-"."""
    notes = notes or {}
    peers = [n for n, v in values.items() if not n.startswith("qkv") and v]
    width = max(len(n) for n in values)
    print(title, flush=True)
    for name, value in values.items():
        shown = "-" if value is None else f"{value:,.{digits}f}"
        line = f"  {name:<{width}}  {shown:>10} {unit}"
        if name.startswith("qkv") and value:
            for p in peers:
                ratio = values[p] / value if lower_is_better else value / values[p]
                line += f"   {ratio:5.2f}x {p}"
        if name in notes:
            line += f"   {notes[name]}"
        print(line, flush=True)


def threads(n: int | None) -> int:
    """Set the threads of this process (both libraries share them); by default one per idle CPU
    (on a quiet machine, every CPU). Returns the number. On a CPU without bf16 units it says
    so once: its bf16 rows are emulated, and their ratios say nothing about a CPU with AMX."""
    if not cpu_has_bf16():
        print("note: this CPU has no bf16 units (no AMX, no AVX512-BF16); bf16 runs emulated "
              "here, so bf16 rows measure nothing a CPU with them would see", flush=True)
    return set_threads(n)


# ---------------------------------------------------------------------- the hardware's limits

def matmul_ceiling(dtype: torch.dtype = torch.bfloat16, size: int = 2048,
                   seconds: float = 1.0) -> float:
    """The matrix units' measured speed in FLOP/s: the best of repeated size x size x size
    products in `dtype` with this process's threads. A training or inference step can at best
    reach it, so `useful FLOPs / time / matmul_ceiling()` is the fraction of the hardware used."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # the library picks and packs its kernel here
    best, spent = math.inf, 0.0
    while spent < seconds:
        start = time.perf_counter()
        a @ b
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2 * size**3 / best


def copy_bandwidth(megabytes: int = 512, seconds: float = 1.0) -> float:
    """Memory bandwidth in bytes/s, measured as a large tensor copy (bytes read + bytes
    written, best of repeated copies). Decoding one token reads every weight once, so
    `weight bytes per token * tokens/s / copy_bandwidth()` is the fraction of memory speed."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best, spent = math.inf, 0.0
    while spent < seconds:
        start = time.perf_counter()
        dst.copy_(src)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2 * src.numel() * 4 / best


# ---------------------------------------------------------------------- the peers

def peer_autocast(precision: str):
    """What a user of transformers writes for bf16 on a CPU (or nothing, for fp32)."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def hf_gpt2(vocab_size: int, context: int, d_model: int, n_layers: int, n_heads: int,
            dropout: float = 0.0):
    """A Hugging Face `GPT2LMHeadModel` of the given shape, with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=d_model,
                        n_layer=n_layers, n_head=n_heads, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def peer_adamw(model: torch.nn.Module, lr: float, weight_decay: float,
               betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """PyTorch's fused AdamW for a peer model: matrices decayed, vectors (biases, norms) not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


# ---------------------------------------------------------------------- qkv's baby recipe

class _Reached(Exception):
    pass


def train_baby(out: Path, precision: str, target: float | None = None,
               threads: int | None = None, **overrides: Any):
    """Train qkv's baby recipe (BABY_RECIPE, with `overrides`) into `out` with qkv.train.train,
    stopping at the first evaluation whose val loss is <= `target`.

    Returns (seconds until the target was reached or None, the TrainResult or None if stopped
    at the target, the wall seconds of the whole call)."""
    from qkv.train import TrainConfig, train

    reached: list[float] = []
    start = time.perf_counter()

    def watch(record: dict[str, Any]) -> None:
        if target is not None and record.get("val_loss", math.inf) <= target:
            reached.append(time.perf_counter() - start)
            raise _Reached

    cfg = TrainConfig(**{**BABY_RECIPE, **overrides}, out=str(out), precision=precision,
                      progress=False, threads=threads)
    try:
        result = train(cfg, callback=watch)
    except _Reached:
        result = None
    return (reached[0] if reached else None), result, time.perf_counter() - start


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

