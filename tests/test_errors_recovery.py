"""Issue 10, class by class: every bad input gets one clear error, and nothing is ever lost.

Numbers that aren't (refused before anything is allocated), the filesystem's refusals (one
sentence; atomic writes leave the old files under a full disk), models never overwritten
without --overwrite, readers that validate (state.json, log.jsonl, token caches, search
indexes, Hugging Face configs, deep JSON, long CSV fields), and sampling that cannot crash.
The property-based (Hypothesis) versions are in tests/test_fuzz_*.py.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qkv
from conftest import tiny_config
from qkv.cli import main
from qkv.config import check_number, check_seed
from qkv.data.labelled import read_labelled
from qkv.data.tokens import tokenize_corpus
from qkv.errors import StorageError
from qkv.generate import sample_next
from qkv.hf import save_hf
from qkv.io import atomic_write_text, check_new_output, os_error_sentence, read_json_object
from qkv.tasks.classify import ClassifySettings
from qkv.tasks.search import SearchIndex
from qkv.train import TrainConfig, read_log
from qkv.train.checkpoint import read_state, save_training_checkpoint
from qkv.train.log import truncate_log

SRC = Path(__file__).resolve().parents[1] / "src"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    tok = qkv.Tokenizer.train(["hello world, to be or not to be"], kind="char")
    model = qkv.Transformer(tiny_config(vocab_size=tok.vocab_size, max_seq_len=32))
    return qkv.save(model, tok, tmp_path / "model")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------------- 1. numbers that aren't

@pytest.mark.parametrize("argv, words", [
    (["train", "--lr", "inf"], "positive number"),
    (["train", "--weight-decay", "nan"], "finite"),
    (["train", "--grad-clip", "-1"], "negative"),
    (["train", "--time-limit", "-5"], "duration"),
    (["train", "--seed", str(2**70)], "2**64"),
    (["train", "--dropout", "1.5"], "between 0 and 1"),
    (["generate", "x", "--temperature", "nan"], "finite"),
    (["generate", "x", "--top-p", "inf"], "finite"),
    (["generate", "x", "--seed", "-1"], "2**64"),
    (["finetune", "classify", "--model", "m", "--train", "t", "--out", "o",
      "--weight-decay=-inf"], "finite"),
])
def test_bad_numbers_are_one_line_and_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert words in one_error_line(capsys)


@pytest.mark.parametrize("field, value", [
    ("lr", math.inf), ("weight_decay", math.nan), ("grad_clip", math.inf),
    ("time_limit", -1.0), ("seed", 2**64), ("seed", -3), ("min_lr", math.nan)])
def test_train_config_refuses_non_finite_and_out_of_range(field, value):
    with pytest.raises(qkv.ConfigError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("weight_decay", math.nan), ("grad_clip", -1.0),
                                          ("seed", 2**70), ("lr", math.inf)])
def test_classify_settings_refuse_bad_numbers(field, value):
    with pytest.raises(qkv.InputError):
        ClassifySettings(**{field: value}).check()


@pytest.mark.parametrize("field", ["norm_eps", "rope_theta"])
def test_model_config_refuses_non_finite(field):
    with pytest.raises(qkv.ConfigError, match=field):
        qkv.ModelConfig(**{field: math.nan})


def test_check_number_and_seed():
    assert check_number("x", 0.5, 0, 1) == 0.5
    for bad in (math.nan, math.inf, "1", True, None):
        with pytest.raises(qkv.ConfigError, match="x="):
            check_number("x", bad)
    with pytest.raises(qkv.ConfigError, match="must be > 0"):
        check_number("x", 0, 0, low_open=True)
    assert check_seed(2**64 - 1) == 2**64 - 1
    with pytest.raises(qkv.ConfigError):
        check_seed(2**64)


def test_a_model_larger_than_memory_is_refused_with_its_size():
    cfg = qkv.ModelConfig(vocab_size=10**9, d_model=4096, n_layers=2, n_heads=32)
    with pytest.raises(qkv.ConfigError, match=r"GiB of weights, more than this machine"):
        qkv.Transformer(cfg)


@pytest.mark.parametrize("overrides", [
    {}, {"tie_embeddings": False}, {"activation": "swiglu", "bias": False, "norm": "rmsnorm",
                                     "position": "rope", "n_kv_heads": 2},
    {"family": "encoder", "labels": ["a", "b"], "pooler": True}])
def test_parameter_count_is_close_to_the_real_one(overrides):
    cfg = tiny_config(**overrides)
    real = qkv.Transformer(cfg).num_parameters()
    assert abs(cfg.parameter_count() - real) <= 0.03 * real


# ---------------------------------------------------------------------- 2. the filesystem

def _full(monkeypatch, target: str = "write_text") -> None:
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, target, no_space)


def test_a_full_disk_keeps_the_old_file_and_says_so(tmp_path, monkeypatch):
    file = tmp_path / "config.json"
    atomic_write_text(file, "old")
    _full(monkeypatch)
    with pytest.raises(StorageError, match=f"no space left while writing {file}; nothing was "
                                           "replaced"):
        atomic_write_text(file, "new")
    monkeypatch.undo()
    assert file.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model = qkv.Transformer(tiny_config())
    state = {"step": 1, "max_steps": 2, "best": None, "best_step": 0, "elapsed": 0.0, "seen": 1,
             "sampler": {}, "rng": {"torch": "AA=="}}
    save_training_checkpoint(tmp_path, model, ({}, {}), state)
    before = snapshot(tmp_path)
    import qkv.train.checkpoint as ckpt

    def no_space(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")  # what safetensors raises
    monkeypatch.setattr(ckpt, "save_file", no_space)
    with pytest.raises(StorageError, match="no space left"):
        save_training_checkpoint(tmp_path, model, ({}, {}), {**state, "step": 2})
    assert snapshot(tmp_path) == before
    assert read_state(tmp_path / "training")["step"] == 1


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def test_a_real_full_disk_keeps_the_saved_model(tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "256k"):
        pytest.skip("mounting a small tmpfs needs root (the simulated tests above still ran)")
    try:
        tok = qkv.Tokenizer.train(["abc"], kind="char")
        small = qkv.Transformer(tiny_config(vocab_size=tok.vocab_size, d_model=8, n_heads=2))
        qkv.save(small, tok, disk / "m")
        before = snapshot(disk / "m")
        big = qkv.Transformer(tiny_config(vocab_size=tok.vocab_size, d_model=128, n_heads=2))
        with pytest.raises(StorageError, match="no space left"):
            qkv.save(big, tok, disk / "m")
        assert snapshot(disk / "m") == before
        model, _ = qkv.load(disk / "m")
        assert model.config.d_model == 8
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left while writing f; nothing was replaced"),
    (errno.EFBIG, "no space left"), (errno.EACCES, "permission denied"),
    (errno.EROFS, "read-only"), (errno.ENOTDIR, "is a file, not a folder"),
    (errno.EEXIST, "already exists"), (errno.EIO, "while writing f")])
def test_os_error_sentences(code, words):
    assert words in os_error_sentence(OSError(code, os.strerror(code)), "f")


def test_cli_turns_os_errors_into_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    code = main(["convert", str(model_dir), str(tmp_path / "a-file" / "out"), "--to", "hf"])
    assert code == 2
    line = one_error_line(capsys)
    assert "a-file" in line


def test_cli_os_error_sentence_for_unwritable_dir(model_dir, tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))
    monkeypatch.setattr(qkv.cli, "build_parser", _parser_running(denied))
    assert main(["info", str(model_dir)]) == 2
    assert "permission denied" in one_error_line(capsys)


def _parser_running(func):
    real = qkv.cli.build_parser

    def build():
        parser = real()
        parser.set_defaults(func=func)
        for action in parser._actions:
            for child in getattr(action, "choices", None) or {}:
                action.choices[child].set_defaults(func=func)
        return parser
    return build


def test_a_closed_stdout_is_a_quiet_exit(model_dir, capsys, monkeypatch):
    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["info", str(model_dir)]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_output_into_a_closed_pipe_is_quiet(model_dir):
    # `true` exits at once, long before Python has started: qkv writes into a closed pipe
    script = f"{sys.executable} -m qkv.cli info {model_dir} | true"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True,
                          env=env, timeout=120)
    assert done.stderr.decode() == ""
    assert done.returncode == 141


# ---------------------------------------------------------------------- 3. never overwrite

def test_check_new_output(tmp_path, model_dir):
    assert check_new_output(tmp_path / "new") == tmp_path / "new"
    with pytest.raises(qkv.CheckpointError, match="already holds a model.*--overwrite"):
        check_new_output(model_dir)
    assert check_new_output(model_dir, overwrite=True) == model_dir
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        check_new_output(tmp_path / "f")


def test_finetune_classify_refuses_an_existing_model(model_dir, tmp_path, capsys):
    data = tmp_path / "t.tsv"
    data.write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    before = snapshot(model_dir)
    code = main(["finetune", "classify", "--model", str(model_dir), "--train", str(data),
                 "--out", str(model_dir), "--no-progress"])
    assert code == 2
    assert "--overwrite" in one_error_line(capsys)
    assert snapshot(model_dir) == before


def test_finetune_without_a_task_is_one_line(capsys):
    assert main(["finetune"]) == 2
    assert "classify" in one_error_line(capsys)


# ---------------------------------------------------------------------- 4. readers that validate

GOOD_STATE = {"step": 3, "max_steps": 10, "best": None, "best_step": 0, "elapsed": 1.5,
              "seen": 30, "sampler": {}, "rng": {"torch": "AA=="}}


@pytest.mark.parametrize("change, words", [
    ({"best_step": None}, "'best_step'"), ({"seen": "many"}, "'seen'"),
    ({"sampler": []}, "'sampler'"),
    ({"elapsed": -1}, "negative"), ({"rng": {}}, "random generator")])
def test_a_damaged_state_json_says_what_and_how_to_start_over(tmp_path, change, words):
    folder = tmp_path / "run" / "training"
    folder.mkdir(parents=True)
    state = {k: v for k, v in {**GOOD_STATE, **change}.items()
             if not (v is None and k in change)}  # None in `change`: the field is missing
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(qkv.CheckpointError, match="damaged") as error:
        read_state(folder)
    assert words in str(error.value) and "--overwrite" in str(error.value)


def test_state_json_that_is_not_json_or_a_list(tmp_path):
    folder = tmp_path / "training"
    folder.mkdir()
    for text in ("{\"step\": 3,", "[1, 2]", "[" * 100_000):
        (folder / "state.json").write_text(text)
        with pytest.raises(qkv.CheckpointError, match="damaged"):
            read_state(folder)


def test_a_half_written_log_line_is_skipped_with_a_warning(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": 1.9}\n'
                   '{"step": 3, "tr')
    assert [r["step"] for r in read_log(log)] == [1, 2]
    truncate_log(log, 2)
    assert "not a log record" in capsys.readouterr().err
    assert [r["step"] for r in read_log(log)] == [1, 2]
    assert log.read_text().endswith("}\n")


def test_a_token_cache_cut_to_an_odd_size_is_rebuilt(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 20)
    tok = qkv.Tokenizer.train([corpus.read_text()], kind="char")
    first = np.array(tokenize_corpus([corpus], tok, tmp_path / "cache"))
    cache = next((tmp_path / "cache").glob("tokens-*.bin"))
    with open(cache, "r+b") as f:
        f.truncate(cache.stat().st_size - 1)
    again = np.array(tokenize_corpus([corpus], tok, tmp_path / "cache"))
    assert "damaged" in capsys.readouterr().err
    assert np.array_equal(first, again)


@pytest.fixture
def index_dir(tmp_path) -> Path:
    index = SearchIndex(torch.nn.functional.normalize(torch.randn(3, 4), dim=-1),
                        [{"text": "a"}, {"text": "b"}, {"text": "c"}], {"model": "m"})
    return index.save(tmp_path / "index")


@pytest.mark.parametrize("damage, words", [
    (lambda p: (p / "index.json").write_text("[1, 2]"), "JSON object"),
    (lambda p: (p / "passages.jsonl").write_text('{"id": 0, "text": 5}\n[1]\n"x"\n'), "line"),
    (lambda p: (p / "embeddings.safetensors").write_bytes(
        (p / "embeddings.safetensors").read_bytes()[:40]), "safetensors"),
    (lambda p: (p / "passages.jsonl").write_text('{"text": "a"}\n'), "inconsistent"),
])
def test_a_damaged_index_is_one_clear_error(index_dir, damage, words):
    damage(index_dir)
    with pytest.raises(qkv.QkvError, match=words):
        SearchIndex.load(index_dir)


def test_searching_with_vectors_of_the_wrong_width(index_dir):
    index = SearchIndex.load(index_dir)
    assert len(index.search(torch.randn(1, 4), 2)[0]) == 2
    with pytest.raises(qkv.InputError, match=r"\(queries, 4\)"):
        index.search(torch.randn(1, 5))


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    model = qkv.Transformer(qkv.ModelConfig(family="decoder", activation="gelu_tanh",
                                            vocab_size=40, d_model=16, n_layers=1, n_heads=2,
                                            max_seq_len=16))
    return save_hf(model, None, tmp_path / "hf")


@pytest.mark.parametrize("changes", [{"architectures": None}, {"n_head": 0},
                                     {"n_embd": "wide"}, {"n_layer": None}, {"n_positions": -1}])
def test_hf_configs_with_wrong_types_are_one_error(hf_dir, changes):
    data = json.loads((hf_dir / "config.json").read_text())
    data.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(data))
    try:
        qkv.load(hf_dir)
    except qkv.QkvError:
        pass


def test_a_weight_map_that_is_a_list(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00001.safetensors")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(qkv.CheckpointError, match="weight_map"):
        qkv.load(hf_dir)


def test_json_nested_100k_deep(tmp_path, model_dir):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(qkv.CheckpointError, match="nested too deeply"):
        read_json_object(deep)
    (model_dir / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(qkv.QkvError):
        qkv.load(model_dir)
    with pytest.raises(qkv.ConfigError, match="nested"):
        qkv.ModelConfig.from_json("{\"x\": " + "[" * 100_000 + "]" * 100_000 + "}")


def test_a_csv_field_over_128k_characters_is_read(tmp_path):
    data = tmp_path / "long.csv"
    long_text = "word " * 40_000  # 200k characters
    data.write_text(f'sentence,label\n"{long_text}",1\nshort,0\n')
    read = read_labelled(data)
    assert read.texts[0] == long_text.strip() and read.labels == ["1", "0"]


def test_tied_config_with_two_different_matrices_is_refused(tmp_path):
    model = qkv.Transformer(tiny_config(tie_embeddings=False))
    path = qkv.save(model, None, tmp_path / "m")
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "tie_embeddings": True}))
    with pytest.raises(qkv.CheckpointError, match="tie_embeddings"):
        qkv.load(path)


# ---------------------------------------------------------------------- 5. sampling

def test_non_finite_logits_are_reported_not_sampled():
    logits = torch.tensor([[0.0, math.nan, 1.0]])
    with pytest.raises(qkv.InputError, match="NaN/inf"):
        sample_next(logits, temperature=1.0)


@pytest.mark.parametrize("temperature, top_p", [(1e-300, None), (1.0, 1e-300), (1e-30, 1e-9)])
def test_extreme_but_valid_sampling_settings(temperature, top_p):
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, -2.0, 0.0]])
    token = sample_next(logits, temperature=temperature, top_p=top_p)
    assert token.tolist() == [1, 0]


def test_nan_weights_name_the_first_bad_parameter(model_dir):
    model, tok = qkv.load(model_dir)
    assert tok is not None
    with torch.no_grad():
        model.decoder.layers[1].ffn.up.weight.fill_(math.nan)
    with pytest.raises(qkv.InputError, match=r"NaN/inf.*decoder\.layers\.1\.ffn\.up\.weight"):
        qkv.generate(model, tok, "to be", max_new_tokens=3)


def test_nan_activations_name_the_first_bad_layer(model_dir):
    model, tok = qkv.load(model_dir)
    assert tok is not None
    with torch.no_grad():
        model.decoder.layers[0].ffn.up.weight.mul_(1e38)
        model.decoder.layers[0].ffn.down.weight.mul_(1e38)
    with pytest.raises(qkv.InputError, match=r"NaN/inf.*first appear in the output of"):
        qkv.generate(model, tok, "to be", max_new_tokens=3)


def test_generate_without_a_tokenizer_says_so(model_dir):
    (model_dir / "tokenizer.json").unlink()
    model, tok = qkv.load(model_dir)
    assert tok is None
    with pytest.raises(qkv.InputError, match="tokenizer.json"):
        qkv.generate(model, tok, "hi")  # type: ignore[arg-type]


@pytest.mark.parametrize("call", [
    lambda m: qkv.load(m, dtype=torch.int8),
    lambda m: qkv.quantize_int8("not a model"),  # type: ignore[arg-type]
    lambda m: qkv.load(m, device="toaster"),
    lambda m: qkv.record_attention("not a model").__enter__(),  # type: ignore[arg-type]
    lambda m: qkv.generate(qkv.load(m)[0], qkv.load(m)[1], "hi", seed=2**70),  # type: ignore
])
def test_api_mistakes_are_qkv_errors(model_dir, call):
    with pytest.raises(qkv.QkvError):
        call(model_dir)
