"""qkv classify DIR TEXT...: the label and probability of each text."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError
from ..pipelines import pipeline
from ._args import positive_int

ORDER = 42


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="label texts with a fine-tuned classifier",
        description="Print the predicted label and its probability for each text, using a "
        "model fine-tuned with `qkv finetune classify`.",
        epilog='example:  qkv classify runs/sst2 "a gripping film" "tedious and flat"\n'
        "          cat reviews.txt | qkv classify runs/sst2 -",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="model directory with a classification head")
    p.add_argument("texts", nargs="+", metavar="TEXT",
                   help="texts to classify; - reads one text per line from standard input")
    p.add_argument("--top-k", type=positive_int, default=1,
                   help="labels to show per text (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="texts per batch (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    texts = []
    for t in args.texts:
        texts += [line for line in sys.stdin.read().splitlines() if line.strip()] if t == "-" \
            else [t]
    if not texts:
        raise InputError("no text to classify")
    clf = pipeline("text-classification", model=args.dir, batch_size=args.batch_size)
    results = clf(texts, top_k=args.top_k)
    for text, result in zip(texts, results, strict=True):
        ranked = result if isinstance(result, list) else [result]
        if args.json:
            print(json.dumps({"text": text, "labels": ranked}, ensure_ascii=False))
        else:
            labels = "  ".join(f"{r['label']} {r['score']:.4f}" for r in ranked)
            print(f"{labels}\t{text}")
    return 0
