"""`qkv train`, `qkv generate`, `qkv eval` on the command line: user mistakes and a smoke run."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qkv.cli
import qkv.errors
from qkv.cli import build_parser, main
from qkv.commands._args import parse_duration
from qkv.data import BUNDLED

SRC = Path(__file__).resolve().parents[1] / "src"
TEXT = BUNDLED.read_text(encoding="utf-8")[:30_000]
TINY = ["--preset", "gpt-char-tiny", "--n-layers", "1", "--d-model", "32", "--n-heads", "2",
        "--context", "32", "--batch-size", "4", "--eval-windows", "8", "--threads", "1",
        "--no-progress"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("tiny.txt").write_text(TEXT, encoding="utf-8")
    Path("empty.txt").write_text("")
    Path("short.txt").write_text("To be, or not to be.\n")
    Path("photo.jpg").write_bytes(bytes([0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, 0x4A, 0x46]) * 8)
    Path("not-a-model").mkdir()
    return tmp_path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "missing.txt"], "data path missing.txt does not exist"),
    (["train", "--data", "empty.txt"], "empty.txt is empty"),
    (["train", "--data", "photo.jpg"], "photo.jpg is not UTF-8 text"),
    (["train", "--data", "short.txt", *TINY], "the corpus is too short"),
    (["train", "--resume", "--out", "nowhere"], "holds no training checkpoint"),
    (["train", "--preset", "no-such-preset"], "unknown preset"),
    (["train", "--family", "encoder-decoder", "--src", "de", "--tgt", "en", "--nproc", "2"],
     "translation training (--family encoder-decoder or rnn) runs in one process"),
    (["generate", "not-a-model", "--prompt", "x"], "is not a model directory"),
    (["generate", "tiny.txt", "--prompt", "x"], "is not a directory"),
    (["eval", "not-a-model", "--data", "tiny.txt"], "is not a model directory"),
    (["eval", "not-a-model", "--data", "photo.jpg"], "photo.jpg is not UTF-8 text"),
])
def test_user_mistakes_are_one_line_and_exit_code_2(workdir, capsys, argv, message):
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"qkv {argv[0]}: error: ") and message in line


@pytest.mark.parametrize("argv, message", [
    (["train", "--time-limit", "abc"], "'abc' is not a duration"),
    (["train", "--batch-size", "0"], "'0' must be at least 1"),
    (["train", "--lr", "fast"], "'fast' is not a number"),
    (["train", "--precision", "fp8"], "invalid choice: 'fp8'"),
    (["generate", "runs/x", "--top-k", "-3"], "'-3' must be at least 1"),
    (["classify", "runs/x", "text", "--top-k", "0"], "'0' must be at least 1"),
    (["fill-mask", "runs/x", "a [MASK]", "--top-k", "0"], "'0' must be at least 1"),
    (["search", "runs/x", "query", "--top-k", "0"], "'0' must be at least 1"),
    (["embed", "corpus.txt", "--out", "x", "--batch-size", "0"], "'0' must be at least 1"),
    (["train", "--device", "gpu"], "device='gpu' is not one of"),
    (["eval", "runs/x", "--device", "cuda:x"], "device='cuda:x' is not one of"),
    (["generate", "runs/x", "--device", "tpu"], "device='tpu' is not one of"),
    (["finetune", "classify", "--model", "m", "--train", "t.tsv", "--out", "o", "--device",
      "gpu"], "device='gpu' is not one of"),
    (["finetune", "classify", "--model", "m", "--train", "t.tsv", "--out", "o", "--epochs",
      "0"], "'0' must be at least 1"),
    (["finetune", "classify", "--train", "t.tsv"], "the following arguments are required"),
    (["info"], "the following arguments are required: dir"),
    (["convert"], "the following arguments are required"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
])
def test_bad_flag_values_are_one_line_and_exit_code_2(workdir, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    line = one_error_line(capsys)
    prog = "qkv" if argv[0].startswith("no-such") else f"qkv {argv[0]}"
    assert line.startswith(f"{prog}") and ": error: " in line and message in line


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("1.5h", 5400), (" 2M ", 120)])
def test_time_limits_read_like_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "message"), [
    ("0", "positive"), ("0s", "positive"), ("9" * 400, "finite"), ("-5", "not a duration"),
    ("5 minutes", "not a duration"), ("", "not a duration"), ("1e3", "not a duration")])
def test_bad_time_limits_are_refused(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_duration(text)


@pytest.mark.parametrize("command", [
    ["train"], ["finetune", "classify", "--model", "m", "--train", "t.tsv", "--out", "o"]])
def test_every_time_limit_reads_the_same(command, capsys):
    args = build_parser().parse_args([*command, "--time-limit", "5m"])
    assert args.time_limit == 300
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([*command, "--time-limit", "soon"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'soon' is not a duration" in err


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qkv.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_train_then_generate_then_eval_from_the_command_line(workdir):
    trained = run_cli("train", "--data", "tiny.txt", *TINY, "--max-steps", "6",
                      "--eval-every", "3", "--out", "run", "--sample-tokens", "20")
    assert trained.returncode == 0, trained.stderr
    assert "best val loss" in trained.stdout and "--- sample ---" in trained.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "log.jsonl",
            "training"} <= {p.name for p in Path("run").iterdir()}
    assert [json.loads(line)["step"] for line in Path("run/log.jsonl").read_text().splitlines()] \
        == [3, 6]  # log lines every 10 steps and at every evaluation

    generated = run_cli("generate", "run", "--prompt", "ROMEO:", "--max-new-tokens", "25",
                        "--seed", "0")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("ROMEO:") and len(generated.stdout) > 10

    evaluated = run_cli("eval", "run", "--data", "tiny.txt", "--max-windows", "20")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "perplexity" in evaluated.stdout


@pytest.mark.slow
def test_ctrl_c_saves_and_prints_the_resume_command(workdir):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkv.cli", "train", "--data", "tiny.txt", *TINY, "--out", "run",
         "--max-steps", "100000", "--log-every", "1", "--eval-every", "100000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = Path("run/log.jsonl")
    deadline = time.time() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resume with:\n  qkv train --out run --resume" in err
    step = json.loads(Path("run/training/state.json").read_text())["step"]
    assert step >= 3

    resumed = run_cli("train", "--out", "run", "--resume", "--max-steps", str(step + 2),
                      "--sample-tokens", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run at step {step}" in resumed.stderr
    assert json.loads(Path("run/training/state.json").read_text())["step"] == step + 2


@pytest.mark.parametrize("error", [qkv.errors.ConfigError, qkv.errors.CheckpointError,
                                   qkv.errors.InputError, qkv.errors.TokenizerError,
                                   qkv.errors.UnsupportedModelError, qkv.errors.PrecisionError])
def test_every_qkv_error_reaches_the_command_line_as_one_line_and_status_2(
        workdir, capsys, monkeypatch, error):
    def fail(args):
        raise error("the sentence that names the problem")

    monkeypatch.setattr(qkv.cli, "build_parser", _parser_with(fail))
    assert main(["info", "anything"]) == 2
    assert one_error_line(capsys) == "qkv info: error: the sentence that names the problem"


def _parser_with(func):
    def build():
        parser = build_parser()
        parser.set_defaults(func=func)
        for action in parser._subparsers._group_actions:  # every subcommand runs `func`
            for sub in action.choices.values():
                sub.set_defaults(func=func)
        return parser
    return build


def test_translation_under_torchrun_is_refused_not_run_twice(workdir, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: each copy would train alone
    data = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "multi30k"
    assert main(["train", "--family", "rnn", "--src", "de", "--tgt", "en", "--data", str(data),
                 "--out", "run"]) == 2
    assert "runs in one process" in one_error_line(capsys)
    assert not Path("run").exists()
