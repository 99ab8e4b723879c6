"""Broken or unsupported Hugging Face directories fail with one clear error each.

These tests write their directories with qkv itself (no transformers needed) and then break
them: a missing or pickled weights file, a tensor of the wrong shape, an unknown model_type, a
config feature qkv does not implement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv
from qkv.cli import main
from qkv.hf import architecture_for, load_hf, save_hf

SMALL = dict(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
GPT2 = dict(family="decoder", activation="gelu_tanh", **SMALL)
LLAMA = dict(family="decoder", position="rope", norm="rmsnorm", activation="swiglu", bias=False,
             **SMALL)
BERT = dict(family="encoder", norm_placement="post", embedding_norm=True, type_vocab_size=2,
            pooler=True, **SMALL)
MARIAN = dict(family="encoder-decoder", position="sinusoidal", sinusoidal_layout="halves",
              norm_placement="post", activation="silu", **SMALL)


def _write(tmp_path: Path, fields: dict) -> Path:
    model = qkv.Transformer(qkv.ModelConfig(**fields))
    save_hf(model, None, tmp_path)
    return tmp_path


def _edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def _edit_tensors(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_weights_file(tmp_path):
    path = _write(tmp_path, GPT2)
    (path / "model.safetensors").unlink()
    with pytest.raises(qkv.CheckpointError, match="has no weights file"):
        load_hf(path)


def test_pickled_weights_are_refused(tmp_path):
    path = _write(tmp_path, GPT2)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(qkv.CheckpointError, match="convert it to safetensors"):
        qkv.load(path)


def test_truncated_weights_file(tmp_path):
    path = _write(tmp_path, GPT2)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(qkv.CheckpointError, match="not a readable safetensors file"):
        load_hf(path)


def test_tensor_of_wrong_shape(tmp_path):
    path = _write(tmp_path, BERT)

    def shrink(t):
        name = "encoder.layer.0.attention.self.key.weight"
        t[name] = t[name][:8]
    _edit_tensors(path, shrink)
    with pytest.raises(qkv.CheckpointError,
                       match=r"attention\.self\.key\.weight has shape \[8, 16\] but config.json "
                             r"implies \[16, 16\]"):
        load_hf(path)


def test_missing_tensor(tmp_path):
    path = _write(tmp_path, LLAMA)
    _edit_tensors(path, lambda t: t.pop("model.layers.0.mlp.gate_proj.weight"))
    with pytest.raises(qkv.CheckpointError, match=r"lacks tensor layers\.0\.mlp\.gate_proj"):
        load_hf(path)


def test_unknown_head_tensor(tmp_path):
    path = _write(tmp_path, BERT)
    _edit_tensors(path, lambda t: t.update({"qa_outputs.weight": torch.zeros(2, 16)}))
    with pytest.raises(qkv.UnsupportedModelError, match="no place for, e.g. qa_outputs.weight"):
        load_hf(path)


def test_unsupported_model_type(tmp_path):
    path = _write(tmp_path, GPT2)
    _edit_config(path, model_type="t5")
    with pytest.raises(qkv.UnsupportedModelError, match="model_type 't5'"):
        qkv.load(path)


def test_wrong_value_type_in_config(tmp_path):
    path = _write(tmp_path, GPT2)
    _edit_config(path, n_embd="sixteen")
    with pytest.raises(qkv.CheckpointError, match="config.json"):
        load_hf(path)


@pytest.mark.parametrize("fields, change, message", [
    (LLAMA, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_scaling of type 'linear'"),
    (LLAMA, {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling of type 'dynamic'"),
    (LLAMA, {"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
    (GPT2, {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    (GPT2, {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    (BERT, {"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    (MARIAN, {"activation_function": "tanh"}, "activation 'tanh'"),
    (MARIAN, {"decoder_ffn_dim": 99}, "different encoder and decoder feed-forward widths"),
])
def test_unsupported_config_feature(tmp_path, fields, change, message):
    path = _write(tmp_path, fields)
    _edit_config(path, **change)
    with pytest.raises(qkv.UnsupportedModelError, match=message):
        load_hf(path)


@pytest.mark.parametrize("pooling, message", [
    ({"pooling_mode": "mean_sqrt_len_tokens"}, "pooling mean_sqrt_len_tokens"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "pooling cls\\+mean"),
])
def test_unsupported_sentence_pooling(tmp_path, pooling, message):
    path = _write(tmp_path, BERT)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(qkv.UnsupportedModelError, match=message):
        load_hf(path)


def test_unsupported_sentence_module(tmp_path):
    path = _write(tmp_path, BERT)
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 9, "name": "9", "path": "9_Dense",
                    "type": "sentence_transformers.models.Dense"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(qkv.UnsupportedModelError, match="Dense module"):
        load_hf(path)


def test_missing_shard(tmp_path):
    path = _write(tmp_path, GPT2)
    names = load_file(str(path / "model.safetensors")).keys()
    index = {"weight_map": {name: "model-00001-of-00002.safetensors" for name in names}}
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(qkv.CheckpointError, match="names shard model-00001-of-00002"):
        load_hf(path)


@pytest.mark.parametrize("fields, message", [
    (dict(LLAMA, norm="layernorm"),
     "rope positions with layernorm fits no Hugging Face architecture qkv can write"),
    (dict(GPT2, norm="rmsnorm"), "a decoder with rmsnorm fits no Hugging Face architecture"),
    (dict(BERT, norm_placement="pre"), "an encoder with pre-LN fits no"),
    (dict(MARIAN, position="rope"), "an encoder-decoder with rope positions fits no"),
    (dict(GPT2, n_kv_heads=1), "grouped-query attention"),
])
def test_save_refuses_configs_no_architecture_fits(tmp_path, fields, message):
    model = qkv.Transformer(qkv.ModelConfig(**fields))
    with pytest.raises(qkv.UnsupportedModelError, match=message):
        qkv.save(model, None, tmp_path, format="hf")
    assert not (tmp_path / "model.safetensors").exists()


def test_architecture_choice():
    names = {name: architecture_for(qkv.ModelConfig(**fields)).model_type
             for name, fields in [("gpt2", GPT2), ("llama", LLAMA), ("bert", BERT),
                                  ("marian", MARIAN)]}
    assert names == {"gpt2": "gpt2", "llama": "llama", "bert": "bert", "marian": "marian"}


def test_convert_reports_errors(tmp_path, capsys):
    path = _write(tmp_path / "src", GPT2)
    _edit_config(path, model_type="t5")
    assert main(["convert", str(path), str(tmp_path / "dst")]) == 2
    assert "model_type 't5'" in capsys.readouterr().err


def test_convert_qkv_to_hf_and_back(tmp_path, capsys):
    model = qkv.Transformer(qkv.ModelConfig(**LLAMA))
    qkv.save(model, None, tmp_path / "mine")
    assert main(["convert", str(tmp_path / "mine"), str(tmp_path / "hf")]) == 0
    assert "(hf format)" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "again"), "--to", "qkv"]) == 0
    again, _ = qkv.load(tmp_path / "again")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
