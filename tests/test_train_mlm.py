"""qkv train --family encoder: masked-LM pre-training of a BERT through the training loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import qkv
from conftest import losses, same_weights
from qkv import ConfigError
from qkv.cli import main
from qkv.data import BUNDLED
from qkv.tasks.mlm import masked_lm_loss, masked_lm_objective, masked_positions
from qkv.train import TrainConfig, read_log
from qkv.train import train as train_lm
from qkv.train.lm import mean_loss

TEXT = BUNDLED.read_text(encoding="utf-8")[:30_000]


def tiny_bert(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    """A 2-layer, 32-wide bert-tiny with a 400-token wordpiece vocabulary on 30k characters."""
    data = tmp_path / "data.txt"
    if not data.exists():
        data.write_text(TEXT, encoding="utf-8")
    options = dict(family="encoder", data=str(data), vocab_size=400, n_layers=2, d_model=32,
                   n_heads=2, context=32, batch_size=4, max_steps=10, warmup_steps=2,
                   eval_every=4, eval_windows=16, log_every=1, lr=3e-3, out=str(tmp_path / name),
                   precision="fp32", device="cpu", progress=False, seed=0,
                   cache_dir=str(tmp_path / "cache"), dropout=0.1, threads=1)
    return TrainConfig(**{**options, **overrides})


def train(cfg: TrainConfig, **options):
    """`qkv train --family encoder`: the loop with the masked-LM objective."""
    return train_lm(cfg, objective=masked_lm_objective, **options)


def test_masked_lm_training_learns_and_saves_a_loadable_bert(tmp_path):
    result = train(tiny_bert(tmp_path, max_steps=30, eval_every=10, dropout=0.0))
    assert result.model.config.family == "encoder"
    log = read_log(tmp_path / "run")
    assert all(math.isfinite(r["train_loss"]) for r in log)
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert vals[-1] < vals[0] < math.log(400) + 1  # from about log(vocab) down

    model, tokenizer = qkv.load(tmp_path / "run")
    assert tokenizer.kind == "wordpiece" and tokenizer.mask_id is not None
    assert model.config.family == "encoder" and model.mlm_transform is not None
    filled = qkv.tasks.mlm.fill_mask(model, tokenizer, "the [MASK] of the king", top_k=3)
    assert len(filled[0]) == 3


def test_validation_loss_counts_only_the_masked_positions():
    model = qkv.Transformer(qkv.presets.get("bert-tiny", vocab_size=50, n_layers=1, d_model=16,
                                            n_heads=2, max_seq_len=8))
    x = torch.randint(5, 50, (2, 8))
    y = torch.full_like(x, -100)
    y[0, 3], y[1, 5] = x[0, 3], x[1, 5]
    with torch.no_grad():
        logits = model.eval()(x)
    expected = torch.nn.functional.cross_entropy(logits[y != -100], y[y != -100]).item()
    assert mean_loss(model, [(x, y)], masked_lm_loss, torch.device("cpu")) == \
        pytest.approx(expected, rel=1e-5)


def test_the_training_loss_sees_only_masked_positions_in_a_few_shapes():
    model = qkv.Transformer(qkv.presets.get("bert-tiny", vocab_size=50, n_layers=1, d_model=16,
                                            n_heads=2, max_seq_len=32))
    x = torch.randint(5, 50, (4, 32))
    counts = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        picked = torch.rand(x.shape, generator=g) < 0.15
        picked[0, 0] = True  # a target at index 0 must not be used as padding
        y = torch.where(picked, x, -100)
        index = masked_positions(y.flatten())
        counts.add(len(index))
        assert len(index) % 64 == 0
        assert set(index.tolist()) - set(picked.flatten().nonzero().flatten().tolist()) <= \
            {int((~picked.flatten()).int().argmax())}  # the padding: one unmasked position
        logits = model(x)
        expected = torch.nn.functional.cross_entropy(logits[picked], x[picked])
        assert masked_lm_loss(model, x, y).item() == pytest.approx(
            expected.item(), rel=1e-5)
    assert counts == {64}  # ~19 of 128 masked: always padded to one shape
    everything = torch.arange(100) % 50  # no position without a target: nothing to pad with
    assert torch.equal(masked_positions(everything), torch.arange(100))


def test_an_interrupted_masked_lm_run_resumes_exactly(tmp_path, interrupt_then_resume):
    def run(name, callback=None, resume=False):
        return train(tiny_bert(tmp_path, name), resume=resume, callback=callback)

    full, cut, resumed = interrupt_then_resume(run, step=5)  # not an evaluation step
    assert cut.step == 5
    state = json.loads((tmp_path / "cut" / "training" / "state.json").read_text())
    assert state["sampler"]["drawn"] == 10 and state["sampler"]["batches"]["drawn"] == 10
    assert resumed.step == 10
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # every step, 1..10
    assert same_weights(resumed.model, full.model)


def test_a_preset_of_the_other_family_or_a_tokenizer_without_mask_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="preset 'gpt-char-tiny' has family decoder, not "
                                          "encoder; pass --family decoder"):
        tiny_bert(tmp_path, preset="gpt-char-tiny")
    with pytest.raises(ConfigError, match="preset 'bert-tiny' has family encoder, not decoder"):
        TrainConfig(preset="bert-tiny")
    with pytest.raises(ConfigError, match=r"needs a \[MASK\] token and the char tokenizer"):
        tiny_bert(tmp_path, tokenizer="char")
    assert TrainConfig(family="encoder").preset == "bert-tiny"
    assert TrainConfig(family="encoder").tokenizer == "wordpiece"
    assert (TrainConfig().preset, TrainConfig().tokenizer) == ("gpt-char-small", "char")


def test_the_command_line_trains_a_bert_and_fills_in_a_mask(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("tiny.txt").write_text(TEXT, encoding="utf-8")
    code = main(["train", "--family", "encoder", "--data", "tiny.txt", "--vocab-size", "400",
                 "--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--context", "32",
                 "--batch-size", "4", "--max-steps", "4", "--eval-every", "2",
                 "--eval-windows", "8", "--threads", "1", "--no-progress", "--out", "bert"])
    out = capsys.readouterr().out
    assert code == 0
    assert "--- fill-mask: " in out and "[MASK]" in out and "next: qkv fill-mask bert" in out
    assert json.loads(Path("bert/config.json").read_text())["family"] == "encoder"


def test_an_encoder_is_never_trained_by_next_token_prediction(tmp_path):
    with pytest.raises(ConfigError, match="pass objective=qkv.tasks.mlm.masked_lm_objective"):
        train_lm(tiny_bert(tmp_path))  # the default objective is next-token prediction
