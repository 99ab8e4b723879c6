import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv
from conftest import tiny_config
from qkv import CheckpointError, ConfigError, Tokenizer, Transformer

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def saved(tmp_path):
    model = Transformer(tiny_config("decoder", vocab_size=40))
    tok = Tokenizer.train(["hello world, atenção! 😀"], kind="char")
    qkv.save(model, tok, tmp_path / "run")
    return model, tok, tmp_path / "run"


@pytest.mark.parametrize("family", ["encoder", "decoder", "encoder-decoder"])
def test_save_load_is_bit_exact(tmp_path, family):
    cfg = tiny_config(family, labels=["a", "b"] if family == "encoder" else [], pooler=True)
    model = Transformer(cfg)
    qkv.save(model, None, tmp_path)
    loaded, tok = qkv.load(tmp_path)
    assert tok is None and loaded.config == cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.lm_head.weight is loaded.token_embedding.weight  # still tied after loading
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_tied_weights_are_stored_once_and_tokenizer_round_trips(saved):
    model, tok, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    assert "token_embedding.weight" in tensors and "lm_head.weight" not in tensors
    loaded, tok2 = qkv.load(path)
    assert tok2.encode("atenção 😀") == tok.encode("atenção 😀")
    assert json.loads((path / "config.json").read_text())["qkv_version"] == qkv.__version__


def test_missing_truncated_and_mismatched_weights(saved, tmp_path):
    _, _, path = saved
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        qkv.load(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors does not exist"):
        qkv.load(path)
    other = Transformer(tiny_config("decoder", vocab_size=40, d_model=64))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()
               if k != "lm_head.weight"}, str(weights))
    with pytest.raises(CheckpointError, match="has shape \\[64\\] but the config expects "
                                              "\\[32\\]"):
        qkv.load(path)
    with pytest.raises(CheckpointError, match="is not a model directory"):
        qkv.load(tmp_path)
    (path / "config.json").write_text('{"family": "decoder", "d_model": 33, "n_heads": 4}')
    with pytest.raises(ConfigError, match="d_model=33 is not divisible by n_heads=4"):
        qkv.load(path)


def test_missing_tensor_is_named(saved):
    model, _, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["decoder.layers.1.ffn.down.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*decoder.layers.1.ffn.down.weight"):
        qkv.load(path)


def test_a_failed_write_leaves_the_previous_file(saved, monkeypatch):
    model, _, path = saved
    before = (path / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qkv.io.save_file", crash)
    with torch.no_grad():
        model.token_embedding.weight.add_(1.0)
    with pytest.raises(OSError):
        qkv.save(model, None, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]


def _cli(*args):
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "qkv.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.slow
def test_cli_info_and_version(saved, tmp_path):
    _, _, path = saved
    out = _cli("info", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("decoder, qkv, ")
    assert "parameters" in out.stdout and "d_model" in out.stdout
    assert "tokenizer: char" in out.stdout
    version = _cli("--version")
    assert version.stdout.strip() == f"qkv {qkv.__version__}"
    missing = _cli("info", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "error:" in missing.stderr
    assert "Traceback" not in missing.stderr
