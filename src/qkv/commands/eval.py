"""qkv eval DIR --data FILE: how well a language model predicts a text (loss, perplexity);
qkv eval DIR --src FILE --ref FILE: the BLEU of a translator (commands/translate.py)."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from ..checkpoint import load
from ..data import corpus_files, eval_batches, fingerprint, tokenize_corpus
from ..errors import InputError
from ..hardware import resolve_device, resolve_precision, set_threads
from ..train import evaluate
from ._args import device, positive_int
from .translate import add_bleu_flags, run_bleu

ORDER = 30


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="perplexity of a trained GPT on a text file",
        description=(
            "Evaluate a decoder model directory on UTF-8 text: the mean next-token\n"
            "cross-entropy (nats per token) and the perplexity exp(loss), the number of\n"
            "equally likely tokens the model is, on average, choosing between. The text is\n"
            "cut into windows of the model's context; every position of every window counts."),
        epilog="examples:\n"
        "  qkv eval runs/gpt-char-small --data held_out.txt\n"
        "  qkv eval runs/gpt --data books/ --max-windows 2000 --precision bf16\n"
        "  qkv eval runs/de-en --src test.de --ref test.en      BLEU, lowercased BLEU, chrF",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="model directory with tokenizer.json")
    p.add_argument("metric", nargs="?", default="perplexity", choices=("perplexity",),
                   help="what to measure (default perplexity)")
    p.add_argument("--data", metavar="PATH",
                   help="UTF-8 text file or folder (default: the bundled tiny Shakespeare)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N")
    p.add_argument("--max-windows", type=positive_int, default=1000, metavar="N",
                   help="evaluate at most N windows, spread evenly over the text")
    p.add_argument("--device", type=device, default="cpu", metavar="DEVICE",
                   help="auto, cpu (default), cuda, cuda:N or mps")
    p.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp32"))
    add_bleu_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.src or args.ref:  # a translator: BLEU
        return run_bleu(args)
    if args.ensemble:
        raise InputError("--ensemble applies to a translator's BLEU (--src FILE --ref FILE)")
    device = resolve_device(args.device)
    set_threads()  # one thread per idle CPU
    precision = resolve_precision(args.precision, device)
    files = corpus_files(args.data)
    corpus_hash = fingerprint(files)
    model, tokenizer = load(args.dir, device=device)
    if model.config.family != "decoder":
        raise InputError(f"{args.dir} is an {model.config.family} model; perplexity needs a "
                         "decoder (GPT-style) model")
    if tokenizer is None:
        raise InputError(f"{args.dir} has no tokenizer.json, so the text cannot be encoded")
    context = model.config.max_seq_len
    with tempfile.TemporaryDirectory(prefix="qkv-eval-") as tmp:
        ids = tokenize_corpus(files, tokenizer, Path(tmp), corpus_hash)
        if len(ids) < 2:
            raise InputError("the text is too short: it needs at least 2 tokens")
        window = min(context, len(ids) - 1)
        batches = eval_batches(ids, window, args.batch_size, args.max_windows)
        loss = evaluate(model, batches, device, precision)
        scored = sum(y.numel() for _, y in batches)
        del ids
    print(f"loss {loss:.4f} nats/token, perplexity {math.exp(loss):.3f}, "
          f"{loss / math.log(2):.4f} bits/token ({scored:,} tokens in windows of {window})")
    return 0
