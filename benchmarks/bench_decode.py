"""Decoding speed: qkv against Hugging Face `generate` (fp32 and bf16), GPT-2 124M, at batch 1
and at batch 8.

Both libraries build GPT-2 124M with random weights (the speed does not depend on the values),
take the same 32-token prompt and produce 128 new tokens greedily with a KV cache. At batch 8
they take 8 prompts of 28 to 32 tokens, left-padded into one batch (the padding masked), and
produce 128 new tokens for each: the aggregate tokens/s counts all 8 rows.

  qkv   `qkv.generate.decode_tokens` with the weights in int8 (`qkv.quantize_int8`, FBGEMM
        kernels, oneDNN's from 4 rows on, the prompt and batch 8: what `qkv generate --dtype
        int8` does), int8 with each input row rounded on
        its own range ("int8-rows": what `qkv serve` runs), int8 weight-only, bf16 and fp32;
  HF    `model.generate(..., do_sample=False)` in fp32; in fp32 under
        `torch.autocast("cpu", dtype=torch.bfloat16)`; and with the weights cast to bf16
        (`model.to(torch.bfloat16)`), whichever of the two bf16 ways a user finds faster.

The timed unit is one whole call (prefill + 128 steps); the contenders run in alternating
rounds after a warm-up call and each one's best round counts. Each row also shows the bytes of
weights one step reads, the memory traffic that makes (weight bytes per step x steps/s), and
its fraction of the hardware limit: that traffic over the measured copy bandwidth
(`_common.copy_bandwidth`). A step reads every weight once, whatever the batch, so at batch 8 a
step's bytes serve 8 tokens.

Quality, two ways:
- on GPT-2 124M's random weights, each qkv format scores one 160-token sequence
  (teacher-forced) against fp32: how often the top-1 next tokens agree, and the largest
  |d log p|;
- on a *trained* model (qkv's baby recipe, trained here for --quality-steps updates on tiny
  Shakespeare), the validation loss with fp32, bf16 and int8 weights: the check is that each
  stays within 1% of fp32.

    python benchmarks/bench_decode.py                # about 6 minutes on a 2-core CPU
    python benchmarks/bench_decode.py --quick        # a smoke run (under a minute)
    python benchmarks/bench_decode.py --only batch1  # one part: batch1, batch8 or quality
    python benchmarks/bench_decode.py --rounds 5 --new-tokens 256 --quality-steps 0
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import (
    BUNDLED,
    CPU,
    Int8Linear,
    copy_bandwidth,
    decode_tokens,
    eval_batches,
    hf_gpt2,
    pack_linears,
    peer_autocast,
    print_table,
    race,
    split,
    threads,
    train_baby,
)

import qkv
from qkv.train import evaluate

warnings.filterwarnings("ignore", message=".*quantiz")  # torch's notes on its quantized APIs

FORMATS = ("int8", "int8-rows", "int8-weight-only", "bf16", "fp32")
BATCH8_FORMATS = ("int8", "int8-rows", "bf16", "fp32")  # int8 weight-only is slow on 8 rows


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weight matrices one decoding step reads: every linear layer, the output
    layer included (the embedding lookup reads one row, so it does not count). transformers'
    GPT-2 keeps its matrices in `Conv1D` modules: their weights count the same way."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.qweight.nbytes + m.scale.nbytes
        elif isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            total += m.weight.nbytes
    return total


def convert(model: qkv.Transformer, fmt: str) -> qkv.Transformer:
    """A copy of an fp32 model with its weights in `fmt` (one of FORMATS)."""
    model = copy.deepcopy(model)
    if fmt in ("int8", "int8-rows"):  # int8 weights, inputs rounded to int8 on the fly
        return qkv.quantize_int8(model, activations=fmt)
    if fmt == "int8-weight-only":
        return qkv.quantize_int8(model.to(torch.bfloat16), activations="float")
    return pack_linears(model.to(torch.bfloat16)) if fmt == "bf16" else model


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 16 new tokens, 1 round, 30 quality steps; the numbers "
                        "mean nothing")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=None, help="(128; quick 16)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating timed rounds after the warm-up call (3; quick 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: one per idle CPU)")
    parser.add_argument("--quality-steps", type=int, default=None,
                        help="updates of the baby model trained for the quality check "
                        "(800; quick 30; 0: skip)")
    parser.add_argument("--only", choices=("batch1", "batch8", "quality"),
                        help="run one part (each fits a few minutes): batch 1 with the quality "
                        "on random weights, batch 8, or the trained model's quality")
    args = parser.parse_args()
    n = args.new_tokens or (16 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 3)
    quality_steps = (args.quality_steps if args.quality_steps is not None
                     else 30 if args.quick else 800)
    n_threads = threads(args.threads)
    parts = [args.only] if args.only else ["batch1", "batch8", "quality"]

    bandwidth = copy_bandwidth() if {"batch1", "batch8"} & set(parts) else 0.0
    if bandwidth:
        print(f"copy bandwidth (bytes read + written, {n_threads} threads): "
              f"{bandwidth / 1e9:.1f} GB/s", flush=True)
    if {"batch1", "batch8"} & set(parts):
        torch.manual_seed(0)
        cfg = qkv.presets.get("gpt2-124m")
        fp32 = qkv.Transformer(cfg).eval()
        hf = hf_gpt2(cfg.vocab_size, cfg.max_seq_len, cfg.d_model, cfg.n_layers,
                     cfg.n_heads).eval()  # GPT-2 124M
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
        peers = {"HF fp32": (hf, "fp32"), "HF bf16 autocast": (hf, "bf16"),
                 "HF bf16 weights": (hf_bf16, "fp32")}
        if "batch1" in parts:
            batch_one(fp32, peers, args.prompt_tokens, n, rounds, n_threads, bandwidth)
        if "batch8" in parts:
            prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_tokens - i % 5,)).tolist()
                       for i in range(8)]
            models = {fmt: convert(fp32, fmt) for fmt in BATCH8_FORMATS}
            race_table(models, peers, prompts, n, rounds, n_threads, bandwidth,
                       f"decode GPT-2 124M, batch 8 (left-padded prompts of "
                       f"{args.prompt_tokens - 4}-{args.prompt_tokens} tokens), {n} new tokens "
                       f"per row, greedy, {n_threads} threads, best of {rounds} rounds, "
                       f"aggregate")
    if "quality" in parts and quality_steps > 0:
        trained_quality(quality_steps, n_threads)
    return 0


def race_table(models: dict[str, torch.nn.Module], peers: dict[str, tuple], prompts: list,
               n: int, rounds: int, n_threads: int, bandwidth: float, title: str) -> None:
    """Race qkv's `models` against the HF `peers` (model, precision) on `prompts` (a batch) and
    print tokens/s with the bytes a step reads and its fraction of the copy bandwidth."""
    rows = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # (B, T) left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run_qkv(model) -> None:
        steps = sum(1 for _ in decode_tokens(model, prompts, n, temperature=0))
        assert steps == n

    @torch.inference_mode()
    def run_hf(model, precision: str) -> None:
        with peer_autocast(precision):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape == (rows, width + n)

    runs = {f"qkv {fmt}": (lambda m=m: run_qkv(m)) for fmt, m in models.items()}
    runs.update({name: (lambda m=m, p=p: run_hf(m, p)) for name, (m, p) in peers.items()})
    best, _ = race(runs, rounds)
    speeds = {name: rows * n / seconds for name, seconds in best.items()}
    # A step reads every weight once; under autocast HF reads its fp32 weights (and casts them).
    per_step = {f"qkv {fmt}": weight_bytes(m) for fmt, m in models.items()}
    per_step.update({name: weight_bytes(m) for name, (m, _) in peers.items()})
    notes = {}
    for name in speeds:
        traffic = per_step[name] * speeds[name] / rows  # bytes/s
        notes[name] = (f"weights {per_step[name] / 1e6:4.0f} MB/step = "
                       f"{traffic / 1e9:4.1f} GB/s = {traffic / bandwidth:4.0%} of copy b/w")
    print_table(title, speeds, "tok/s", notes, digits=1)


def batch_one(fp32: qkv.Transformer, peers: dict[str, tuple], prompt_tokens: int, n: int,
              rounds: int, n_threads: int, bandwidth: float) -> None:
    """Batch 1: the speed table, then each format's agreement with fp32 on random weights."""
    models = {fmt: convert(fp32, fmt) for fmt in FORMATS}  # converted once, before timing
    prompt = torch.randint(0, fp32.config.vocab_size, (prompt_tokens,)).tolist()
    race_table(models, peers, [prompt], n, rounds, n_threads, bandwidth,
               f"decode GPT-2 124M, batch 1, prompt {prompt_tokens}, {n} new tokens, greedy, "
               f"{n_threads} threads, best of {rounds} rounds")
    # Quality on random weights: teacher-forced top-1 agreement with fp32 on the same weights.
    with torch.inference_mode():
        tokens = [int(t) for t in decode_tokens(fp32, [prompt], n, temperature=0)]
        sequence = torch.tensor([prompt + tokens])  # (1, T)
        lp32 = fp32(sequence).float().log_softmax(-1)
        for fmt in FORMATS[:-1]:
            lp = models[fmt](sequence).float().log_softmax(-1)
            agree = (lp32.argmax(-1) == lp.argmax(-1)).float().mean().item()
            print(f"  qkv {fmt} vs fp32 on random weights: top-1 agreement {agree:.1%}, "
                  f"max |d log p| {(lp32 - lp).abs().max().item():.3f}", flush=True)


def trained_quality(steps: int, n_threads: int) -> None:
    """Train the baby model, then score its validation windows with each weight format."""
    with tempfile.TemporaryDirectory() as tmp:
        _, result, wall = train_baby(Path(tmp) / "run", "bf16", threads=n_threads,
                                     max_steps=steps)
        model, _ = qkv.load(Path(tmp) / "run")  # the best checkpoint, fp32
    ids = result.tokenizer.encode(BUNDLED.read_text(encoding="utf-8"))
    _, val = split(np.asarray(ids, dtype=np.int64), 0.1, model.config.max_seq_len)
    batches = eval_batches(val, model.config.max_seq_len, 32, 500)
    losses = {fmt: evaluate(convert(model, fmt), batches, CPU, "fp32") for fmt in FORMATS}
    base = losses["fp32"]
    shown = ", ".join(f"{fmt} {loss:.4f} ({100 * (loss - base) / base:+.2f}%)"
                      for fmt, loss in losses.items())
    print(f"  trained baby model ({steps} updates, {wall:.0f} s): val loss {shown}")


if __name__ == "__main__":
    sys.exit(main())
