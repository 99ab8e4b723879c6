import json

import pytest

import qkv
from qkv import ConfigError, ModelConfig, presets


def test_json_round_trip(tmp_path):
    cfg = ModelConfig(family="encoder-decoder", vocab_size=100, d_model=64, n_heads=8,
                      n_kv_heads=2, n_encoder_layers=3, n_decoder_layers=1, position="rope",
                      labels=["neg", "pos"])
    path = tmp_path / "config.json"
    cfg.to_json(path)
    data = json.loads(path.read_text())
    assert data["qkv_version"] == qkv.__version__
    assert ModelConfig.from_json(path) == cfg
    assert cfg.encoder_layers == 3 and cfg.decoder_layers == 1 and cfg.d_head == 8


@pytest.mark.parametrize("changes, message", [
    (dict(d_model=100, n_heads=3), "d_model=100 is not divisible by n_heads=3"),
    (dict(n_heads=4, n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
    (dict(family="gpt"), "family='gpt' is not one of"),
    (dict(position="alibi"), "position='alibi' is not one of"),
    (dict(activation="tanh"), "activation='tanh' is not one of"),
    (dict(norm_placement="middle"), "norm_placement='middle'"),
    (dict(dropout=1.5), "dropout=1.5 must be in [0, 1)"),
    (dict(n_layers=0), "n_layers=0 must be at least 1"),
    (dict(d_model="128"), "d_model must be int"),
    (dict(bias="yes"), "bias must be bool"),
    (dict(pad_token_id=300), "pad_token_id=300 is outside the vocabulary"),
    (dict(labels=["a", "a"]), "duplicate class name"),
    (dict(position="rope", d_model=36, n_heads=4), "rope needs an even head size"),
])
def test_bad_values_name_the_field(changes, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**changes)
    assert message in str(err.value)


def test_from_dict_rejects_unknown_fields_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.from_dict({"d_model": 64, "hidden_size": 64})
    bad = tmp_path / "config.json"
    bad.write_text('{"d_model": 64,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "missing.json")


def test_presets():
    assert {"gpt-char-tiny", "gpt2-124m", "bert-base", "minilm-l6", "transformer-base",
            "llama-tiny"} <= set(presets.names())
    gpt2 = presets.get("gpt2-124m")
    assert (gpt2.d_model, gpt2.n_layers, gpt2.n_heads, gpt2.max_seq_len) == (768, 12, 12, 1024)
    base = presets.get("transformer-base")
    assert (base.d_model, base.ff_dim, base.n_heads, base.position) == (512, 2048, 8, "sinusoidal")
    assert presets.get("gpt2-124m", n_layers=2).n_layers == 2
    with pytest.raises(ConfigError, match="unknown preset"):
        presets.get("gpt5")


def test_preset_parameter_counts_match_the_published_models():
    # GPT-2 small: 124,439,808 parameters (tied output layer), as counted by Hugging Face.
    assert qkv.Transformer(presets.get("gpt2-124m")).num_parameters() == 124_439_808


def test_swiglu_width_keeps_parameter_budget():
    cfg = ModelConfig(d_model=256, activation="swiglu")
    assert cfg.ff_dim % 64 == 0 and abs(3 * cfg.ff_dim - 8 * 256) <= 3 * 64
