"""qkv generate DIR --prompt TEXT: continue a prompt with a trained model, streaming the text."""

from __future__ import annotations

import argparse
import sys

import torch

from ..checkpoint import load
from ..errors import InputError
from ..generate import generate
from ..hardware import resolve_device, set_threads
from ..quantize import pack_linears, quantize_int8
from ._args import device, fraction, non_negative_float, positive_int, seed

ORDER = 20


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="continue a prompt with a trained GPT (streams the text)",
        description=(
            "Generate text with a decoder model directory (e.g. one `qkv train` wrote).\n"
            "One prompt streams its continuation as it is produced; several --prompt flags\n"
            "are generated together as one batch."),
        epilog="examples:\n"
        "  qkv generate runs/gpt-char-small --prompt \"ROMEO:\"\n"
        "  qkv generate runs/gpt --prompt \"ROMEO:\" --temperature 0.8 --top-p 0.95 --seed 1\n"
        "  qkv generate runs/gpt --prompt \"To be\" --prompt \"KING:\" --temperature 0\n"
        "  qkv generate runs/gpt --prompt \"ROMEO:\" --stop \"\\n\\n\" --max-new-tokens 500\n"
        "  qkv generate runs/gpt --prompt \"ROMEO:\" --dtype int8   int8 weights: fastest on a CPU",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="text to continue (repeat for a batch; default: a new line)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    p.add_argument("--temperature", type=non_negative_float, default=0.8, metavar="T",
                   help="0 = greedy; < 1 safer, > 1 wilder (default 0.8)")
    p.add_argument("--top-k", type=positive_int, metavar="K",
                   help="sample only among the K most likely tokens")
    p.add_argument("--top-p", type=fraction, metavar="P",
                   help="sample only among the most likely tokens that make up probability P")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop before this text (repeatable; \\n is a new line)")
    p.add_argument("--seed", type=seed, help="make the sampling reproducible")
    p.add_argument("--truncate-left", action="store_true",
                   help="keep the end of a prompt longer than the context (else an error)")
    p.add_argument("--on-full", choices=("slide", "stop"), default="slide",
                   help="when the context is full: slide the window (default) or stop")
    p.add_argument("--device", type=device, default="cpu", metavar="DEVICE",
                   help="auto, cpu (default), cuda, cuda:N or mps")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "int8"),
                   help="weights' number format: bf16 halves the memory read per token; int8 "
                   "(CPU) quarters it and decodes ~2.5x faster than fp32 (see qkv.quantize)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    set_threads()  # one thread per idle CPU
    if args.dtype == "int8" and device.type != "cpu":
        raise InputError(f"--dtype int8 is for decoding on a CPU; on {device.type} use bf16")
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    model, tokenizer = load(args.dir, device=device, dtype=dtype)
    if args.dtype == "int8":
        quantize_int8(model)
    elif args.dtype == "bf16" and device.type == "cpu":
        pack_linears(model)  # weights laid out once for oneDNN's kernel: faster decoding
    if tokenizer is None:
        raise InputError(f"{args.dir} has no tokenizer.json, so its text cannot be encoded")
    prompts = [_unescape(p) for p in (args.prompt or ["\n"])]
    stops = [_unescape(s) for s in args.stop] if args.stop else None
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop=stops, seed=args.seed,
                   truncate_left=args.truncate_left, on_full=args.on_full)
    if len(prompts) == 1:
        shown = []  # the prompt is printed with the first piece: after any error it raises

        def show(piece: str) -> None:
            if not shown:
                shown.append(print(prompts[0], end=""))
            print(piece, end="", flush=True)

        text = generate(model, tokenizer, prompts[0], stream=show, **options)
        if not shown:
            print(prompts[0], end="")
        if not (prompts[0] + str(text)).endswith("\n"):
            print()
        return 0
    texts = generate(model, tokenizer, prompts, **options)
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        print(f"=== {i + 1} ===", file=sys.stderr)
        print(prompt + text)
    return 0


def _unescape(text: str) -> str:
    r"""Let a shell user type "\n" and "\t" for a new line and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")
