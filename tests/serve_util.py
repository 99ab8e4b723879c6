"""Tiny models and a live server for the `qkv serve` tests (random weights, char tokenizer)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import torch

import qkv
from qkv.chat import ChatTemplate
from qkv.serve import Served, create_app

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?:;'\n0123456789<>|/"
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def char_tokenizer() -> qkv.Tokenizer:
    return qkv.Tokenizer.train([ALPHABET], kind="char")


def tiny_decoder(context: int = 128, seed: int = 0, eos_bias: float = -30.0,
                 **overrides) -> tuple[qkv.Transformer, qkv.Tokenizer]:
    """A random decoder whose greedy text is varied (spread-out logits) and never special:
    <pad> and <unk> are forbidden by the output bias; the end-of-text token gets `eos_bias`."""
    tok = char_tokenizer()
    torch.manual_seed(seed)
    base = dict(family="decoder", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4,
                max_seq_len=context, tie_embeddings=False, lm_head_bias=True)
    cfg = qkv.ModelConfig(**{**base, **overrides})
    model = qkv.Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
        model.lm_head.bias.zero_()
        model.lm_head.bias[[tok.pad_id, tok.unk_id]] = -1e4
        model.lm_head.bias[tok.eos_id] = eos_bias
    return model, tok


def tiny_encoder() -> tuple[qkv.Transformer, qkv.Tokenizer]:
    tok = char_tokenizer()
    torch.manual_seed(1)
    cfg = qkv.ModelConfig(family="encoder", vocab_size=tok.vocab_size, d_model=32, n_layers=2,
                          n_heads=4, max_seq_len=64, pooling="mean", normalize_embeddings=True)
    return qkv.Transformer(cfg).eval(), tok


def tiny_seq2seq() -> tuple[qkv.Transformer, qkv.Tokenizer]:
    tok = char_tokenizer()
    torch.manual_seed(2)
    cfg = qkv.ModelConfig(family="encoder-decoder", vocab_size=tok.vocab_size, d_model=32,
                          n_layers=2, n_heads=4, max_seq_len=64, bos_token_id=tok.bos_id,
                          eos_token_id=tok.eos_id, decoder_start_token_id=tok.bos_id)
    return qkv.Transformer(cfg).eval(), tok


def served_decoder(name: str = "tiny", template: bool = True, **kw) -> Served:
    model, tok = tiny_decoder(**kw)
    return Served(model, tok, name, ChatTemplate(TEMPLATE) if template else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Run `app` (any ASGI app) under uvicorn in a thread on a free loopback port; yield its
    base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        state = getattr(app.state, "qkv", None)  # qkv serve's app: stop its engine
        if state is not None:
            state.close()


def make_app(served: Served | None = None, **kw):
    return create_app(served or served_decoder(), **kw)
