"""Property-based (Hypothesis) fuzzing of the server's request validation.

Any JSON body sent to any endpoint gets a 2xx answer or OpenAI's error envelope with a 4xx
status (or 503 when the queue is full); never a 500 and never a traceback. (Schemathesis would
derive the bodies from the OpenAPI schema; these strategies aim past the schema instead: wrong
types, NaN, huge numbers, deep nesting.)
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from serve_util import make_app, served_decoder

scalars = (st.none() | st.booleans() | st.integers(min_value=-2**65, max_value=2**65)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
small_numbers = st.integers(min_value=-2, max_value=6) | st.floats(allow_nan=True,
                                                                   allow_infinity=True)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | values,
     "content": st.text(max_size=20) | values}), max_size=3)
FIELDS = {
    "model": st.sampled_from(["tiny", "other"]) | values,
    "prompt": st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=3) | values,
    "messages": messages | values,
    "input": st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=3) | values,
    "max_tokens": small_numbers | values, "temperature": small_numbers | values,
    "top_p": small_numbers | values, "n": small_numbers | values, "seed": scalars,
    "stop": st.text(max_size=4) | values, "stream": st.booleans() | values,
    "logprobs": values, "echo": values, "text": st.text(max_size=20) | values,
}
bodies = st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys}))
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize"]


@pytest.fixture(scope="module")
def client():
    app = make_app(served_decoder(context=32), max_tokens=8, max_body_bytes=4096)
    yield TestClient(app, raise_server_exceptions=False)
    app.state.qkv.close()


@given(st.sampled_from(PATHS), bodies)
def test_any_body_gets_an_answer_or_an_error_envelope(client, path, body):
    text = json.dumps(body, allow_nan=True)  # NaN and Infinity as Python writes them
    response = client.post(path, content=text.encode(),
                           headers={"content-type": "application/json"})
    assert response.status_code < 500 or response.status_code == 503, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert "Traceback" not in error["message"]
