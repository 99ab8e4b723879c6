"""qkv merge ADAPTER OUT: fold a LoRA adapter into its base model and save a plain model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..chat import TEMPLATE_FILE
from ..checkpoint import load_with_adapter, save
from ..errors import InputError
from ..lora import is_adapter_dir, merge_lora
from .info import describe

ORDER = 41


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model",
        description="Load a base model with a LoRA adapter (from `qkv finetune ... --lora-rank`, "
        "or any PEFT LoRA adapter for qkv's Hugging Face export of the base), add the low-rank "
        "updates to the base weights, and save the result as an ordinary model directory.",
        epilog="examples:\n"
        "  qkv merge runs/gpt-lora runs/gpt-merged              base from adapter_config.json\n"
        "  qkv merge runs/gpt-lora runs/gpt-merged --base runs/gpt\n"
        "  qkv merge runs/gpt-lora runs/gpt-hf --to hf           a Hugging Face directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", help="adapter directory (adapter_config.json)")
    p.add_argument("out", help="directory to write (must be empty or absent, unless --overwrite)")
    p.add_argument("--base", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--to", choices=("qkv", "hf"), default="qkv", help="output format")
    p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                   help="write into a non-empty OUT (replacing a model there)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    adapter, out = Path(args.adapter), Path(args.out)
    if not is_adapter_dir(adapter):
        raise InputError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"{out} is not empty; pass --overwrite to write into it")
    model, tokenizer = load_with_adapter(adapter, args.base)
    merge_lora(model)
    save(model, tokenizer, out, format=args.to)
    if (adapter / TEMPLATE_FILE).is_file():  # the chat template the model was tuned with
        (out / TEMPLATE_FILE).write_text((adapter / TEMPLATE_FILE).read_text(encoding="utf-8"),
                                         encoding="utf-8")
    print(f"wrote {out} ({args.to} format, adapter merged): {describe(model, args.to)}")
    return 0
