"""qkv fill-mask DIR TEXT: the most likely words for each [MASK] of a text."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoint import read_config_json
from ..hub import resolve
from ..pipelines import pipeline
from ..tasks.mlm import fill_mask
from ._args import positive_int

ORDER = 44


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fill-mask",
        help="predict the hidden words of a text ([MASK]) with a masked-LM encoder",
        description="Print the top-k tokens, with probabilities, for each [MASK] in the text, "
        "using an encoder trained with masked language modelling (a BERT).",
        epilog='example:  qkv fill-mask runs/bert "Transformers changed [MASK] language '
        'processing." --top-k 5',
    )
    p.add_argument("dir", help="encoder model directory (with its tokenizer)")
    p.add_argument("text", help="text with one or more [MASK] tokens")
    p.add_argument("--top-k", type=positive_int, default=5,
                   help="candidates per [MASK] (default 5)")
    p.add_argument("--json", action="store_true", help="print the candidates as JSON")
    p.set_defaults(func=run)


def _has_trained_mlm_head(path: str) -> bool:
    """False for a Hugging Face checkpoint saved without its masked-LM head (e.g. BertModel)."""

    folder = Path(path) if Path(path).exists() else resolve(path)
    raw = read_config_json(folder)
    if "model_type" not in raw:
        return True  # a qkv directory: its lm_head is part of what was trained
    return any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in raw.get("architectures", []))


def run(args: argparse.Namespace) -> int:
    fill = pipeline("fill-mask", model=args.dir)
    if not _has_trained_mlm_head(args.dir):
        print(f"qkv fill-mask: warning: {args.dir} has no trained masked-LM head (its "
              "architecture is not *ForMaskedLM); the predictions are not meaningful",
              file=sys.stderr)
    per_mask = fill_mask(fill.model, fill.tokenizer, args.text, top_k=args.top_k)
    if args.json:
        print(json.dumps(per_mask, ensure_ascii=False, indent=2))
        return 0
    for n, candidates in enumerate(per_mask, 1):
        if len(per_mask) > 1:
            print(f"[MASK] {n}:")
        for rank, c in enumerate(candidates, 1):
            print(f"{rank:3d}. {c['token_str']:<16} {c['score']:.4f}  {c['sequence']}")
    return 0
