"""qkv convert SRC DST: a Hugging Face model directory to qkv's format, or back."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import load, read_config_json, save
from ..errors import InputError
from ..hub import resolve
from .info import describe

ORDER = 80


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a model directory between Hugging Face and qkv formats",
        description="Convert a model directory. A Hugging Face directory (its config.json has "
        "model_type) becomes a qkv directory; a qkv directory becomes a Hugging Face one that "
        "transformers' from_pretrained() loads. The numbers do not change.",
        epilog="examples:\n"
        "  qkv convert all-MiniLM-L6-v2 runs/minilm          Hugging Face -> qkv\n"
        "  qkv convert runs/gpt runs/gpt-hf                  qkv -> Hugging Face\n"
        "  qkv convert runs/gpt runs/gpt-hf --to hf --force  overwrite DST",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="model directory, or a name such as all-MiniLM-L6-v2")
    p.add_argument("dst", help="directory to write (must be empty or absent, unless --force)")
    p.add_argument("--to", choices=("hf", "qkv"), default=None,
                   help="output format (default: the other one than SRC's)")
    p.add_argument("--force", action="store_true", help="write into a non-empty DST")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if not src.exists():
        src = resolve(args.src)
    is_hf = "model_type" in read_config_json(src)
    to = args.to or ("qkv" if is_hf else "hf")
    dst = Path(args.dst)
    if dst.exists() and not dst.is_dir():
        raise InputError(f"{dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not args.force:
        raise InputError(f"{dst} is not empty; pass --force to write into it")
    if dst.resolve() == src.resolve():
        raise InputError("SRC and DST are the same directory")
    model, tokenizer = load(src)
    save(model, tokenizer, dst, format=to)
    kind = read_config_json(dst).get("model_type", "qkv")
    print(f"wrote {dst} ({to} format): {describe(model, kind)}")
    if tokenizer is None:
        print("note: SRC has no tokenizer, so none was written")
    return 0
