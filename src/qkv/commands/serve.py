"""qkv serve DIR: an OpenAI-compatible HTTP server for a model directory (see qkv/serve/)."""

from __future__ import annotations

import argparse
import sys

from ._args import one_line_errors, positive_int

ORDER = 25


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description=(
            "Serve a model directory over HTTP with the OpenAI API: /v1/completions and\n"
            "/v1/chat/completions (decoders; an encoder-decoder translates a completion),\n"
            "/v1/embeddings (encoders), /v1/models, /tokenize and /health.\n"
            "Binds 127.0.0.1 unless --host says otherwise."),
        epilog="examples:\n"
        "  qkv serve runs/gpt                         http://127.0.0.1:8000/v1\n"
        "  qkv serve runs/gpt --api-key \"$KEY\" --port 9000\n"
        "  qkv serve runs/gpt --dtype int8 --max-seqs 4\n"
        "  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\\n"
        "       -d '{\"model\": \"gpt\", \"prompt\": \"ROMEO:\", \"max_tokens\": 50}'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    one_line_errors(p)
    p.add_argument("dir", help="model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require `Authorization: Bearer KEY` on every request (or set "
                   "QKV_API_KEY)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "int8"),
                   help="weights' number format (default auto: bf16 where the CPU computes it "
                   "natively, else fp32; bf16 keeps exact batching on one row for a lone "
                   "stream; int8 decodes fastest on a CPU; fp32 steps at --max-seqs rows)")
    p.add_argument("--model-name", metavar="NAME",
                   help="the model id clients send (default: the directory's name)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template (default: the model directory's, if any)")
    p.add_argument("--max-seqs", type=positive_int, default=8, metavar="N",
                   help="sequences decoded together (default 8)")
    p.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                   help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--max-tokens", type=positive_int, default=4096, metavar="N",
                   help="the largest max_tokens a request may ask for (default 4096)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, metavar="N",
                   help="the largest request body (default 1 MiB)")
    p.add_argument("--exact-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="greedy and seeded text is the same alone or under load (default): "
                   "steps keep the width from which the model's rows are bit-identical, "
                   "measured at start; --no-exact-batching runs only the live rows (and int8 "
                   "on FBGEMM): faster for a lone fp32 or int8 stream, text may vary under load")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="PyTorch threads (default: one per idle CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ..checkpoint import read_config_json
    from ..errors import InputError
    from ..hardware import fast_bf16, set_threads

    try:
        import uvicorn

        from ..serve import create_app, load_served
    except ImportError as e:
        raise InputError(f"qkv serve needs fastapi and uvicorn ({e}); "
                         "pip install fastapi uvicorn jinja2") from None
    from pathlib import Path

    if Path(args.dir).exists():
        read_config_json(Path(args.dir))  # a wrong directory fails now, with one line
    if args.chat_template is not None and not Path(args.chat_template).is_file():
        raise InputError(f"--chat-template {args.chat_template}: no such file")
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port {args.port} must be in 1..65535")
    api_key = args.api_key or os.environ.get("QKV_API_KEY") or None
    set_threads(args.threads)
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def load():
        dtype = args.dtype
        if dtype == "auto":
            dtype = "bf16" if fast_bf16("cpu") else "fp32"
        return load_served(args.dir, dtype, args.model_name, args.chat_template,
                           exact=args.exact_batching)

    def on_load_error(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(load, api_key=api_key, max_seqs=args.max_seqs, max_queue=args.max_queue,
                     max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes,
                     on_load_error=on_load_error, exact_batching=args.exact_batching)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    if failed:  # the model failed before the server existed
        server.should_exit = True
    print(f"qkv serve: {args.dir} on http://{args.host}:{args.port}/v1 "
          f"({'key required' if api_key else 'no key'}); Ctrl-C stops", file=sys.stderr,
          flush=True)
    server.run()
    if failed:
        e = failed[0]
        raise InputError(f"the model failed to load: {e}") from None
    return 0
