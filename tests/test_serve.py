"""qkv serve driven by the official `openai` client: every endpoint, with and without streaming.

The server runs in this process (uvicorn in a thread, on a loopback port), with tiny random
models; the subprocess `qkv serve` is in test_serve_cli.py.
"""

from __future__ import annotations

import asyncio
import base64
import threading

import httpx
import numpy as np
import openai
import pytest
import torch

import qkv
from qkv.embeddings import encode_sentences
from qkv.generate import generate_seq2seq
from qkv.serve import Served, create_app
from serve_util import (
    live_server,
    make_app,
    served_decoder,
    tiny_decoder,
    tiny_encoder,
    tiny_seq2seq,
)


@pytest.fixture(scope="module")
def server():
    app = make_app(served_decoder(), max_seqs=4)
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0,
                         timeout=30)


def complete(client, **kw):
    return client.completions.create(model="tiny", **kw)


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, chunks


# ---------------------------------------------------------------------- models, health

def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_health_is_503_until_the_model_is_loaded():
    release = threading.Event()

    def loader():
        release.wait(10)
        return served_decoder()

    app = create_app(loader)
    with live_server(app) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_loading"
        assert httpx.post(url + "/v1/completions",
                          json={"model": "tiny", "prompt": "a"}).status_code == 503
        release.set()
        for _ in range(200):
            r = httpx.get(url + "/health")
            if r.status_code == 200:
                break
            threading.Event().wait(0.02)
        assert r.status_code == 200 and r.json()["status"] == "ok"


# ---------------------------------------------------------------------- completions

def test_completion_counts_and_length_finish(client, server):
    tok = server[1].state.qkv.served.tokenizer
    r = complete(client, prompt="hello there", max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("hello there", add_special_tokens=False))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert len(tok.encode(choice.text, add_special_tokens=False)) == 12  # one char per token
    assert r.id.startswith("cmpl-") and r.object == "text_completion"


def test_streamed_completion_equals_plain_and_is_framed_like_openai(client):
    plain = complete(client, prompt="The fox", max_tokens=20, temperature=0)
    text, chunks = stream_text(complete(client, prompt="The fox", max_tokens=20, temperature=0,
                                        stream=True))
    assert text == plain.choices[0].text
    assert len({c.id for c in chunks}) == 1  # one id per stream
    assert all(c.usage is None for c in chunks)  # no usage unless asked
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_stream_usage_chunk_only_when_asked(client):
    text, chunks = stream_text(complete(client, prompt="ab", max_tokens=7, temperature=0,
                                        stream=True,
                                        stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == 2
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_ends_with_done(server):
    with httpx.stream("POST", server[0] + "/v1/completions",
                      json={"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True},
                      timeout=30) as r:
        body = r.read().decode()
    assert r.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in body.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"


def test_stop_string_is_trimmed_across_tokens_and_finishes_with_stop(client):
    full = complete(client, prompt="Once", max_tokens=30, temperature=0).choices[0].text
    stop = full[6:9]  # three tokens of a char model: matched across token boundaries
    first = full.find(stop)
    for stream in (False, True):
        if stream:
            text, chunks = stream_text(complete(client, prompt="Once", max_tokens=30,
                                                temperature=0, stop=[stop, "@@"], stream=True))
            reason = chunks[-1].choices[0].finish_reason
        else:
            r = complete(client, prompt="Once", max_tokens=30, temperature=0, stop=stop)
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert text == full[:first]
        assert reason == "stop"


def test_end_of_text_finishes_with_stop():
    app = make_app(served_decoder(eos_bias=1e4))  # the model always says end-of-text
    with live_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="tiny", prompt="hi", max_tokens=10)
        assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == 1


def test_n_choices_and_seed(client):
    r = complete(client, prompt="a", max_tokens=15, temperature=1.0, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 45
    again = complete(client, prompt="a", max_tokens=15, temperature=1.0, n=3, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    assert len({c.text for c in r.choices}) > 1  # each choice draws its own tokens
    other = complete(client, prompt="a", max_tokens=15, temperature=1.0, seed=8)
    assert other.choices[0].text != r.choices[0].text or other.choices[0].text != \
        r.choices[1].text


def test_several_prompts_give_choices_in_order(client):
    one = complete(client, prompt="abc", max_tokens=5, temperature=0).choices[0].text
    two = complete(client, prompt="xyz", max_tokens=5, temperature=0).choices[0].text
    r = complete(client, prompt=["abc", "xyz"], max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == [one, two]
    assert r.usage.prompt_tokens == 6


def test_top_k_1_is_greedy_and_top_p_is_honoured(client):
    greedy = complete(client, prompt="q", max_tokens=15, temperature=0).choices[0].text
    assert complete(client, prompt="q", max_tokens=15, temperature=1.5, extra_body={"top_k": 1},
                    seed=3).choices[0].text == greedy
    assert complete(client, prompt="q", max_tokens=15, temperature=1.5, top_p=1e-6,
                    seed=4).choices[0].text == greedy


def test_completion_logprobs(client):
    r = complete(client, prompt="lo", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == 6 and all(v <= 0 for v in lp.token_logprobs)
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(value)  # greedy picks the best
        assert top[chosen] == pytest.approx(value)
    assert lp.text_offset == list(range(6))


def test_token_id_prompt(client, server):
    tok = server[1].state.qkv.served.tokenizer
    ids = tok.encode("hello", add_special_tokens=False)
    a = complete(client, prompt=ids, max_tokens=5, temperature=0).choices[0].text
    assert a == complete(client, prompt="hello", max_tokens=5, temperature=0).choices[0].text


# ---------------------------------------------------------------------- chat

def chat(client, **kw):
    return client.chat.completions.create(model="tiny", **kw)


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_chat_plain_and_streamed_are_equal(client, server):
    plain = chat(client, messages=MESSAGES, max_tokens=16, temperature=0)
    msg = plain.choices[0].message
    assert msg.role == "assistant" and len(msg.content) == 16
    assert plain.choices[0].finish_reason == "length"
    template = server[1].state.qkv.served.template
    tok = server[1].state.qkv.served.tokenizer
    prompt = template.render(MESSAGES)
    assert plain.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    chunks = list(chat(client, messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert all(d.role is None for d in deltas[1:])  # the role only in the first chunk
    assert "".join(d.content or "" for d in deltas) == msg.content
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_max_completion_tokens_stop_and_logprobs(client):
    r = chat(client, messages=MESSAGES, max_completion_tokens=5, temperature=0,
             logprobs=True, top_logprobs=2)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    full = r.choices[0].message.content
    s = chat(client, messages=MESSAGES, max_tokens=5, temperature=0, stop=full[2:4])
    assert s.choices[0].message.content == full[:full.find(full[2:4])]
    assert s.choices[0].finish_reason == "stop"


def test_chat_without_a_template_is_400():
    app = make_app(served_decoder(template=False))
    with live_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=MESSAGES)
        assert e.value.body["code"] == "no_chat_template"


# ---------------------------------------------------------------------- other families

def test_embeddings_for_an_encoder():
    model, tok = tiny_encoder()
    app = create_app(Served(model, tok, "enc"))
    texts = ["hello world", "a b c", "the quick brown fox"]
    expected = encode_sentences(model, tok, texts, precision="fp32")
    with live_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.embeddings.create(model="enc", input=texts)  # the client asks for base64
        got = torch.tensor([d.embedding for d in r.data])
        assert torch.allclose(got, expected, atol=1e-6)
        assert [d.index for d in r.data] == [0, 1, 2]
        assert r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
        raw = httpx.post(url + "/v1/embeddings", json={"model": "enc", "input": "hello world",
                                                       "encoding_format": "base64"}).json()
        vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype=np.float32)
        assert np.allclose(vec, expected[0].numpy(), atol=1e-6)
        floats = httpx.post(url + "/v1/embeddings", json={"model": "enc", "input": "a b c",
                                                          "encoding_format": "float"}).json()
        assert np.allclose(floats["data"][0]["embedding"], expected[1].numpy(), atol=1e-6)
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="enc", prompt="hi")


def test_encoder_decoder_answers_with_its_translation():
    model, tok = tiny_seq2seq()
    app = create_app(Served(model, tok, "mt"))
    src = torch.tensor([tok.encode("guten tag", add_special_tokens=True)])
    ids = generate_seq2seq(model, src, max_new_tokens=12, eos_id=tok.eos_id)[0]
    expected = tok.decode(ids)
    with live_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="mt", prompt="guten tag", max_tokens=12)
        assert r.choices[0].text == expected
        assert r.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")
        assert r.usage.completion_tokens == len(ids)
        text = "".join(ch.choices[0].text for ch in c.completions.create(
            model="mt", prompt="guten tag", max_tokens=12, stream=True))
        assert text == expected
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="mt", prompt="x", temperature=0.7)


# ---------------------------------------------------------------------- tokenize, key, ASGI

def test_tokenize(server):
    served = server[1].state.qkv.served
    r = httpx.post(server[0] + "/tokenize", json={"prompt": "hello"}).json()
    assert r["tokens"] == served.tokenizer.encode("hello", add_special_tokens=False)
    assert r["count"] == 5 and r["max_model_len"] == served.context
    m = httpx.post(server[0] + "/tokenize", json={"model": "tiny", "messages": MESSAGES}).json()
    text = served.template.render(MESSAGES)
    assert m["tokens"] == served.tokenizer.encode(text, add_special_tokens=False)


def test_api_key_is_required_on_every_route():
    app = make_app(api_key="s3cret")
    with live_server(app) as url:
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).choices
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        for path in ("/health", "/v1/models", "/tokenize", "/nowhere"):
            r = httpx.get(url + path)
            assert r.status_code == 401, path
            assert r.json()["error"]["type"] == "authentication_error"
        ok = httpx.get(url + "/health", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_in_process_asgi_transport_with_the_async_client():
    app = make_app()

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://qkv") as http:
            c = openai.AsyncOpenAI(base_url="http://qkv/v1", api_key="x", http_client=http,
                                   max_retries=0)
            plain = await c.chat.completions.create(model="tiny", messages=MESSAGES,
                                                    max_tokens=8, temperature=0)
            stream = await c.chat.completions.create(model="tiny", messages=MESSAGES,
                                                     max_tokens=8, temperature=0, stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
            return plain.choices[0].message.content, text

    try:
        plain, streamed = asyncio.run(main())
    finally:
        app.state.qkv.close()
    assert plain == streamed and len(plain) == 8


def test_bf16_model_serves():
    model, tok = tiny_decoder()
    app = create_app(Served(model.to(torch.bfloat16), tok, "tiny"))
    with live_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="tiny", prompt="ab", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4


def test_int8_model_serves():
    model, tok = tiny_decoder()
    qkv.quantize_int8(model)
    app = create_app(Served(model, tok, "tiny"))
    with live_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="tiny", prompt="ab", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4 and len(r.choices[0].text) == 4


def test_the_explainer_is_served_beside_the_api(server):
    url, app = server
    page = httpx.get(url + "/explain")
    assert page.status_code == 200 and "explain.js" in page.text
    info = httpx.get(url + "/explain/api/model").json()
    assert info["family"] == "decoder"
