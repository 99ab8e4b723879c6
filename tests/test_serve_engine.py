"""The serving engine: batching does not change the numbers, disconnects free slots, a full
queue answers 429."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.quantize import PackedLinear
from qkv.serve import Engine, Sampling, Sequence
from serve_util import live_server, make_app, served_decoder, tiny_decoder

PROMPTS = ["hello", "The quick brown fox", "a", "0123456789", "Once upon a time, there",
           "zz", "What is it?", "ROMEO:"]


def slow_steps(app, seconds: float) -> None:
    """Make every decoding step of the app's engine take at least `seconds` (tests only)."""
    engine = app.state.qkv.engine
    step = engine._step

    def slowed(seqs):
        time.sleep(seconds)
        step(seqs)

    engine._step = slowed


# ---------------------------------------------------------------------- same numbers

def run_engine(model, tok, prompts: list[str], watch: int, max_seqs: int = 8,
               sampling: dict | None = None, pack: bool = True, exact: bool = True
               ) -> tuple[list[torch.Tensor], str]:
    """Generate `prompts` together; return every logits row of prompt `watch` and its text."""
    engine = Engine(model, tok, max_seqs=max_seqs, pack=pack, exact=exact)
    rows: list[torch.Tensor] = []
    choose = engine._choose

    def spy(seq, logits):
        if seq is seqs[watch]:
            rows.append(logits.clone())
        choose(seq, logits)

    engine._choose = spy
    done = threading.Event()
    texts = [""] * len(prompts)
    finished = [0]

    def emitter(i):
        def emit(ev):
            if ev["type"] == "text":
                texts[i] += ev["text"]
            elif ev["type"] == "done":
                finished[0] += 1
                if finished[0] == len(prompts):
                    done.set()
        return emit

    params = {"max_tokens": 40, "temperature": 0.0, **(sampling or {})}
    seqs = [Sequence(tok.encode(p, add_special_tokens=False), Sampling(**params), emitter(i))
            for i, p in enumerate(prompts)]
    engine.submit(seqs)
    assert done.wait(30)
    engine.close()
    return rows, texts[watch]


@pytest.mark.parametrize("pack", [True, False], ids=["mkl-packed", "nn.Linear"])
@pytest.mark.parametrize("sampling", [None, {"temperature": 0.9, "seed": 5, "top_p": 0.9}])
def test_a_sequence_gets_the_same_logits_alone_and_beside_seven_others(sampling, pack):
    model, tok = tiny_decoder(d_model=64, n_heads=4, n_layers=3)
    alone, text_alone = run_engine(model, tok, [PROMPTS[1]], 0, sampling=sampling, pack=pack)
    batched, text_batched = run_engine(model, tok, PROMPTS, 1, sampling=sampling, pack=pack)
    assert len(alone) == len(batched) == 40
    for a, b in zip(alone, batched, strict=True):
        assert torch.equal(a, b)  # bit for bit, not merely close
    assert text_alone == text_batched and len(text_alone) == 40


def test_the_fixed_width_is_what_keeps_the_numbers_exact():
    """The control: the same rows through a linear layer of a varying width do change (so the
    test above could fail), and the packed product agrees with nn.Linear to fp32 noise."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 192)
    x = torch.randn(8, 64)
    with torch.no_grad():
        one = torch.stack([layer(x[i:i + 1])[0] for i in range(8)])
        eight = layer(x)
        assert not torch.equal(one, eight)
        assert torch.allclose(one, eight, atol=1e-5)
        model, tok = tiny_decoder()
        engine = Engine(model, tok, max_seqs=8)
        engine.close()
        layer32 = next(m for m in model.modules() if isinstance(m, PackedLinear)
                       and m.in_features == 32)
        assert layer32.rows == 8  # the engine packed the served model's layers for its width
        y = torch.randn(8, 1, 32)
        assert torch.allclose(layer32(y), F.linear(y, layer32.weight, layer32.bias), atol=1e-5)


def test_without_exact_batching_a_lone_stream_is_qkv_generate_and_batches_are_close():
    model, tok = tiny_decoder(d_model=64, n_heads=4, n_layers=3)
    alone, text = run_engine(model, tok, [PROMPTS[1]], 0, exact=False)
    assert text == qkv.generate(model, tok, PROMPTS[1], max_new_tokens=40, temperature=0)
    batched, _ = run_engine(model, tok, PROMPTS, 1, exact=False)
    # the prompt's logits and the first batched step's (later ones may follow another token)
    for a, b in zip(alone[:2], batched[:2], strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_rope_and_gqa_models_batch_exactly_too():
    model, tok = tiny_decoder(position="rope", n_kv_heads=2, norm="rmsnorm",
                              activation="swiglu")
    alone, _ = run_engine(model, tok, [PROMPTS[4]], 0)
    batched, _ = run_engine(model, tok, PROMPTS, 4)
    assert all(torch.equal(a, b) for a, b in zip(alone, batched, strict=True))


def test_http_greedy_and_seeded_text_alone_equals_text_under_concurrency():
    app = make_app(served_decoder(), max_seqs=8)
    with live_server(app) as url:
        slow_steps(app, 0.003)  # so that the 8 requests overlap

        async def one(c, prompt, **kw):
            r = await c.completions.create(model="tiny", prompt=prompt, max_tokens=30, **kw)
            return r.choices[0].text

        async def main():
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x",
                                          max_retries=0) as c:
                results = {}
                for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 11}):
                    alone = await one(c, PROMPTS[0], **kw)
                    together = await asyncio.gather(*(one(c, p, **kw) for p in PROMPTS))
                    results[str(kw)] = (alone, together[0])
                return results

        results = asyncio.run(main())
        assert app.state.qkv.engine.peak >= 4  # they really ran together
    for alone, together in results.values():
        assert alone == together and len(alone) == 30


# ---------------------------------------------------------------------- cancellation

def wait_until_idle(engine, limit: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit + 1:
        if not engine.running and not engine.waiting:
            return time.monotonic() - start
        time.sleep(0.005)
    return float("inf")


def test_a_streaming_client_that_closes_after_two_chunks_frees_its_slot_within_1s():
    app = make_app(served_decoder(context=1024), max_seqs=2)
    with live_server(app) as url:
        slow_steps(app, 0.02)  # 1000 tokens would take 20 s
        engine = app.state.qkv.engine
        body = {"model": "tiny", "prompt": "go", "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen == 2:
                    break
            assert engine.running
        freed = wait_until_idle(engine, 1.0)
        assert freed <= 1.0, f"slot still busy after {freed:.2f} s"
        assert engine.steps < 200


def test_a_plain_client_that_gives_up_frees_its_slot_within_1s():
    app = make_app(served_decoder(context=1024), max_seqs=2)
    with live_server(app) as url:
        slow_steps(app, 0.02)
        engine = app.state.qkv.engine
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", timeout=0.3,
                       json={"model": "tiny", "prompt": "go", "max_tokens": 1000})
        freed = wait_until_idle(engine, 1.0)
        assert freed <= 1.0, f"slot still busy after {freed:.2f} s"


# ---------------------------------------------------------------------- backpressure

def test_a_full_queue_answers_429_with_retry_after_and_nothing_times_out():
    app = make_app(served_decoder(), max_seqs=1, max_queue=4)
    with live_server(app) as url:
        slow_steps(app, 0.002)
        statuses, headers = [], []

        def call():
            r = httpx.post(url + "/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": "hi", "max_tokens": 20})
            statuses.append(r.status_code)
            if r.status_code == 429:
                headers.append(r.headers.get("retry-after"))
                assert r.json()["error"]["type"] == "rate_limit_error"

        threads = [threading.Thread(target=call) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        assert len(statuses) == 20  # every request was answered: no hang, no timeout
        assert set(statuses) <= {200, 429}
        assert statuses.count(429) >= 1 and statuses.count(200) >= 1
        assert all(h is not None and int(h) >= 1 for h in headers)
        # and the server is healthy afterwards
        assert httpx.get(url + "/health").status_code == 200


def test_mixed_load_of_streaming_plain_and_disconnecting_clients():
    """A small version of the benchmark's load test: every request is answered (200 or 429),
    none hangs, and afterwards nothing is left running."""
    app = make_app(served_decoder(), max_seqs=4, max_queue=8)
    with live_server(app) as url:
        slow_steps(app, 0.002)
        outcomes: list = []

        def client(i: int) -> None:
            body = {"model": "tiny", "prompt": PROMPTS[i % 8], "max_tokens": 24,
                    "stream": i % 3 != 1}
            try:
                if i % 3 == 1:
                    outcomes.append(httpx.post(url + "/v1/completions", json=body,
                                               timeout=30).status_code)
                    return
                with httpx.stream("POST", url + "/v1/completions", json=body,
                                  timeout=30) as r:
                    chunks = 0
                    for line in r.iter_lines():
                        chunks += line.startswith("data: ")
                        if i % 3 == 2 and chunks == 2:
                            break  # hang up
                    outcomes.append(r.status_code)
            except Exception as e:  # a timeout or a broken connection: the test fails
                outcomes.append(repr(e))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(outcomes) == 30
        assert set(outcomes) <= {200, 429}, outcomes
        assert outcomes.count(200) >= 8
        assert wait_until_idle(app.state.qkv.engine, 2.0) <= 2.0


@pytest.mark.parametrize("dtype", ["bf16", "int8-rows"])
def test_bf16_and_int8_rows_run_a_lone_sequence_on_one_row_and_stay_exact(dtype):
    """The engine's probe finds that bf16 (on a CPU with native bf16) and per-row int8 give
    the same bits at every width, so a lone sequence runs one row (as qkv.generate does), and
    its logits still do not change beside seven others. Emulated bf16 (no AMX, no
    AVX512-BF16) runs every step at the full width instead, and stays exact."""
    from qkv.hardware import cpu_has_bf16

    model, tok = tiny_decoder(d_model=64, n_heads=4, n_layers=3)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    else:
        qkv.quantize_int8(model, activations="int8-rows")
    engine = Engine(model, tok, max_seqs=8)
    engine.close()
    narrow = 1 if dtype != "bf16" or cpu_has_bf16() else 8
    assert engine.exact_verified and engine.width_from == narrow
    assert engine.stats()["exact"] and engine.stats()["width_from"] == narrow
    alone, text_alone = run_engine(model, tok, [PROMPTS[1]], 0)
    batched, text_batched = run_engine(model, tok, PROMPTS, 1)
    assert all(torch.equal(a, b) for a, b in zip(alone, batched, strict=True))
    assert text_alone == text_batched
    if narrow == 1:  # one row, as qkv.generate runs it: the same products
        assert text_alone == qkv.generate(model, tok, PROMPTS[1], max_new_tokens=40,
                                          temperature=0)


def test_emulated_bf16_steps_at_the_full_width(monkeypatch):
    """Without bf16 units, a bf16 model never runs a narrower step than max_seqs, whatever its
    probe rows say: emulated bf16's one-row products differ from its many-row ones for rare
    inputs. An int8-rows model is not affected by the rule."""
    import qkv.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: False)
    model, tok = tiny_decoder(d_model=64, n_heads=4, n_layers=3)
    engine = Engine(model.to(torch.bfloat16), tok, max_seqs=4)
    engine.close()
    assert engine.exact_verified and engine.width_from == 4
    model, tok = tiny_decoder(d_model=64, n_heads=4, n_layers=3)
    qkv.quantize_int8(model, activations="int8-rows")
    engine = Engine(model, tok, max_seqs=4)
    engine.close()
    assert engine.exact_verified and engine.width_from == 1


def test_the_probe_catches_rows_that_depend_on_their_neighbours():
    """FBGEMM's int8 inputs share one range per batch: the probe says so (no exact batching),
    and qkv serve's loader picks "int8-rows" instead when batching must be exact."""
    from qkv.quantize import fbgemm_available

    if not fbgemm_available():
        pytest.skip("no FBGEMM on this machine: its int8 path is not used")
    model, tok = tiny_decoder(d_model=64, n_heads=4, n_layers=3)
    qkv.quantize_int8(model, activations="int8")
    engine = Engine(model, tok, max_seqs=8)
    engine.close()
    assert not engine.exact_verified and not engine.stats()["exact"]


def test_fp32_keeps_the_full_width_where_narrower_steps_change_the_bits():
    model, tok = tiny_decoder(d_model=64, n_heads=4, n_layers=3)
    engine = Engine(model, tok, max_seqs=8)
    engine.close()
    assert engine.exact_verified and 1 <= engine.width_from <= 8
    layer = torch.nn.Linear(64, 192)
    x = torch.randn(8, 64)
    with torch.no_grad():
        one_row_differs = not torch.equal(layer(x[:1]), layer(x)[:1])
    if one_row_differs:  # MKL's one-row path: then a lone fp32 sequence may not run alone
        assert engine.width_from > 1


def test_the_engine_gives_free_memory_back_once_each_time_it_goes_idle(monkeypatch):
    from qkv.serve import engine as engine_module

    engine_module.release_free_memory()  # glibc's malloc_trim here; a no-op elsewhere
    calls = []
    monkeypatch.setattr(engine_module, "release_free_memory", lambda: calls.append(1))
    model, tok = tiny_decoder()
    engine = Engine(model, tok, max_seqs=4)
    try:
        for burst in (1, 2):
            done = threading.Event()
            engine.submit([Sequence(tok.encode("hello", add_special_tokens=False),
                                    Sampling(max_tokens=5, temperature=0.0),
                                    lambda ev, done=done: ev["type"] == "done" and done.set())])
            assert done.wait(30)
            deadline = time.monotonic() + 5
            while len(calls) < burst and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.6)  # idle waits of 0.5 s: no second trim without new work
            assert calls == [1] * burst
    finally:
        engine.close()
