import json

import pytest
import torch

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
    assert cfg.n_encoder_layers == 3 and cfg.n_decoder_layers == 1 and cfg.head_dim == 8
    assert data["head_dim"] is None and data["n_kv_heads"] == 2  # left out: it follows d_model


def test_sizes_left_out_follow_the_others_after_replace():
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=None, activation="gelu")
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.final_norm) == (4, 16, 256, True)
    assert (cfg.n_encoder_layers, cfg.n_decoder_layers) == (0, cfg.n_layers)
    wider = cfg.replace(n_heads=8, d_model=128, activation="swiglu", norm_placement="post")
    assert (wider.n_kv_heads, wider.head_dim, wider.d_ff, wider.final_norm) == (8, 16, 384, False)
    assert cfg.replace(family="encoder-decoder", n_layers=3).n_encoder_layers == 3
    gqa = ModelConfig(n_heads=4, n_kv_heads=2, d_ff=100)  # given sizes are kept
    assert (gqa.replace(n_heads=8).n_kv_heads, gqa.replace(d_model=256).d_ff) == (2, 100)
    assert cfg == ModelConfig(d_model=64, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=256)


def test_config_json_of_earlier_versions_loads(tmp_path):
    old = {"family": "decoder", "d_model": 64, "n_heads": 4, "n_kv_heads": None,
           "head_dim": None, "d_ff": None, "final_norm": None, "n_encoder_layers": None,
           "n_decoder_layers": None, "qkv_version": "0.1.0"}
    cfg = ModelConfig.from_json(json.dumps(old))
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.n_decoder_layers) == (4, 16, 256, 4)


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
    (dict(family="decoder", n_encoder_layers=2), "n_encoder_layers=2 does not fit family"),
    (dict(family="encoder-decoder", n_decoder_layers=0), "n_decoder_layers=0 does not fit"),
    (dict(d_ff=0), "d_ff=0 must be at least 1"),
])
def test_bad_values_name_the_field(changes, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**changes)
    assert message in str(err.value)


@pytest.mark.parametrize("source, message", [
    ({"d_model": 64, "hidden_size": 64}, "unknown config field\\(s\\): hidden_size"),
    ([64], "must be a JSON object, got list"),
    ('{"d_model": 64,', "not valid JSON"),
    ("missing.json", "does not exist"),
])
def test_bad_config_sources_name_the_problem(tmp_path, source, message):
    with pytest.raises(ConfigError, match=message):
        if isinstance(source, str) and not source.startswith("{"):
            ModelConfig.from_json(tmp_path / source)
        elif isinstance(source, str):
            ModelConfig.from_json(source)
        else:
            ModelConfig.from_dict(source)


def test_presets():
    assert {"gpt-char-tiny", "gpt2-124m", "bert-base", "minilm-l6", "transformer-base",
            "llama-tiny"} <= set(presets.names())
    gpt2 = presets.get("gpt2-124m")
    assert (gpt2.d_model, gpt2.n_layers, gpt2.n_heads, gpt2.max_seq_len) == (768, 12, 12, 1024)
    base = presets.get("transformer-base")
    assert (base.d_model, base.d_ff, base.n_heads, base.position) == (512, 2048, 8, "sinusoidal")
    assert presets.get("gpt2-124m", n_layers=2).n_layers == 2
    with pytest.raises(ConfigError, match="unknown preset"):
        presets.get("gpt5")


@pytest.mark.parametrize("preset, count", [
    ("gpt2-124m", 124_439_808),  # GPT-2 small, tied output layer, as Hugging Face counts it
    # BERT base: BertModel (pooler included) 109,482,240, plus the MLM transform (dense 590,592
    # + LayerNorm 1,536) and the output bias (30,522); the output matrix is tied.
    ("bert-base", 110_104_890),
])
def test_preset_parameter_counts_match_the_published_models(preset, count):
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = qkv.Transformer(presets.get(preset))
    assert model.num_parameters() == count


def test_swiglu_width_keeps_parameter_budget():
    cfg = ModelConfig(d_model=256, activation="swiglu")
    assert cfg.d_ff % 64 == 0 and abs(3 * cfg.d_ff - 8 * 256) <= 3 * 64
