"""qkv explain DIR: a local web page that shows what a model computes on your text."""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..explain import load_model
from ..hardware import set_threads

ORDER = 76


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="a local web page that shows inside a model (attention, logits...)",
        description=(
            "Serve a page on 127.0.0.1 that runs the model on your text and shows every\n"
            "stage with the model's own numbers: tokens, embeddings and positions, each\n"
            "head's Q.K -> scaled -> masked -> softmax -> .V, feed-forward activations, the\n"
            "residual stream, the softmax over the full vocabulary with temperature, top-k\n"
            "and top-p, step-by-step generation with the KV cache, a logit lens, fill-mask and\n"
            "class probabilities for encoders, cross-attention for encoder-decoders.\n"
            "Everything the page needs ships with qkv: it works offline."),
        epilog="examples:\n"
        "  qkv explain runs/gpt                 then open http://127.0.0.1:8010/explain\n"
        "  qkv explain all-MiniLM-L6-v2 --port 9000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="model directory (qkv or Hugging Face), or a name such as "
                   "all-MiniLM-L6-v2")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8010, help="port (default 8010)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..explain.app import create_app

    if not 0 <= args.port < 65536:
        raise InputError(f"--port {args.port} is not a port number (0-65535)")
    set_threads()
    model, tokenizer = load_model(args.dir)
    app = create_app((model, tokenizer))
    print(f"qkv explain: http://{args.host}:{args.port}/explain  (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
