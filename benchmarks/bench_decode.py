"""Decoding speed at batch 1: qkv against Hugging Face `generate`, GPT-2 124M, greedy.

Both libraries build GPT-2 124M with random weights (the speed does not depend on the values),
take the same 32-token prompt and produce 128 new tokens greedily with a KV cache. Hugging Face
runs `model.generate(..., do_sample=False)` in fp32, as people use it; qkv runs
`qkv.generate.decode_tokens` with the weights in int8 (`qkv.quantize_int8`, FBGEMM kernels,
what `qkv generate --dtype int8` does), int8 weight-only, bf16 and fp32. The timed unit is one
whole call (prefill + 128 steps); the runs alternate in rounds and each one's best round counts.

Quality, two ways:
- on GPT-2 124M's random weights, each format scores one 160-token sequence (teacher-forced)
  against fp32: how often the top-1 next tokens agree, and the largest |d log p|;
- on a *trained* model (the baby config, trained here for --quality-steps updates on tiny
  Shakespeare), the validation loss with fp32, bf16 and int8 weights: the check is that each
  stays within 1% of fp32.

    python benchmarks/bench_decode.py                # about 3 minutes on a 2-core CPU
    python benchmarks/bench_decode.py --rounds 5 --new-tokens 256 --quality-steps 0
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import qkv  # noqa: E402
from qkv.data import BUNDLED, eval_batches, split  # noqa: E402
from qkv.generate import decode_tokens  # noqa: E402
from qkv.hardware import set_threads  # noqa: E402
from qkv.quantize import Int8Linear, quantize_int8, use_matrix_vector  # noqa: E402
from qkv.train import evaluate  # noqa: E402

warnings.filterwarnings("ignore", message=".*quantiz")  # torch's notes on its quantized APIs

FORMATS = ("int8", "int8-weight-only", "bf16", "fp32")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weight matrices one decoding step reads: every linear layer, the output
    layer included (the embedding lookup reads one row, so it does not count)."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.qweight.nbytes + m.scale.nbytes
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.nbytes
    return total


def convert(model: qkv.Transformer, fmt: str) -> qkv.Transformer:
    """A copy of an fp32 model with its weights in `fmt` (one of FORMATS)."""
    model = copy.deepcopy(model)
    if fmt == "int8":
        return quantize_int8(model)  # int8 weights, inputs rounded to int8 on the fly (FBGEMM)
    if fmt == "int8-weight-only":
        return quantize_int8(model.to(torch.bfloat16), activations="float")
    if fmt == "bf16":  # with the opt-in matrix-vector fast path of `qkv generate --dtype bf16`
        return use_matrix_vector(model.to(torch.bfloat16))
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: one per idle CPU)")
    parser.add_argument("--quality-steps", type=int, default=800,
                        help="updates of the baby model trained for the quality check (0: skip)")
    args = parser.parse_args()
    set_threads(args.threads)  # default: one per idle CPU (the same for both libraries)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = qkv.presets.get("gpt2-124m")
    fp32 = qkv.Transformer(cfg).eval()
    models = {fmt: convert(fp32, fmt) for fmt in FORMATS}  # converted once, before timing
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 124M
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens))
    n = args.new_tokens

    def run_qkv(model) -> list[int]:
        return [int(t) for t in decode_tokens(model, prompt.tolist(), n, temperature=0)]

    @torch.inference_mode()
    def run_hf() -> list[int]:
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        return out[0, prompt.shape[1]:].tolist()

    runs = {f"qkv-{fmt}": (lambda m=m: run_qkv(m)) for fmt, m in models.items()}
    runs["HF-fp32"] = run_hf
    best = dict.fromkeys(runs, 0.0)
    for fn in runs.values():  # warm-up: allocations, kernel choice, weight packing
        fn()
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            tokens = fn()
            assert len(tokens) == n, (name, len(tokens))
            best[name] = max(best[name], n / (time.perf_counter() - start))

    print(f"decode GPT-2 124M, batch 1, prompt {args.prompt_tokens}, {n} new tokens, greedy, "
          f"{torch.get_num_threads()} threads (tokens/s, best of {args.rounds} rounds):")
    # Memory read per token: HF's GPT-2 has the same matrices as qkv's fp32 model.
    per_token = {f"qkv-{fmt}": weight_bytes(m) for fmt, m in models.items()}
    per_token["HF-fp32"] = per_token["qkv-fp32"]
    for name, speed in best.items():
        print(f"  {name:22s} {speed:6.1f} tok/s   ratio to HF {speed / best['HF-fp32']:.2f}   "
              f"weights {per_token[name] / 1e6:4.0f} MB/token = "
              f"{per_token[name] * speed / 1e9:4.1f} GB/s")

    # Quality on random weights: teacher-forced top-1 agreement with fp32 on the same weights.
    with torch.inference_mode():
        sequence = torch.cat((prompt, torch.tensor([run_qkv(fp32)])), dim=1)
        lp32 = fp32(sequence).float().log_softmax(-1)
        for fmt in FORMATS[:-1]:
            lp = models[fmt](sequence).float().log_softmax(-1)
            agree = (lp32.argmax(-1) == lp.argmax(-1)).float().mean().item()
            print(f"  {fmt} vs fp32 on random weights: top-1 agreement {agree:.1%}, "
                  f"max |d log p| {(lp32 - lp).abs().max().item():.3f}")
    if args.quality_steps > 0:
        trained_quality(args.quality_steps)
    ratio = best["qkv-int8"] / best["HF-fp32"]
    print(f"qkv {best['qkv-int8']:.1f} tok/s (int8), HF {best['HF-fp32']:.1f} tok/s, "
          f"ratio {ratio:.2f}  (bf16: {best['qkv-bf16'] / best['HF-fp32']:.2f}, "
          f"fp32: {best['qkv-fp32'] / best['HF-fp32']:.2f})")
    return 0


def trained_quality(steps: int) -> None:
    """Train the baby model, then score its validation windows with each weight format."""
    from bench_train import baby_run  # the same recipe as the training benchmark

    with tempfile.TemporaryDirectory() as tmp:
        _, result, wall = baby_run(Path(tmp) / "run", "bf16", None, steps)
        model, _ = qkv.load(Path(tmp) / "run")  # the best checkpoint, fp32
    ids = result.tokenizer.encode(BUNDLED.read_text(encoding="utf-8"))
    _, val = split(np.asarray(ids, dtype=np.int64), 0.1, model.config.max_seq_len)
    batches = eval_batches(val, model.config.max_seq_len, 32, 500)
    losses = {fmt: evaluate(convert(model, fmt), batches, torch.device("cpu"), "fp32")
              for fmt in FORMATS}
    base = losses["fp32"]
    shown = ", ".join(f"{fmt} {loss:.4f} ({100 * (loss - base) / base:+.2f}%)"
                      for fmt, loss in losses.items())
    print(f"  trained baby model ({steps} updates, {wall:.0f} s): val loss {shown}")


if __name__ == "__main__":
    sys.exit(main())
