"""Decoding speed at batch 1: qkv against Hugging Face `generate`, GPT-2 124M, greedy.

Both libraries build GPT-2 124M with random weights (the speed does not depend on the values),
take the same 32-token prompt and produce 128 new tokens greedily with a KV cache. Hugging Face
runs `model.generate(..., do_sample=False)` in fp32, as people use it; qkv runs
`qkv.generate.decode_tokens` with the weights cast once to bf16 (and, for reference, in fp32).
The timed unit is one whole call (prefill + 128 steps); the libraries alternate in rounds and
each one's best round counts.

bf16 quality: on the same weights, qkv-bf16 and qkv-fp32 score one 160-token sequence
(teacher-forced); the script prints how often their top-1 next tokens agree and the largest
difference of their log-probabilities.

    python benchmarks/bench_decode.py                # about 2 minutes on a 2-core CPU
    python benchmarks/bench_decode.py --rounds 5 --new-tokens 256
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import qkv  # noqa: E402
from qkv.generate import decode_tokens  # noqa: E402
from qkv.train.hardware import set_threads  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: one per idle CPU)")
    args = parser.parse_args()
    set_threads(args.threads)  # default: one per idle CPU (the same for both libraries)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = qkv.presets.get("gpt2-124m")
    fp32 = qkv.Transformer(cfg).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)  # cast once: no per-step casting
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

    runs = {"qkv-bf16": lambda: run_qkv(bf16), "qkv-fp32": lambda: run_qkv(fp32), "HF": run_hf}
    best = dict.fromkeys(runs, 0.0)
    for fn in runs.values():  # warm-up: allocations, kernel choice
        fn()
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            tokens = fn()
            assert len(tokens) == n, (name, len(tokens))
            best[name] = max(best[name], n / (time.perf_counter() - start))

    # bf16 quality: teacher-forced top-1 agreement with fp32 on the same weights.
    with torch.inference_mode():
        sequence = torch.cat((prompt, torch.tensor([run_qkv(fp32)])), dim=1)
        lp32 = fp32(sequence).float().log_softmax(-1)
        lp16 = bf16(sequence).float().log_softmax(-1)
    agree = (lp32.argmax(-1) == lp16.argmax(-1)).float().mean().item()
    same_greedy = run_qkv(bf16) == run_qkv(fp32)
    print(f"decode GPT-2 124M, batch 1, prompt {args.prompt_tokens}, {n} new tokens, greedy, "
          f"{torch.get_num_threads()} threads: qkv-bf16 {best['qkv-bf16']:.1f}, "
          f"qkv-fp32 {best['qkv-fp32']:.1f}, HF-fp32 {best['HF']:.1f} tok/s")
    print(f"  bf16 vs fp32 (random weights): top-1 agreement {agree:.1%}, max |d log p| "
          f"{(lp32 - lp16).abs().max().item():.3f}, same greedy tokens: {same_greedy}")
    print(f"  qkv {best['qkv-bf16']:.1f} tok/s, HF {best['HF']:.1f} tok/s, "
          f"ratio {best['qkv-bf16'] / best['HF']:.2f}  (qkv fp32: ratio "
          f"{best['qkv-fp32'] / best['HF']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
