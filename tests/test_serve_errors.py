"""Bad requests: each gets its status code and OpenAI's error envelope, never a traceback."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from serve_util import make_app, served_decoder

CONTEXT = 64
MAX_TOKENS = 48
MAX_BODY = 4096


@pytest.fixture(scope="module")
def apps():
    apps = {
        "main": make_app(served_decoder(context=CONTEXT), max_tokens=MAX_TOKENS,
                         max_body_bytes=MAX_BODY),
        "keyed": make_app(api_key="k3y"),
        "plain": make_app(served_decoder(template=False)),
    }
    yield {name: TestClient(app, raise_server_exceptions=False) for name, app in apps.items()}
    for app in apps.values():
        app.state.qkv.close()


def comp(**fields):
    return {"json": {"model": "tiny", "prompt": "hi", **fields}}


def chat(**fields):
    return {"json": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                     **fields}}


BAD = "invalid_request_error"
C, CH = "/v1/completions", "/v1/chat/completions"

# (id, app, method, path, request kwargs, status, error type)
CASES = [
    ("malformed json", "main", "POST", C,
     {"content": b'{"model": "tiny",', "headers": {"content-type": "application/json"}},
     400, BAD),
    ("json list body", "main", "POST", C, {"json": [1, 2]}, 400, BAD),
    ("empty body", "main", "POST", C, {}, 400, BAD),
    ("prompt of wrong type", "main", "POST", C, comp(prompt=5), 400, BAD),
    ("max_tokens as a string", "main", "POST", C, comp(max_tokens="5"), 400, BAD),
    ("max_tokens as a bool", "main", "POST", C, comp(max_tokens=True), 400, BAD),
    ("negative max_tokens", "main", "POST", C, comp(max_tokens=-1), 400, BAD),
    ("zero max_tokens", "main", "POST", C, comp(max_tokens=0), 400, BAD),
    ("huge max_tokens", "main", "POST", C, comp(max_tokens=10**12), 400, BAD),
    ("max_tokens past the context", "main", "POST", C,
     comp(prompt="a" * 40, max_tokens=40), 400, BAD),
    ("temperature NaN", "main", "POST", C,
     {"content": b'{"model": "tiny", "prompt": "a", "temperature": NaN}',
      "headers": {"content-type": "application/json"}}, 400, BAD),
    ("temperature Infinity", "main", "POST", C,
     {"content": b'{"model": "tiny", "prompt": "a", "temperature": Infinity}',
      "headers": {"content-type": "application/json"}}, 400, BAD),
    ("temperature too high", "main", "POST", C, comp(temperature=5), 400, BAD),
    ("negative temperature", "main", "POST", C, comp(temperature=-0.1), 400, BAD),
    ("top_p zero", "main", "POST", C, comp(top_p=0), 400, BAD),
    ("top_p above one", "main", "POST", C, comp(top_p=1.5), 400, BAD),
    ("top_k zero", "main", "POST", C, comp(top_k=0), 400, BAD),
    ("n zero", "main", "POST", C, comp(n=0), 400, BAD),
    ("n too large", "main", "POST", C, comp(n=1000), 400, BAD),
    ("seed as a string", "main", "POST", C, comp(seed="1"), 400, BAD),
    ("unknown model", "main", "POST", C, comp(model="gpt-4"), 404, BAD),
    ("missing model", "main", "POST", C, {"json": {"prompt": "hi"}}, 400, BAD),
    ("unknown field", "main", "POST", C, comp(frobnicate=1), 400, BAD),
    ("presence_penalty set", "main", "POST", C, comp(presence_penalty=0.5), 400, BAD),
    ("logit_bias set", "main", "POST", C, comp(logit_bias={"5": 10}), 400, BAD),
    ("echo true", "main", "POST", C, comp(echo=True), 400, BAD),
    ("suffix set", "main", "POST", C, comp(suffix="x"), 400, BAD),
    ("best_of differs from n", "main", "POST", C, comp(best_of=3), 400, BAD),
    ("stream_options without stream", "main", "POST", C,
     comp(stream_options={"include_usage": True}), 400, BAD),
    ("empty stop string", "main", "POST", C, comp(stop=""), 400, BAD),
    ("too many stops", "main", "POST", C, comp(stop=[str(i) for i in range(20)]), 400, BAD),
    ("prompt longer than the context", "main", "POST", C, comp(prompt="a" * 100), 400, BAD),
    ("token id outside the vocabulary", "main", "POST", C, comp(prompt=[1, 99999]), 400, BAD),
    ("empty prompt list", "main", "POST", C, comp(prompt=[]), 400, BAD),
    ("logprobs too many", "main", "POST", C, comp(logprobs=50), 400, BAD),
    ("oversized body", "main", "POST", C, comp(prompt="a" * (2 * MAX_BODY)), 413, BAD),
    ("chat: no messages", "main", "POST", CH, chat(messages=[]), 400, BAD),
    ("chat: unknown role", "main", "POST", CH,
     chat(messages=[{"role": "wizard", "content": "x"}]), 400, BAD),
    ("chat: image content", "main", "POST", CH,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
     400, BAD),
    ("chat: tools", "main", "POST", CH, chat(tools=[{"type": "function"}]), 400, BAD),
    ("chat: top_logprobs without logprobs", "main", "POST", CH, chat(top_logprobs=2), 400,
     BAD),
    ("chat: max_tokens disagrees with max_completion_tokens", "main", "POST", CH,
     chat(max_tokens=3, max_completion_tokens=4), 400, BAD),
    ("chat: json response_format", "main", "POST", CH,
     chat(response_format={"type": "json_object"}), 400, BAD),
    ("chat: unknown model", "main", "POST", CH, chat(model="nope"), 404, BAD),
    ("chat without a template", "plain", "POST", CH, chat(), 400, BAD),
    ("embeddings from a decoder", "main", "POST", "/v1/embeddings",
     {"json": {"model": "tiny", "input": "hi"}}, 400, BAD),
    ("tokenize with prompt and messages", "main", "POST", "/tokenize",
     {"json": {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}}, 400, BAD),
    ("unknown route", "main", "GET", "/v2/everything", {}, 404, "not_found_error"),
    ("wrong method", "main", "GET", C, {}, 405, BAD),
    ("missing key", "keyed", "POST", C, comp(), 401, "authentication_error"),
    ("bad key", "keyed", "POST", C, {**comp(), "headers": {"Authorization": "Bearer nope"}},
     401, "authentication_error"),
    ("key with the wrong scheme", "keyed", "GET", "/v1/models",
     {"headers": {"Authorization": "Basic k3y"}}, 401, "authentication_error"),
]


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name,app,method,path,kwargs,status,kind", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_request(apps, name, app, method, path, kwargs, status, kind):
    r = apps[app].request(method, path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]


def test_validation_error_names_the_field(apps):
    r = apps["main"].post(C, **comp(max_tokens="5"))
    assert r.json()["error"]["param"] == "max_tokens"
    r = apps["main"].post(CH, **chat(messages=[{"role": "user", "content": 3}]))
    assert r.json()["error"]["param"].startswith("messages.0.content")


def test_unknown_model_code(apps):
    error = apps["main"].post(C, **comp(model="gpt-4")).json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_oversized_body_without_content_length_is_413(apps):
    def chunks():
        piece = json.dumps({"model": "tiny", "prompt": "a" * MAX_BODY}).encode()
        yield piece[:10]
        yield piece[10:]

    r = apps["main"].post(C, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_good_request_after_bad_ones_still_works(apps):
    r = apps["main"].post(C, **comp(max_tokens=3, temperature=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
