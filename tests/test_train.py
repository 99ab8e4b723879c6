"""qkv.train: schedule, optimizer state, checkpoints, and resume == uninterrupted."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv
from conftest import interrupt_at, losses, same_weights
from qkv import CheckpointError, ConfigError
from qkv.data import BUNDLED
from qkv.train import TrainConfig, read_log, train
from qkv.train.checkpoint import find_training_checkpoint, save_training_checkpoint
from qkv.train.optim import (
    load_optimizer_tensors,
    lr_at,
    make_optimizer,
    optimizer_tensors,
)

SRC = Path(__file__).resolve().parents[1] / "src"
TEXT = BUNDLED.read_text(encoding="utf-8")[:30_000]


def tiny(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    """A 2-layer, 32-wide char GPT on 30k characters: 20 updates take well under a second."""
    data = tmp_path / "data.txt"
    if not data.exists():
        data.write_text(TEXT, encoding="utf-8")
    options = dict(data=str(data), preset="gpt-char-tiny", n_layers=2, d_model=32, n_heads=2,
                   context=32, batch_size=4, max_steps=20, warmup_steps=4, eval_every=6,
                   eval_windows=16, log_every=1, out=str(tmp_path / name), precision="fp32",
                   device="cpu", progress=False, seed=0, cache_dir=str(tmp_path / "cache"),
                   dropout=0.1, threads=1)  # dropout: the random state must be resumed too
    return TrainConfig(**{**options, **overrides})


def test_learning_rate_warms_up_then_decays_by_cosine():
    assert lr_at(0, 1.0, 0.1, warmup=10, total=110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 0.1, warmup=10, total=110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 0.1, warmup=10, total=110) == pytest.approx(0.55)  # half way
    assert lr_at(110, 1.0, 0.1, warmup=10, total=110) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 0.1, warmup=10, total=110) == pytest.approx(0.1)


def test_weight_decay_applies_to_matrices_only():
    model = qkv.Transformer(qkv.presets.get("gpt-char-tiny", n_layers=1, bias=True))
    opt = make_optimizer(model, 1e-3, 0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"]) and plain["params"]
    assert model.token_embedding.weight in decayed["params"]  # embeddings decay too (as in nanoGPT)


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = qkv.Transformer(qkv.presets.get("gpt-char-tiny", n_layers=1))
    names = {id(p): n for n, p in model.named_parameters()}
    opt = make_optimizer(model, 1e-2, 0.1)
    x = torch.randint(0, 65, (2, 16))
    for _ in range(2):
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    tensors, metadata = optimizer_tensors(opt, names)
    assert "decoder.layers.0.ffn.up.weight/exp_avg" in tensors
    save_file(tensors, str(tmp_path / "opt.safetensors"), metadata=metadata)

    copy = qkv.Transformer(model.config)
    copy.load_state_dict(model.state_dict())
    opt2 = make_optimizer(copy, 1.0, 0.0)  # hyperparameters come from the file
    load_optimizer_tensors(opt2, {id(p): n for n, p in copy.named_parameters()},
                           load_file(str(tmp_path / "opt.safetensors")), metadata)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["weight_decay"] == 0.1
    for m, o in ((model, opt), (copy, opt2)):
        m(x).logsumexp(-1).mean().backward()
        o.step()
    assert same_weights(model, copy)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path,
                                                                interrupt_then_resume):
    def run(name, callback=None, resume=False):
        return train(tiny(tmp_path, name), resume=resume, callback=callback)

    full, cut, resumed = interrupt_then_resume(run, step=10)  # not an evaluation step
    assert full.step == 20 and full.stopped_by is None and cut.step == 10
    state = json.loads((tmp_path / "cut" / "training" / "state.json").read_text())
    assert state["step"] == 20 and state["sampler"]["drawn"] == 20  # the resumed run's
    assert resumed.step == 20
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # every step, 1..20
    assert same_weights(resumed.model, full.model)
    assert resumed.best_val_loss == full.best_val_loss


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_checkpoint_keeps_the_previous_one(tmp_path):
    cfg = tiny(tmp_path, "killed")
    script = (
        "import os, signal, sys\n"
        "import qkv.train.checkpoint as ck\n"
        "from qkv.train import TrainConfig, train\n"
        "real, calls = ck.write_json, []\n"
        "def crash(path, data):\n"
        "    calls.append(path)\n"
        "    if len(calls) == 2:  # 2nd checkpoint: weights + optimizer written, state not yet\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(path, data)\n"
        "ck.write_json = crash\n"
        f"train(TrainConfig(**{cfg.to_dict()!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = tmp_path / "killed"
    assert (run / "training.tmp").is_dir()  # the half-written checkpoint
    assert find_training_checkpoint(run) == run / "training"
    assert json.loads((run / "training" / "state.json").read_text())["step"] == 6

    resumed = train(cfg, resume=True)  # from step 6, the last complete checkpoint
    assert not (run / "training.tmp").exists()
    full = train(tiny(tmp_path, "full"))
    assert [s for s, _, _ in losses(run)] == list(range(1, 21))
    assert losses(run) == losses(tmp_path / "full")
    assert same_weights(resumed.model, full.model)


def test_a_swap_cut_between_its_two_renames_leaves_the_old_checkpoint(tmp_path):
    model = qkv.Transformer(qkv.presets.get("gpt-char-tiny", n_layers=1))
    save_training_checkpoint(tmp_path, model, ({}, {}), {"step": 3})
    os.replace(tmp_path / "training", tmp_path / "training.old")  # killed right here
    assert find_training_checkpoint(tmp_path) == tmp_path / "training.old"
    save_training_checkpoint(tmp_path, model, ({}, {}), {"step": 4})
    assert find_training_checkpoint(tmp_path) == tmp_path / "training"
    assert not (tmp_path / "training.old").exists()


def test_seeded_runs_are_reproducible_and_the_run_dir_loads(tmp_path):
    a = train(tiny(tmp_path, "a", max_steps=8, eval_every=4))
    b = train(tiny(tmp_path, "b", max_steps=8, eval_every=4))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    record = read_log(tmp_path / "a")[-1]
    assert {"step", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s",
            "elapsed"} <= record.keys()
    assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]), rel=1e-4)
    model, tokenizer = qkv.load(tmp_path / "a")  # the best model, a normal model directory
    assert tokenizer.kind == "char" and model.config.max_seq_len == 32
    assert a.best_val_loss == pytest.approx(min(r["val_loss"] for r in read_log(tmp_path / "a")
                                                if "val_loss" in r), abs=1e-6)
    assert b.model is not a.model


def test_an_existing_run_is_never_overwritten_silently(tmp_path):
    train(tiny(tmp_path, max_steps=2, eval_every=2))
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny(tmp_path, max_steps=2))
    assert train(tiny(tmp_path, max_steps=2), overwrite=True).step == 2
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        train(tiny(tmp_path, "nothing-here"), resume=True)


def test_bf16_training_and_gradient_accumulation_run(tmp_path):
    result = train(tiny(tmp_path, precision="bf16", grad_accum=2, max_steps=4, eval_every=4))
    assert result.precision == "bf16" and math.isfinite(result.val_loss)
    assert read_log(tmp_path / "run")[0]["tokens"] == 2 * 4 * 32


def test_a_time_limit_fits_the_schedule_to_the_time(tmp_path):
    result = train(tiny(tmp_path, max_steps=None, time_limit=2.0, log_every=100,
                        eval_every=10_000))
    assert result.max_steps > 12 and result.elapsed < 10
    assert result.stopped_by in (None, "time limit")


def test_the_time_fit_is_made_again_after_each_evaluation():
    from qkv.train.optim import CALIBRATION_STEPS, fit_schedule
    start = (2, 1.0)
    step = 2 + CALIBRATION_STEPS
    # first fit: 0.1 s per update, evaluations guessed at 5 updates every 100
    first = fit_schedule(step, 1.0 + 0.1 * CALIBRATION_STEPS, 100.0, 5.0, 100, start)[0]
    assert first is not None and 900 < first < 960
    # by update 300 the run took twice as long as timed (busier machine, dearer evaluations):
    # the refit spreads the time left over the slower rate, evaluations included in it
    refit = fit_schedule(300, 1.0 + 0.2 * 298, 100.0, 5.0, 100, start, refit=True)[0]
    assert refit is not None and refit == 300 + int(0.97 * (100.0 - 60.6) / 0.2)
    # out of time: one more update, never fewer than done
    assert fit_schedule(300, 120.0, 100.0, 5.0, 100, start, refit=True)[0] == 301


def test_a_failing_torch_compile_falls_back_with_one_warning(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    result = train(tiny(tmp_path, compile=True, max_steps=2, eval_every=2))
    assert result.step == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qkv: warning: torch.compile failed (RuntimeError: no compiler here); "
                   "training without it"]


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 0}, "batch_size=0 must be a positive whole number"),
    ({"max_steps": None}, "max_steps or time_limit"),
    ({"precision": "fp8"}, "precision='fp8' is not one of"),
    ({"device": "tpu"}, "device='tpu' is not one of"),
    ({"time_limit": 0.0}, "time_limit=0.0 must be a positive number"),
    ({"warmup_steps": -1}, "warmup_steps=-1 cannot be negative"),
    ({"lr": 0.0}, "lr=0.0 must be positive"),
])
def test_bad_training_settings_name_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_a_bpe_run_tokenizes_with_its_own_vocabulary(tmp_path):
    result = train(tiny(tmp_path, tokenizer="bpe", vocab_size=300, max_steps=2, eval_every=2))
    assert result.tokenizer.kind == "bpe" and result.model.config.vocab_size == 300
    assert list((tmp_path / "cache").glob("tokens-*.uint16.bin"))


def test_a_checkpoint_written_before_objectives_still_resumes(tmp_path):
    cut = train(tiny(tmp_path, "cut"), callback=interrupt_at(10))
    state_path = tmp_path / "cut" / "training" / "state.json"
    state = json.loads(state_path.read_text())
    best = state.pop("best")["val_loss"]
    state.update(tokens_seen=state.pop("seen"), best_val_loss=best)
    del state["best_step"]
    state_path.write_text(json.dumps(state))  # the state.json of qkv before the Objective
    resumed = train(tiny(tmp_path, "cut"), resume=True)
    train(tiny(tmp_path, "full"))
    assert cut.stopped_by == "SIGINT" and resumed.step == 20
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
