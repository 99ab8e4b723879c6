"""qkv info DIR: what a model directory holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint import load, read_config_json
from ..hub import resolve

ORDER = 90


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="print the family, size and config of a model directory",
        description="Print the family, parameter count and config of a qkv or Hugging Face "
        "model directory.",
        epilog="example:  qkv info runs/gpt",
    )
    p.add_argument("dir", help="model directory (config.json + model.safetensors), or a name "
                   "such as all-MiniLM-L6-v2")
    p.add_argument("--json", action="store_true", help="print the config as JSON only")
    p.set_defaults(func=run)


def describe(model, source: str) -> str:
    """One line: family, source architecture, parameter count."""
    n = model.num_parameters()
    size = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
    return f"{model.config.family}, {source}, {size} parameters ({n:,})"


def run(args: argparse.Namespace) -> int:
    path = args.dir

    if not Path(path).exists():
        path = resolve(path)
    raw = read_config_json(Path(path))
    model, tokenizer = load(path)
    if args.json:
        print(json.dumps(model.config.to_dict(), indent=2))
        return 0
    print(describe(model, raw.get("model_type", "qkv")))
    if tokenizer is not None:
        print(f"tokenizer: {tokenizer.kind}, {tokenizer.vocab_size} tokens")
    print("config:")
    for key, value in model.config.to_dict().items():
        print(f"  {key:24s} {value}")
    return 0
