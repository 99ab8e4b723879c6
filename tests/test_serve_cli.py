"""`qkv serve` as a real subprocess on a free loopback port, driven by the `openai` client."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import qkv
from qkv.cli import main
from serve_util import TEMPLATE, free_port, tiny_decoder, tiny_encoder

SRC = str(Path(qkv.__file__).resolve().parents[1])


def qkv_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from qkv.cli import main; sys.exit(main())", *args]


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start(directory: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(qkv_command("serve", str(directory), "--port", str(port),
                                        "--threads", "1", *extra),
                            env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    return proc, url


def wait_healthy(proc: subprocess.Popen, url: str, headers: dict | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"qkv serve exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", headers=headers, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("qkv serve did not become healthy in 60 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt")
    model, tok = tiny_decoder()
    qkv.save(model, tok, d)
    (d / "chat_template.jinja").write_text(TEMPLATE)
    return d


@pytest.mark.slow
def test_subprocess_server_with_the_openai_client(decoder_dir):
    proc, url = start(decoder_dir, "--api-key", "sekrit", "--model-name", "gpt")
    try:
        wait_healthy(proc, url, {"Authorization": "Bearer sekrit"})
        c = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0, timeout=30)
        assert [m.id for m in c.models.list().data] == ["gpt"]
        plain = c.completions.create(model="gpt", prompt="hello", max_tokens=10, temperature=0)
        assert plain.choices[0].finish_reason == "length"
        assert plain.usage.completion_tokens == 10
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="gpt", prompt="hello", max_tokens=10, temperature=0, stream=True))
        assert streamed == plain.choices[0].text
        msgs = [{"role": "user", "content": "hi"}]
        chat = c.chat.completions.create(model="gpt", messages=msgs, max_tokens=8,
                                         temperature=0)
        chunks = list(c.chat.completions.create(model="gpt", messages=msgs, max_tokens=8,
                                                temperature=0, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == \
            chat.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="other", prompt="x")
        tokens = httpx.post(url + "/tokenize", json={"prompt": "abc"},
                            headers={"Authorization": "Bearer sekrit"}).json()
        assert tokens["count"] == 3
    finally:
        stop(proc)


@pytest.mark.slow
def test_subprocess_embeddings_from_an_encoder(tmp_path):
    model, tok = tiny_encoder()
    qkv.save(model, tok, tmp_path / "enc")
    proc, url = start(tmp_path / "enc")
    try:
        wait_healthy(proc, url)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        r = c.embeddings.create(model="enc", input=["one", "two"])
        assert len(r.data) == 2 and len(r.data[0].embedding) == 32
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="enc", messages=[{"role": "user", "content": "x"}])
    finally:
        stop(proc)


def test_a_missing_model_directory_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty"), "--port", str(free_port())]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "qkv serve: error:" in lines[0] and "config.json" in lines[0]


def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path), "--max-seqs", "0"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_model_that_fails_to_load_stops_the_server_with_exit_2(tmp_path, capsys):
    model, tok = tiny_decoder()
    qkv.save(model, tok, tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not safetensors")
    start = time.monotonic()
    assert main(["serve", str(tmp_path / "broken"), "--port", str(free_port())]) == 2
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err.strip().splitlines()
    assert "the model failed to load" in err[-1]
