"""Decoding speed at batch 1: qkv against Hugging Face `generate` (fp32 and bf16), GPT-2 124M.

Both libraries build GPT-2 124M with random weights (the speed does not depend on the values),
take the same 32-token prompt and produce 128 new tokens greedily with a KV cache.

  qkv   `qkv.generate.decode_tokens` with the weights in int8 (`qkv.quantize_int8`, FBGEMM
        kernels: what `qkv generate --dtype int8` does), int8 weight-only, bf16 and fp32;
  HF    `model.generate(..., do_sample=False)` in fp32; in fp32 under
        `torch.autocast("cpu", dtype=torch.bfloat16)`; and with the weights cast to bf16
        (`model.to(torch.bfloat16)`), whichever of the two bf16 ways a user finds faster.

The timed unit is one whole call (prefill + 128 steps); the contenders run in alternating
rounds after a warm-up call and each one's best round counts. Each row also shows the bytes of
weights one step reads and the memory bandwidth that makes.

Quality, two ways:
- on GPT-2 124M's random weights, each qkv format scores one 160-token sequence
  (teacher-forced) against fp32: how often the top-1 next tokens agree, and the largest
  |d log p|;
- on a *trained* model (qkv's baby recipe, trained here for --quality-steps updates on tiny
  Shakespeare), the validation loss with fp32, bf16 and int8 weights: the check is that each
  stays within 1% of fp32.

    python benchmarks/bench_decode.py                # about 3 minutes on a 2-core CPU
    python benchmarks/bench_decode.py --quick        # a smoke run (under a minute)
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
    decode_tokens,
    eval_batches,
    hf_gpt2,
    peer_autocast,
    print_table,
    race,
    split,
    threads,
    train_baby,
    use_matrix_vector,
)

import qkv
from qkv.train import evaluate

warnings.filterwarnings("ignore", message=".*quantiz")  # torch's notes on its quantized APIs

FORMATS = ("int8", "int8-weight-only", "bf16", "fp32")


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
    if fmt == "int8":
        return qkv.quantize_int8(model)  # int8 weights, inputs rounded to int8 on the fly
    if fmt == "int8-weight-only":
        return qkv.quantize_int8(model.to(torch.bfloat16), activations="float")
    return use_matrix_vector(model.to(torch.bfloat16)) if fmt == "bf16" else model


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
    args = parser.parse_args()
    n = args.new_tokens or (16 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 3)
    quality_steps = (args.quality_steps if args.quality_steps is not None
                     else 30 if args.quick else 800)
    n_threads = threads(args.threads)

    torch.manual_seed(0)
    cfg = qkv.presets.get("gpt2-124m")
    fp32 = qkv.Transformer(cfg).eval()
    models = {fmt: convert(fp32, fmt) for fmt in FORMATS}  # converted once, before timing
    hf = hf_gpt2(cfg.vocab_size, cfg.max_seq_len, cfg.d_model, cfg.n_layers,
                 cfg.n_heads).eval()  # GPT-2 124M
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens))

    def run_qkv(model) -> list[int]:
        tokens = [int(t) for t in decode_tokens(model, prompt.tolist(), n, temperature=0)]
        assert len(tokens) == n
        return tokens

    @torch.inference_mode()
    def run_hf(model, precision: str) -> list[int]:
        with peer_autocast(precision):
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 use_cache=True, pad_token_id=0)
        assert out.shape[1] == prompt.shape[1] + n
        return out[0, prompt.shape[1]:].tolist()

    runs = {f"qkv {fmt}": (lambda m=m: run_qkv(m)) for fmt, m in models.items()}
    runs["HF fp32"] = lambda: run_hf(hf, "fp32")
    runs["HF bf16 autocast"] = lambda: run_hf(hf, "bf16")
    runs["HF bf16 weights"] = lambda: run_hf(hf_bf16, "fp32")
    best, _ = race(runs, rounds)
    speeds = {name: n / seconds for name, seconds in best.items()}

    # Memory read per token; under autocast HF reads its fp32 weights (and casts them).
    per_token = {f"qkv {fmt}": weight_bytes(m) for fmt, m in models.items()}
    per_token.update({"HF fp32": weight_bytes(hf), "HF bf16 autocast": weight_bytes(hf),
                      "HF bf16 weights": weight_bytes(hf_bf16)})
    notes = {name: f"weights {per_token[name] / 1e6:4.0f} MB/token = "
                   f"{per_token[name] * speeds[name] / 1e9:4.1f} GB/s" for name in speeds}
    print_table(f"decode GPT-2 124M, batch 1, prompt {args.prompt_tokens}, {n} new tokens, "
                f"greedy, {n_threads} threads, best of {rounds} rounds", speeds, "tok/s", notes,
                digits=1)

    # Quality on random weights: teacher-forced top-1 agreement with fp32 on the same weights.
    with torch.inference_mode():
        sequence = torch.cat((prompt, torch.tensor([run_qkv(fp32)])), dim=1)
        lp32 = fp32(sequence).float().log_softmax(-1)
        for fmt in FORMATS[:-1]:
            lp = models[fmt](sequence).float().log_softmax(-1)
            agree = (lp32.argmax(-1) == lp.argmax(-1)).float().mean().item()
            print(f"  qkv {fmt} vs fp32 on random weights: top-1 agreement {agree:.1%}, "
                  f"max |d log p| {(lp32 - lp).abs().max().item():.3f}")
    if quality_steps > 0:
        trained_quality(quality_steps, n_threads)
    return 0


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
