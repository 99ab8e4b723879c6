"""qkv attention DIR TEXT --out maps.png: draw a model's attention maps on a text."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..explain import capture, load_model, plots

ORDER = 75


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention", help="draw the attention maps of a model on a text (PNG, SVG, .npz)",
        description=(
            "Run a model once on TEXT and draw its attention weights with matplotlib:\n"
            "every layer x head as thumbnails, one layer's heads (--layer), or one head in\n"
            "full with its tokens (--layer and --head). An encoder-decoder's cross-attention\n"
            "layers draw the source x target alignment. --npz also saves every captured\n"
            "tensor (attention stages, embeddings, residual stream, FF activations, logits)."),
        epilog="examples:\n"
        "  qkv attention runs/gpt \"ROMEO: what\" --out maps.png\n"
        "  qkv attention runs/gpt \"ROMEO: what\" --out head.svg --layer 1 --head 3\n"
        "  qkv attention runs/marian \"Hello world\" --out align.png "
        "--layer decoder.layers.0.cross_attn --head 0\n"
        "  qkv attention runs/bert \"the [MASK] sat\" --out maps.png --npz maps.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="model directory (qkv or Hugging Face), or a name such as "
                   "all-MiniLM-L6-v2")
    p.add_argument("text", help="the text to read (the source, for an encoder-decoder)")
    p.add_argument("--out", required=True, metavar="FILE", help="the picture: .png or .svg")
    p.add_argument("--layer", metavar="L", help="an attention layer: its index in the order "
                   "the model runs them, or its name (qkv attention --list shows them)")
    p.add_argument("--head", type=int, metavar="H", help="one head, drawn in full (needs --layer)")
    p.add_argument("--target", metavar="TEXT", help="encoder-decoder: the target text "
                   "(default: the model's own greedy translation)")
    p.add_argument("--npz", metavar="FILE", help="also save every captured tensor here")
    p.add_argument("--list", action="store_true", help="print the attention layers' names")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.head is not None and args.layer is None:
        raise InputError("--head needs --layer (which layer's head to draw)")
    out = plots.check_out(args.out)
    if args.npz and Path(args.npz).suffix != ".npz":
        raise InputError(f"{args.npz}: name the tensor file .npz")
    model, tokenizer = load_model(args.dir)
    cap = capture(model, tokenizer, args.text, target=args.target)
    if args.list:
        for i, name in enumerate(cap.layers()):
            print(f"{i:3d}  {name}  {tuple(cap.attention[name].shape)}")
    if args.head is not None:
        plots.head(cap, out, args.layer, args.head)
    else:
        plots.grid(cap, out, args.layer)
    print(f"wrote {out} ({len(cap.tokens)} tokens, {len(cap.layers())} attention layers)")
    if args.npz:
        print(f"wrote {cap.save_npz(args.npz)}")
    return 0
