"""The web explainer: a FastAPI router that serves one page and the model's own tensors.

    app = FastAPI(); app.include_router(explain_router((model, tokenizer)))   # at /explain
    qkv explain DIR                                      # the same, served on 127.0.0.1

The page (static/index.html, explain.js, explain.css: hand-written, vendored in the package,
nothing fetched from elsewhere) asks this API for what it draws:

    GET  /explain                          the page
    GET  /explain/static/{file}            its script and style sheet
    GET  /explain/api/model                family, sizes, labels, special tokens
    GET  /explain/api/vocab                every token's text, in id order
    POST /explain/api/capture              run the model on a text: tokens, layers, norms (JSON)
    GET  /explain/api/{id}/attention       one layer's stage, all heads or one: binary float32
    GET  /explain/api/{id}/thumbs          every layer x head, pooled to at most N x N: binary
    GET  /explain/api/{id}/tensor          embeddings, positions, residual, FF activations: binary
    GET  /explain/api/{id}/probs           softmax over the full vocabulary after temperature,
                                           top-k and top-p: binary float32 (V,)
    GET  /explain/api/{id}/lens            logit lens: the top tokens at every layer (JSON)
    POST /explain/api/sample               the next token `qkv generate` draws with a seed
    POST /explain/api/steps                step-by-step generation with the KV cache growing
    GET  /explain/api/{id}/export.html     the page, its script and the data in one file

Binary answers are little-endian float32 with their shape in the X-Shape header ("12,40,40"),
so the page reads them with one Float32Array and draws them on a <canvas>.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from ..baselines import RNNTranslator
from ..errors import QkvError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .capture import STAGES, Capture, capture, draw_next, replay_steps

Model = Transformer | RNNTranslator  # a recurrent translator shows its Bahdanau alignment
Source = tuple[Model, Tokenizer] | Callable[[], tuple[Model, Tokenizer] | None] | None
STATIC = {"explain.js": "text/javascript", "explain.css": "text/css"}
KEPT = 4  # captures kept in memory for the page's lazy requests
MAX_STEPS = 64


class CaptureRequest(BaseModel):
    text: str = Field(max_length=200_000)
    target: str | None = Field(default=None, max_length=200_000)


class Sampling(BaseModel):
    id: str
    temperature: float = Field(default=1.0, ge=0)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None


class StepsRequest(Sampling):
    steps: int = Field(default=8, ge=1, le=MAX_STEPS)


def _static(name: str) -> str:
    return (resources.files("qkv.explain") / "static" / name).read_text(encoding="utf-8")


def binary(array: torch.Tensor | np.ndarray) -> Response:
    a = np.ascontiguousarray(torch.as_tensor(array).detach().float().cpu().numpy(), "<f4")
    return Response(a.tobytes(), media_type="application/octet-stream",
                    headers={"X-Shape": ",".join(map(str, a.shape)),
                             "Access-Control-Expose-Headers": "X-Shape"})


def model_info(model: Model, tokenizer: Tokenizer) -> dict[str, Any]:
    special = sorted({i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                                  tokenizer.cls_id, tokenizer.sep_id, tokenizer.unk_id,
                                  tokenizer.mask_id) if i is not None})
    if isinstance(model, RNNTranslator):
        c = model.config
        return {"family": "rnn", "vocab_size": c.vocab_size, "cell": c.cell,
                "attention": c.attention, "n_layers": c.n_layers, "d_hidden": c.d_hidden,
                "max_seq_len": c.max_seq_len, "labels": [], "special_ids": special,
                "mask_id": None, "parameters": model.num_parameters()}
    cfg = model.config
    return {"family": cfg.family, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
            "n_heads": cfg.n_heads, "n_encoder_layers": cfg.n_encoder_layers,
            "n_decoder_layers": cfg.n_decoder_layers, "max_seq_len": cfg.max_seq_len,
            "position": cfg.position, "norm": cfg.norm, "norm_placement": cfg.norm_placement,
            "activation": cfg.activation, "labels": list(cfg.labels), "special_ids": special,
            "mask_id": tokenizer.mask_id, "parameters": model.num_parameters()}


def describe(cid: str, cap: Capture, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """The JSON half of a capture: everything small; matrices come later, in binary."""
    layers = []
    for name, w in cap.attention.items():
        layers.append({"name": name, "heads": w.shape[0], "tq": w.shape[1], "tk": w.shape[2],
                       "cross": "cross" in name or cap.family in ("alignment", "rnn"),
                       "stack": name.split(".")[0]})
    norms = {k: v.tolist() for k, v in cap.norms.items()}
    tensors = {}
    for group, items in (("token_embedding", cap.token_embedding), ("position", cap.position),
                         ("residual", cap.residual), ("ffn", cap.ffn)):
        for k, v in items.items():
            tensors[f"{group}/{k}"] = {"shape": list(v.shape),
                                       "norm": v.norm(dim=-1).tolist()}
    mask_id = tokenizer.mask_id if tokenizer is not None else None
    fill = []
    if cap.family == "encoder" and tokenizer and mask_id is not None and cap.logits is not None:
        for pos, i in enumerate(cap.ids):
            if i == mask_id:
                p = cap.logits[pos].softmax(-1)
                top = p.topk(min(5, p.shape[0]))
                fill.append({"position": pos,
                             "candidates": _ranked(tokenizer, top.values, top.indices)})
    return {"id": cid, "family": cap.family, "tokens": cap.tokens, "ids": cap.ids,
            "target_tokens": cap.target_tokens, "target_ids": cap.target_ids,
            "layers": layers, "stages": list(STAGES) if cap.inputs else ["weights"],
            "tensors": tensors, "norms": norms,
            "residual_keys": list(cap.residual), "classes": cap.classes, "fill_mask": fill,
            "position_kind": cap.position_kind,
            "logit_positions": 0 if cap.logits is None else cap.logits.shape[0]}


def thumbnails(cap: Capture, size: int) -> torch.Tensor:
    """(n_layers, max_heads, s, s): each map average-pooled to at most size x size."""
    s = max(min(size, max(max(w.shape[1], w.shape[2]) for w in cap.attention.values())), 1)
    n_heads = max(w.shape[0] for w in cap.attention.values())
    out = torch.zeros(len(cap.attention), n_heads, s, s)
    for i, w in enumerate(cap.attention.values()):
        out[i, : w.shape[0]] = F.adaptive_avg_pool2d(w[None], (s, s))[0]
    return out


class Explainer:
    """The explainer's state (the model, its tokenizer, the latest captures) and its routes:
    each endpoint is a method, registered by `router()`."""

    def __init__(self, source: Source, prefix: str = "/explain"):
        self.source, self.prefix = source, prefix
        self.captures: OrderedDict[str, Capture] = OrderedDict()
        self.lock = threading.Lock()  # one forward pass at a time
        self.counter = 0

    def router(self) -> APIRouter:
        router = APIRouter(prefix=self.prefix)
        get = {"": self.index, "/static/{name}": self.static, "/api/model": self.info,
               "/api/vocab": self.vocab, "/api/{cid}/attention": self.attention,
               "/api/{cid}/thumbs": self.thumbs, "/api/{cid}/tensor": self.tensor,
               "/api/{cid}/probs": self.probs, "/api/{cid}/lens": self.lens,
               "/api/{cid}/export.html": self.export,
               "/api/{cid}": self.describe}  # last: after /api/model and /api/vocab
        for path, endpoint in get.items():
            html = path in ("", "/api/{cid}/export.html")
            router.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False,
                                 response_class=HTMLResponse if html else JSONResponse)
        for path, endpoint in {"/api/capture": self.capture, "/api/sample": self.sample,
                               "/api/steps": self.steps}.items():
            router.add_api_route(path, endpoint, methods=["POST"], include_in_schema=False)
        return router

    # ------------------------------------------------------------------ state
    def loaded(self) -> tuple[Model, Tokenizer]:
        pair = self.source() if callable(self.source) else self.source
        if pair is None or pair[0] is None:
            raise HTTPException(503, "the model is still loading")
        return pair

    def get(self, cid: str) -> Capture:
        if cid not in self.captures:
            raise HTTPException(404, f"no capture {cid!r} (the server keeps the last {KEPT}); "
                                "run the text again")
        return self.captures[cid]

    def add(self, cap: Capture) -> str:
        """Keep a capture for the page; returns its id. A capture made elsewhere (an RNN's
        alignment from `qkv.explain.alignment`) opens at {prefix}?capture={id}."""
        self.counter += 1
        cid = f"c{self.counter}"
        self.captures[cid] = cap
        while len(self.captures) > KEPT:
            self.captures.popitem(last=False)
        return cid

    def page(self, inline: dict | None = None) -> str:
        html = _static("index.html")
        if inline is not None:  # one file: style, script and data inlined
            data = json.dumps(inline).replace("</", "<\\/")
            html = html.replace('<link rel="stylesheet" href="{{PREFIX}}/static/explain.css">',
                                f"<style>{_static('explain.css')}</style>")
            script = _static("explain.js").replace("</", "<\\/")
            html = html.replace('<script src="{{PREFIX}}/static/explain.js"></script>',
                                f"<script>window.QKV_INLINE = {data};</script>\n"
                                f"<script>{script}</script>")
        return html.replace("{{PREFIX}}", self.prefix)

    # ------------------------------------------------------------------ routes
    def index(self) -> HTMLResponse:
        return HTMLResponse(self.page())

    def static(self, name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(_static(name), media_type=STATIC[name])

    def info(self) -> dict[str, Any]:
        if self.source is None:  # an explainer of ready-made captures (alignments) only
            return {"family": "none", "special_ids": [], "mask_id": None}
        return model_info(*self.loaded())

    def describe(self, cid: str) -> dict[str, Any]:
        """A capture already made (by the page, or added with `add`, e.g. an alignment)."""
        cap = self.get(cid)
        tokenizer = None if self.source is None else self.loaded()[1]
        return describe(cid, cap, tokenizer)

    def vocab(self) -> list[str]:
        model, tokenizer = self.loaded()
        return [tokenizer.id_to_token(i) or "" for i in range(model.config.vocab_size)]

    def capture(self, body: CaptureRequest) -> dict[str, Any]:
        model, tokenizer = self.loaded()
        with self.lock:
            cap = _qkv(lambda: capture(model, tokenizer, body.text, body.target))
        return describe(self.add(cap), cap, tokenizer)

    def attention(self, cid: str, layer: str, stage: str = "weights",
                  head: str = "all") -> Response:
        cap = self.get(cid)
        if stage not in STAGES:
            raise HTTPException(400, f"stage must be one of {', '.join(STAGES)}")
        if head == "mean":  # the average over heads
            return binary(_qkv(lambda: cap.stages(layer))[stage].mean(0, keepdim=True))
        h = None if head == "all" else _int(head, "head")
        stages = _qkv(lambda: cap.stages(layer, h))
        if stage not in stages:
            raise HTTPException(400, f"this capture has no {stage!r} stage")
        return binary(stages[stage])

    def thumbs(self, cid: str, size: int = 64) -> Response:
        return binary(thumbnails(self.get(cid), max(4, min(size, 256))))

    def tensor(self, cid: str, name: str) -> Response:
        cap = self.get(cid)
        group, _, key = name.partition("/")
        groups = {"token_embedding": cap.token_embedding, "position": cap.position,
                  "residual": cap.residual, "ffn": cap.ffn}
        if key not in groups.get(group, {}):
            raise HTTPException(404, f"no tensor {name!r}")
        return binary(groups[group][key])

    def probs(self, cid: str, position: int = -1, temperature: float = 1.0,
              top_k: int | None = None, top_p: float | None = None,
              raw: bool = False) -> Response:
        cap = self.get(cid)
        if cap.logits is None or not -cap.logits.shape[0] <= position < cap.logits.shape[0]:
            raise HTTPException(400, f"position {position} has no logits")
        if raw:
            return binary(cap.logits[position])
        return binary(_qkv(lambda: cap.probs(position, temperature, top_k, top_p)))

    def lens(self, cid: str, position: int = -1, k: int = 5) -> list[dict[str, Any]]:
        cap = self.get(cid)
        _, tokenizer = self.loaded()
        rows = []
        output = "decoder" if cap.family in ("decoder", "encoder-decoder") else "encoder"
        for key in (k for k in cap.residual if k.startswith(output)):  # the logits' stack
            p = _qkv(lambda key=key: cap.lens(key, position)).softmax(-1)  # (V,)
            top = p.topk(max(1, min(k, p.shape[0])))
            rows.append({"layer": key, "top": _ranked(tokenizer, top.values, top.indices)})
        return rows

    def sample(self, body: Sampling) -> dict[str, Any]:
        cap = self.get(body.id)
        model, tokenizer = self.loaded()
        if cap.family != "decoder" or not isinstance(model, Transformer):
            raise HTTPException(400, "drawing a next token needs a decoder model")
        with self.lock:
            token = _qkv(lambda: draw_next(model, cap.ids, body.temperature, body.top_k,
                                           body.top_p, body.seed))
        return {"id": token, "token": tokenizer.id_to_token(token),
                "text": tokenizer.decode([token])}

    def steps(self, body: StepsRequest) -> dict[str, Any]:
        cap = self.get(body.id)
        model, tokenizer = self.loaded()
        if cap.family != "decoder" or not isinstance(model, Transformer):
            raise HTTPException(400, "step-by-step generation needs a decoder model")
        with self.lock:
            result = _qkv(lambda: replay_steps(model, cap.ids, body.steps, body.temperature,
                                               body.top_k, body.top_p, body.seed))
        return {"steps": [{"id": s["id"], "token": tokenizer.id_to_token(s["id"]),
                           "cache": s["cache"],
                           "attention": {k: v.tolist() for k, v in s["attention"].items()}}
                          for s in result]}

    def export(self, cid: str) -> HTMLResponse:
        """The page with its style, script and this capture's data in one HTML file."""
        cap = self.get(cid)
        model, tokenizer = self.loaded()
        data: dict[str, Any] = {"model": model_info(model, tokenizer),
                                "capture": describe(cid, cap, tokenizer), "bin": {}}

        def put(key: str, response: Response) -> None:
            data["bin"][key] = {"shape": response.headers["X-Shape"],
                                "b64": base64.b64encode(bytes(response.body)).decode()}

        put("thumbs", self.thumbs(cid))
        for name in cap.attention:
            put(f"attention:{name}:weights:all", self.attention(cid, name, "weights", "all"))
        for group in ("token_embedding", "position", "ffn"):
            for key in getattr(cap, group):
                put(f"tensor:{group}/{key}", self.tensor(cid, f"{group}/{key}"))
        if cap.logits is not None:  # at the position the page opens on, default sampling
            fill = data["capture"]["fill_mask"]
            put("probs", self.probs(cid, fill[0]["position"] if fill else -1))
            data["vocab"] = self.vocab()
        return HTMLResponse(self.page(data))


def explain_router(source: Source, prefix: str = "/explain") -> APIRouter:
    """The explainer's routes for a (model, tokenizer), or a function returning it (while a
    server loads, the function may return None: the API answers 503). To add the explainer to
    another FastAPI app: app.include_router(explain_router(source))."""
    return Explainer(source, prefix).router()


def _ranked(tokenizer: Tokenizer, values: torch.Tensor, indices: torch.Tensor) -> list[dict]:
    return [{"id": int(t), "token": tokenizer.id_to_token(int(t)), "prob": float(s)}
            for s, t in zip(values, indices, strict=True)]


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise HTTPException(400, f"{what} must be a whole number, 'all' or 'mean'") from None


def _qkv(call: Callable[[], Any]) -> Any:
    """A QkvError (bad text, head out of range...) answers 400 with its one line."""
    try:
        return call()
    except QkvError as e:
        raise HTTPException(400, str(e)) from None


def create_app(source: Source):
    """A FastAPI app with the explainer at /explain and a redirect from /."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    app = FastAPI(title="qkv explain", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(explain_router(source))

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/explain")

    @app.get("/health", include_in_schema=False)
    def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app
