"""`qkv serve`: an OpenAI-compatible HTTP API for a qkv model, as a FastAPI app.

    GET  /health                 503 while the model loads, then 200
    GET  /v1/models              the one model served (and /v1/models/{id})
    POST /v1/completions         decoders continue a prompt; encoder-decoders translate it
    POST /v1/chat/completions    decoders with a chat template
    POST /v1/embeddings          encoders: one pooled vector per text
    POST /tokenize               the token ids of a prompt (or of rendered chat messages)

Every error, FastAPI's own validation errors included, is OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}` with status 400 (invalid request), 401 (bad
key), 404 (unknown model or route), 413 (body too large), 429 (queue full, with Retry-After) or
503 (still loading).

Generation goes through one `Engine` (continuous batching, see engine.py). A request's tokens
arrive on an asyncio queue; a streamed request sends them as server-sent events framed as OpenAI
frames them, a plain one gathers them. When the client goes away its sequences are cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import ChatTemplate
from ..errors import QkvError
from ..explain.app import explain_router
from .engine import Engine, QueueFull, Sampling, Sequence
from .schemas import (
    MAX_STOPS,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    TokenizeRequest,
)

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_TOKENS = 4096
MAX_N = 16


class ApiError(Exception):
    """An error answered with OpenAI's envelope."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status,
                        headers=e.headers)


@dataclass
class Served:
    """What the server serves: a model, its tokenizer, the name clients use, its template."""

    model: Any
    tokenizer: Any
    name: str
    template: ChatTemplate | None = None

    @property
    def family(self) -> str:
        return self.model.config.family

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len


def load_served(path: str, dtype: str = "fp32", name: str | None = None,
                chat_template: str | None = None, device: str = "cpu",
                exact: bool = True) -> Served:
    """Load a model directory for serving. dtype: fp32, bf16 or int8 (int8: CPU decoding).
    int8 rounds each input row on its own range when `exact` (exact batching needs it; see
    engine.py), else the whole batch on one (FBGEMM: faster for one stream)."""
    from pathlib import Path

    import torch

    from ..checkpoint import load
    from ..errors import InputError

    model, tokenizer = load(path, device=device,
                            dtype=torch.bfloat16 if dtype == "bf16" else None)
    if tokenizer is None:
        raise InputError(f"{path} has no tokenizer.json, so its text cannot be encoded")
    if dtype == "int8":
        from ..quantize import quantize_int8

        quantize_int8(model, activations="int8-rows" if exact else "int8")
    model.eval()
    if chat_template is not None:
        template = ChatTemplate(Path(chat_template).read_text(encoding="utf-8"),
                                _token(tokenizer, tokenizer.bos_id),
                                _token(tokenizer, tokenizer.eos_id))
    else:
        template = ChatTemplate.from_model_dir(path, _token(tokenizer, tokenizer.bos_id),
                                               _token(tokenizer, tokenizer.eos_id))
    return Served(model, tokenizer, name or Path(path).resolve().name, template)


def _token(tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else (tokenizer.id_to_token(token_id) or "")


# ---------------------------------------------------------------------- the server's state

class ServerState:
    """The loaded model and its engine; `served` is None while loading."""

    def __init__(self, source: Served | Callable[[], Served], max_seqs: int, max_queue: int,
                 on_load_error: Callable[[BaseException], None] | None = None,
                 exact: bool = True) -> None:
        self.served: Served | None = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.max_seqs, self.max_queue, self.exact = max_seqs, max_queue, exact
        self.on_load_error = on_load_error
        if isinstance(source, Served):
            self._ready(source)
        else:
            threading.Thread(target=self._load, args=(source,), daemon=True,
                             name="qkv-serve-load").start()

    def _load(self, loader: Callable[[], Served]) -> None:
        try:
            served = loader()
        except BaseException as e:  # reported by /health and by the command
            self.load_error = str(e) if isinstance(e, QkvError) else f"{type(e).__name__}: {e}"
            if self.on_load_error is not None:
                self.on_load_error(e)
            return
        self._ready(served)

    def _ready(self, served: Served) -> None:
        # Only a decoder's linear layers run in the batched step (and get packed weights).
        self.engine = Engine(served.model, served.tokenizer, self.max_seqs, self.max_queue,
                             pack=served.family == "decoder", exact=self.exact)
        self.served = served  # last: requests see a model only once its engine runs

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


# ---------------------------------------------------------------------- the app

def create_app(source: Served | Callable[[], Served], *, api_key: str | None = None,
               max_seqs: int = 8, max_queue: int = 64, max_tokens: int = MAX_TOKENS,
               max_body_bytes: int = MAX_BODY_BYTES,
               on_load_error: Callable[[BaseException], None] | None = None,
               exact_batching: bool = True) -> FastAPI:
    """The FastAPI app serving `source`: a Served, or a function that loads one (then the app
    answers 503 until it has finished, in a background thread). exact_batching=False trades
    the same-text-under-load guarantee for single-stream speed (see engine.py)."""
    state = ServerState(source, max_seqs, max_queue, on_load_error, exact_batching)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="qkv serve", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.qkv = state
    app.state.max_tokens = max_tokens
    _add_error_handlers(app)
    # The explainer (qkv explain's page) for the served model, at /explain: 503 while loading.
    app.include_router(explain_router(
        lambda: (state.served.model, state.served.tokenizer) if state.served else None))

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.served is None:
            _loading(state)
        engine = _engine(state)
        if not engine.thread.is_alive():
            raise ApiError(503, "the generation engine has stopped", "service_unavailable",
                           code="engine_stopped")
        return JSONResponse({"status": "ok", **engine.stats()})

    @app.get("/v1/models")
    async def models() -> dict:
        served = _ready(state)
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        served = _ready(state)
        _check_model(served, model_id)
        return _model_card(served)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        served = _ready(state)
        _check_model(served, body.model)
        _check_completion(body)
        if served.family == "encoder-decoder":
            return await _translate(state, served, body, request, max_tokens)
        _need_decoder(served, "completions")
        prompts = _completion_prompts(served, body.prompt)
        return await _generate(state, served, body, request, prompts, max_tokens, chat=False,
                               logprobs=body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        served = _ready(state)
        _check_model(served, body.model)
        _check_chat(body)
        _need_decoder(served, "chat completions")
        ids = _chat_ids(served, body.messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _generate(state, served, body, request, [ids], max_tokens, chat=True,
                               logprobs=logprobs)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        served = _ready(state)
        _check_model(served, body.model)
        return await _embed(state, served, body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        served = _ready(state)
        ids = _tokenize(served, body)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    # Pure ASGI middleware, outermost last: the key is checked first, then the body size.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(BearerKey, key=api_key)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers with OpenAI's error body."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_api_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = (f"no route {request.method} {request.url.path}" if e.status_code in (404, 405)
                   else str(e.detail))
        return JSONResponse(error_body(message, kind, None, None), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}",
                                       "server_error"), status_code=500)


# ---------------------------------------------------------------------- checks

def _check_completion(body: CompletionRequest) -> None:
    _check_unsupported(body)
    if body.echo:
        raise ApiError(400, "echo=true is not supported", param="echo")
    if body.suffix is not None:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of must equal n (qkv returns every choice it makes)",
                       param="best_of")


def _check_chat(body: ChatRequest) -> None:
    """Refuse what qkv does not do; max_completion_tokens becomes max_tokens."""
    _check_unsupported(body)
    for name in ("tools", "tool_choice"):
        if getattr(body, name) is not None:
            raise ApiError(400, f"{name} is not supported (no tool calling)", param=name)
    if body.response_format is not None and body.response_format != {"type": "text"}:
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported",
                       param="response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if body.max_completion_tokens is not None:
        if body.max_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one",
                           param="max_completion_tokens")
        body.max_tokens = body.max_completion_tokens


def _tokenize(served: Served, body: TokenizeRequest) -> list[int]:
    if body.model is not None:
        _check_model(served, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "send exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        return _chat_ids(served, body.messages, body.add_generation_prompt)
    return served.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)


def _loading(state: ServerState) -> NoReturn:
    if state.load_error is not None:
        raise ApiError(503, f"the model failed to load: {state.load_error}",
                       "service_unavailable", code="model_load_failed")
    raise ApiError(503, "the model is still loading; retry shortly", "service_unavailable",
                   code="model_loading", headers={"Retry-After": "1"})


def _ready(state: ServerState) -> Served:
    served = state.served
    if served is None:
        _loading(state)
    return served


def _engine(state: ServerState) -> Engine:
    engine = state.engine
    if engine is None:
        _loading(state)
    return engine


def _model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "qkv",
            "family": served.family, "max_model_len": served.context}


def _check_model(served: Served, name: str) -> None:
    if name != served.name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                       f"{served.name!r}", "invalid_request_error", "model", "model_not_found")


def _check_unsupported(body) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise ApiError(400, f"{name} is not supported (only 0)", param=name)
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true",
                       param="stream_options")
    if body.n > MAX_N:
        raise ApiError(400, f"n={body.n} is more than this server allows ({MAX_N})", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ApiError(400, f"stop must be up to {MAX_STOPS} non-empty strings", param="stop")


def _need_decoder(served: Served, what: str) -> None:
    if served.family != "decoder":
        hint = " (use /v1/embeddings)" if served.family == "encoder" else ""
        raise ApiError(400, f"{what} need a decoder model; {served.name!r} is an "
                       f"{served.family}{hint}", param="model", code="wrong_model_family")


def _check_ids(served: Served, ids: list[int], param: str) -> list[int]:
    if len(ids) > served.context:
        raise ApiError(400, f"the prompt has {len(ids)} tokens but the model's context is "
                       f"{served.context}", param=param, code="context_length_exceeded")
    vocab = served.model.config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"token ids must be in [0, {vocab})", param=param)
    return ids


def _start_ids(served: Served, ids: list[int]) -> list[int]:
    """An empty prompt starts from the start (or end-of-text) token."""
    if ids:
        return ids
    tok = served.tokenizer
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if start is None:
        raise ApiError(400, "the prompt is empty and the tokenizer has no start token",
                       param="prompt")
    return [start]


def _completion_prompts(served: Served, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list", param="prompt")
    rows = []
    for p in prompt:
        ids = served.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p
        rows.append(_check_ids(served, _start_ids(served, list(ids)), "prompt"))
    return rows


def _chat_ids(served: Served, messages, add_generation_prompt: bool = True) -> list[int]:
    if served.template is None:
        raise ApiError(400, f"the model {served.name!r} has no chat template; use "
                       "/v1/completions, or start the server with --chat-template FILE",
                       param="messages", code="no_chat_template")
    plain = [m.model_dump(exclude_none=True) for m in messages]
    for m in plain:  # pydantic made text parts models; the template wants plain dicts
        m.pop("name", None)
    try:
        text = served.template.render(plain, add_generation_prompt=add_generation_prompt)
    except QkvError as e:
        raise ApiError(400, str(e), param="messages") from None
    ids = served.tokenizer.encode(text, add_special_tokens=False)
    return _check_ids(served, _start_ids(served, ids), "messages")


def _validation_api_error(e: RequestValidationError) -> ApiError:
    errors = e.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return ApiError(400, "the body is not valid JSON", param=None, code="invalid_json")
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown or unsupported field {param!r}", param=param,
                        code="unsupported_field")
    if first.get("type") == "missing":
        message = f"{param} is required" if param else "a JSON object body is required"
        return ApiError(400, message, param=param, code="missing_field")
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param,
                    code="invalid_value")


# ---------------------------------------------------------------------- generation

def _sampling(served: Served, body, prompt_len: int, max_tokens: int,
              logprobs: int | None, choice: int) -> Sampling:
    room = served.context - prompt_len
    wanted = body.max_tokens
    if wanted is not None and wanted > max_tokens:
        raise ApiError(400, f"max_tokens={wanted} is more than this server allows "
                       f"({max_tokens})", param="max_tokens")
    if wanted is not None and wanted > room:
        raise ApiError(400, f"the prompt has {prompt_len} tokens and max_tokens={wanted}: "
                       f"more than the model's context of {served.context}",
                       param="max_tokens", code="context_length_exceeded")
    if room < 1:
        raise ApiError(400, f"the prompt fills the model's context ({served.context} tokens); "
                       "nothing can be added", param="prompt", code="context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    temperature = 1.0 if body.temperature is None else body.temperature
    seed = None if body.seed is None else body.seed + choice
    return Sampling(max_tokens=wanted or min(room, max_tokens), temperature=temperature,
                    top_p=body.top_p, top_k=body.top_k, stop=stops, seed=seed,
                    logprobs=logprobs)


class _Request:
    """The sequences of one HTTP request and the queue their events arrive on."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs: list[Sequence] = []

    def emitter(self, index: int) -> Callable[[dict], None]:
        def emit(event: dict) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, {**event, "index": index})
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass
        return emit

    def cancel(self, engine: Engine) -> None:
        for seq in self.seqs:
            seq.cancel()
        engine.wake()


def _queue_full() -> ApiError:
    return ApiError(429, "the server is busy (its queue is full); retry shortly",
                    "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})


DISCONNECT_CHECK = 0.1  # seconds between two looks for a plain client that went away


async def _events(req: _Request, request: Request | None, count: int) -> AsyncIterator[dict]:
    """The events of `count` sequences until all are done. With `request` (not streaming), a
    client that disconnects is noticed within DISCONNECT_CHECK seconds."""
    done, checked = 0, time.monotonic()
    while done < count:
        if request is None:  # streaming: a disconnect cancels this coroutine; no timer needed
            event = await req.queue.get()
        else:
            try:
                event = await asyncio.wait_for(req.queue.get(), timeout=DISCONNECT_CHECK)
            except asyncio.TimeoutError:
                event = None
        if request is not None and time.monotonic() - checked >= DISCONNECT_CHECK:
            checked = time.monotonic()
            if await request.is_disconnected():
                return
        if event is None:
            continue
        if event["type"] == "error":
            raise ApiError(500, f"generation failed: {event['message']}", "server_error")
        if event["type"] == "done":
            done += 1
        yield event


async def _generate(state: ServerState, served: Served, body, request: Request,
                    prompts: list[list[int]], max_tokens: int, chat: bool,
                    logprobs: int | None):
    n = body.n
    if len(prompts) * n > state.max_queue:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} choices is more than the queue "
                       f"holds ({state.max_queue})", param="n")
    engine = _engine(state)
    req = _Request()
    for p, ids in enumerate(prompts):
        for j in range(n):
            sampling = _sampling(served, body, len(ids), max_tokens, logprobs, j)
            req.seqs.append(Sequence(ids, sampling, req.emitter(p * n + j)))
    try:
        engine.submit(req.seqs)
    except QueueFull:
        raise _queue_full() from None
    prompt_tokens = sum(len(ids) for ids in prompts)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    meta = {"id": rid, "created": int(time.time()), "model": served.name}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        frames = _stream_frames(req, engine, meta, chat, len(req.seqs), prompt_tokens,
                                usage)
        return StreamingResponse(frames, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    texts = [""] * len(req.seqs)
    reasons: list[str | None] = [None] * len(req.seqs)
    entries: list[list[dict]] = [[] for _ in req.seqs]
    completion_tokens = 0
    try:
        async for ev in _events(req, request, len(req.seqs)):
            i = ev["index"]
            if ev["type"] == "text":
                texts[i] += ev["text"]
                entries[i] += ev["logprobs"]
            else:
                reasons[i] = ev["finish_reason"]
                completion_tokens += ev["completion_tokens"]
    finally:
        req.cancel(engine)  # a no-op for finished sequences
    if any(r is None for r in reasons):  # the client went away: nobody reads this
        return JSONResponse(error_body("client disconnected", "invalid_request_error"), 499)
    choices = []
    for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
        lp = _logprobs(entries[i], chat) if logprobs is not None else None
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": reason})
        else:
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
    return {**meta, "object": "chat.completion" if chat else "text_completion",
            "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprobs(entries: list[dict], chat: bool) -> dict:
    """Token log-probabilities in the shape of each API."""
    if chat:
        return {"content": [
            {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                              for t, lp in e["top"]]}
            for e in entries]}
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries],
            "text_offset": offsets}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream_frames(req: _Request, engine: Engine, meta: dict, chat: bool, count: int,
                         prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed request. The role goes in each choice's first chunk
    only; every chunk has the same id; a usage chunk comes last, and only when asked for."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if include_usage else {}

    def chunk(choice: dict) -> str:
        return _sse({**meta, "object": obj, "choices": [choice], **extra})

    completion_tokens = 0
    try:
        if chat:
            for i in range(count):
                yield chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None})
        try:
            async for ev in _events(req, None, count):
                i = ev["index"]
                if ev["type"] == "text":
                    lp = _logprobs(ev["logprobs"], chat) if ev["logprobs"] else None
                    if chat:
                        yield chunk({"index": i, "delta": {"content": ev["text"]},
                                     "logprobs": lp, "finish_reason": None})
                    else:
                        yield chunk({"index": i, "text": ev["text"], "logprobs": lp,
                                     "finish_reason": None})
                else:
                    completion_tokens += ev["completion_tokens"]
                    end = {"index": i, "logprobs": None, "finish_reason": ev["finish_reason"]}
                    yield chunk({**end, "delta": {}} if chat else {**end, "text": ""})
        except ApiError as e:
            yield _sse(error_body(e.message, e.type, e.param, e.code))
            return
        if include_usage:
            yield _sse({**meta, "object": obj, "choices": [],
                        "usage": _usage(prompt_tokens, completion_tokens)})
        yield _sse("[DONE]")
    finally:  # also when the client disconnects and the response is cancelled
        req.cancel(engine)


# ---------------------------------------------------------------------- other model families

async def _run_job(state: ServerState, request: Request, fn: Callable[[], Any]) -> Any:
    """Run fn() on the engine thread (it owns the model) and await its result."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def done(result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass

    try:
        _engine(state).run_job(fn, done)
    except QueueFull:
        raise _queue_full() from None
    try:
        return await future
    except QkvError as e:
        raise ApiError(400, str(e)) from None


async def _translate(state: ServerState, served: Served, body: CompletionRequest,
                     request: Request, max_tokens: int):
    """An encoder-decoder answers a completion with its translation (greedy decoding)."""
    import torch

    from ..generate import generate_seq2seq

    if body.temperature not in (None, 0):
        raise ApiError(400, "an encoder-decoder translates greedily: temperature must be 0",
                       param="temperature")
    for name in ("top_p", "top_k", "logprobs"):
        if getattr(body, name) is not None:
            raise ApiError(400, f"{name} is not supported for an encoder-decoder", param=name)
    if body.n != 1:
        raise ApiError(400, "an encoder-decoder gives one translation: n must be 1", param="n")
    if not isinstance(body.prompt, str):
        raise ApiError(400, "an encoder-decoder translates one text: prompt must be a string",
                       param="prompt")
    tok = served.tokenizer
    src = _check_ids(served, tok.encode(body.prompt, add_special_tokens=True), "prompt")
    limit = body.max_tokens or min(max_tokens, served.context)
    if limit > min(max_tokens, served.context):
        raise ApiError(400, f"max_tokens={limit} is more than this server allows "
                       f"({min(max_tokens, served.context)})", param="max_tokens")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    device = next(served.model.parameters()).device

    def job() -> list[int]:
        ids = torch.tensor([src], device=device)
        return generate_seq2seq(served.model, ids, max_new_tokens=limit,
                                eos_id=tok.eos_id)[0]

    out = await _run_job(state, request, job)
    text = tok.decode(out, skip_special_tokens=True)
    reason = "length" if len(out) >= limit else "stop"
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    if cut >= 0:
        text, reason = text[:cut], "stop"
    meta = {"id": "cmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": served.name}
    usage = _usage(len(src), len(out))
    if not body.stream:
        return {**meta, "object": "text_completion", "usage": usage,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": reason}]}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    extra = {"usage": None} if include_usage else {}

    async def frames() -> AsyncIterator[str]:
        for choice in ({"index": 0, "text": text, "logprobs": None, "finish_reason": None},
                       {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}):
            yield _sse({**meta, "object": "text_completion", "choices": [choice], **extra})
        if include_usage:
            yield _sse({**meta, "object": "text_completion", "choices": [], "usage": usage})
        yield _sse("[DONE]")

    return StreamingResponse(frames(), media_type="text/event-stream")


async def _embed(state: ServerState, served: Served, body: EmbeddingRequest, request: Request):
    """Encoders: one vector per text, pooled as the model's config says."""
    import numpy as np

    from ..embeddings import encode_sentences

    if served.family != "encoder":
        raise ApiError(400, f"embeddings need an encoder model; {served.name!r} is a "
                       f"{served.family}", param="model", code="wrong_model_family")
    given = [body.input] if isinstance(body.input, str) else body.input
    if not given:
        raise ApiError(400, "input is an empty list", param="input")
    texts = [t for t in given if isinstance(t, str)]
    if len(texts) != len(given):
        raise ApiError(400, "input must be text (a string or a list of strings); token ids "
                       "are not supported", param="input")
    if len(texts) > 2048:
        raise ApiError(400, f"input has {len(texts)} texts; at most 2048", param="input")
    d = served.model.config.d_model
    if body.dimensions is not None and body.dimensions != d:
        raise ApiError(400, f"dimensions={body.dimensions}: this model's vectors have {d}",
                       param="dimensions")
    cfg = served.model.config
    limit = min(cfg.embed_max_len or cfg.max_seq_len, cfg.max_seq_len)
    counts = [len(served.tokenizer.encode(t, add_special_tokens=True)) for t in texts]
    if max(counts) > limit:
        raise ApiError(400, f"an input has {max(counts)} tokens; this model reads at most "
                       f"{limit}", param="input", code="context_length_exceeded")
    vectors = await _run_job(state, request, lambda: encode_sentences(
        served.model, served.tokenizer, texts, precision="fp32"))
    data = []
    for i, v in enumerate(vectors):
        if body.encoding_format == "base64":
            value: Any = base64.b64encode(v.float().numpy().astype(np.float32).tobytes()).decode()
        else:
            value = v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": served.name,
            "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}}


# ---------------------------------------------------------------------- ASGI middleware

async def _send_error(send, status: int, message: str, type: str, code: str,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(message, type, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BearerKey:
    """Every HTTP request needs `Authorization: Bearer KEY`, compared in constant time."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
            if not ok:
                message = ("a Bearer API key is required: Authorization: Bearer KEY"
                           if not given else "the API key is not valid")
                await _send_error(send, 401, message, "authentication_error", "invalid_api_key",
                                  [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Bodies larger than `max_bytes` get 413, whether announced (Content-Length) or not."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        too_big = f"the request body is larger than {self.max_bytes} bytes"
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _send_error(send, 413, too_big, "invalid_request_error", "request_too_large")
            return
        chunks, size = [], 0
        while True:  # read the body up to the limit, then hand it on
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _send_error(send, 413, too_big, "invalid_request_error",
                                  "request_too_large")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
