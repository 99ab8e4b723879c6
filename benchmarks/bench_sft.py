"""SFT with LoRA: qkv against transformers + peft, same shape, batch, data and precision.

    python benchmarks/bench_sft.py            # GPT-2 124M shape, LoRA r=16, GSM8K examples
    python benchmarks/bench_sft.py --quick    # a smoke run on a tiny shape (seconds)

Both sides train the same model (qkv builds it with random weights and writes its Hugging Face
export; transformers loads that export), with a LoRA of rank 16, alpha 32 on the fused
attention projection (GPT-2's `c_attn`, qkv's target `qkv`), on the same batches of GSM8K
question/answer pairs (benchmarks/data/gsm8k_qa), with the loss on the answer tokens only and
AdamW on the LoRA matrices. One update = forward, backward, optimizer step.

Each contender runs in its own process, so that its peak memory (the process's maximum
resident set size) is its own. The contenders: qkv and transformers+peft in fp32, and both
under bf16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)` for transformers, the
one-line setting its users write). qkv's worker does what its training loop does: the frozen
base weights held in bf16, the attention kernel chosen by sequence length. Every process does
`--warmup` untimed updates, then `--steps` timed ones; `--rounds` rounds (3), the order of the
processes reversed every other round, and each contender's best round counts. Printed:
tokens/s (answer and prompt tokens, no padding) and peak memory, and qkv's ratio to each peer,
then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import DATA, autocast, print_table, threads

import qkv
from qkv.data.sft import default_template, encode_sft, make_batch, read_sft
from qkv.hardware import hold_frozen_weights, training_attention
from qkv.lora import apply_lora
from qkv.tasks.sft import sft_loss
from qkv.train.optim import make_optimizer

HERE = Path(__file__).resolve().parent


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


# ---------------------------------------------------------------------- the worker processes

def worker(args: argparse.Namespace) -> None:
    """One contender: load the export, add LoRA, time the updates; print a JSON line."""
    threads(args.threads)
    batches = [tuple(torch.tensor(t) for t in b) for b in json.loads(
        Path(args.work, "batches.json").read_text())]
    base_rss = rss_mb()
    side, precision = args.worker.split(":")
    if side == "qkv":
        model, _ = qkv.load(Path(args.work) / "hf")
        apply_lora(model, rank=16, alpha=32, targets="qkv")
        model.train()
        hold_frozen_weights(model, precision)  # as qkv's training loop does (bf16 only)
        optimizer = make_optimizer(model, 1e-4, 0.0, betas=(0.9, 0.999), fused=True)

        def loss_of(batch):
            return sft_loss(model, batch)

        def context():
            return autocast(torch.device("cpu"), precision)

        def kernels(batch):  # the attention kernel qkv's loop picks for this length
            return training_attention(torch.device("cpu"), precision, batch[0].shape[-1])
    else:
        import peft
        import transformers

        hf = transformers.GPT2LMHeadModel.from_pretrained(Path(args.work) / "hf")
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn"],
                                 lora_dropout=0.0, fan_in_fan_out=True, bias="none")
        model = peft.get_peft_model(hf, config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)

        def loss_of(batch):
            x, y, _, segments = batch
            logits = model(input_ids=x, attention_mask=(segments > 0).long()).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

        def context():
            if precision == "bf16":
                return torch.autocast("cpu", dtype=torch.bfloat16)
            return torch.autocast("cpu", enabled=False)

        def kernels(batch):
            return contextlib.nullcontext()
    loaded_rss = rss_mb()

    def update(batch):
        with kernels(batch):  # around the backward pass too
            with context():
                loss = loss_of(batch)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for i in range(args.warmup):
        update(batches[i % len(batches)])
    tokens, start, losses = 0, time.perf_counter(), []
    for i in range(args.steps):
        batch = batches[(args.warmup + i) % len(batches)]
        losses.append(update(batch))
        tokens += int((batch[3] > 0).sum())
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"tokens_per_s": tokens / seconds, "peak_rss_mb": rss_mb(),
                      "base_rss_mb": base_rss, "loaded_rss_mb": loaded_rss,
                      "trainable": trainable, "first_loss": losses[0]}))


# ---------------------------------------------------------------------- the parent

def prepare(args: argparse.Namespace, work: Path) -> dict:
    """The model's export and the batches, written once for every contender."""
    data = read_sft(args.data)
    texts = [e.messages[0]["content"] + " " + e.messages[1]["content"]  # type: ignore[index]
             for e in data.examples]
    tok = qkv.Tokenizer.train(texts, kind="bpe", vocab_size=args.tokenizer_vocab)
    if args.quick:
        cfg = qkv.presets.get("gpt2-124m", d_model=64, n_layers=2, n_heads=4, max_seq_len=512)
    else:
        cfg = qkv.presets.get("gpt2-124m", max_seq_len=1024)
    torch.manual_seed(0)
    model = qkv.Transformer(cfg)
    qkv.save(model, None, work / "hf", format="hf")
    enc = encode_sft(data, tok, default_template(tok), args.max_length)
    n = args.batch_size
    batches = [make_batch(enc.ids, enc.masks, [[j] for j in range(i, i + n)], tok.pad_id or 0)
               for i in range(0, min(len(enc), n * (args.steps + args.warmup)) - n + 1, n)]
    (work / "batches.json").write_text(json.dumps([[t.tolist() for t in b] for b in batches]))
    lengths = [len(x) for x in enc.ids]
    return {"examples": len(enc), "mean_tokens": sum(lengths) / len(lengths),
            "max_tokens": max(lengths), "batches": len(batches), "d_model": cfg.d_model,
            "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shape, few steps: a smoke run")
    p.add_argument("--data", default=str(DATA / "gsm8k_qa" / "train_512.jsonl"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tokenizer-vocab", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of every contender, in alternating order; each one's best counts")
    p.add_argument("--contenders", default="qkv:fp32,hf:fp32,qkv:bf16,hf:bf16")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.steps, args.warmup, args.batch_size = 3, 1, 2
        args.max_length, args.tokenizer_vocab = 256, 1000
    contenders = args.contenders.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = prepare(args, work)
        results: dict[str, list[dict]] = {c: [] for c in contenders}
        for r in range(args.rounds):
            for c in contenders if r % 2 == 0 else reversed(contenders):
                cmd = [sys.executable, __file__, "--worker", c, "--work", str(work),
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    return 1
                results[c].append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {c: max(rs, key=lambda x: x["tokens_per_s"]) for c, rs in results.items()}
    names = {c: ("qkv" if c.startswith("qkv") else "transformers+peft") + " " + c.split(":")[1]
             for c in contenders}
    print(f"SFT, LoRA r=16 on c_attn, GPT-2 shape d={shape['d_model']} x {shape['n_layers']} "
          f"layers, batch {args.batch_size}, {shape['mean_tokens']:.0f} tokens per example on "
          f"average (max {shape['max_tokens']}), {args.steps} timed updates")
    print_table("training speed (higher is better)",
                {names[c]: best[c]["tokens_per_s"] for c in contenders}, "tokens/s")
    print_table("peak memory, whole process (lower is better)",
                {names[c]: min(x["peak_rss_mb"] for x in results[c]) for c in contenders}, "MB",
                lower_is_better=True)
    print(json.dumps({"shape": shape, "settings": {k: v for k, v in vars(args).items()
                                                   if k not in ("worker", "work")},
                      "results": {names[c]: best[c] for c in contenders}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
