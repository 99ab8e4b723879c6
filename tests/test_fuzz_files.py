"""Property-based (Hypothesis) fuzzing of everything qkv reads and writes.

The property, for every generated input: qkv either gives a clean result or raises a QkvError
(one sentence for a person), never another exception; and the good files next to a bad one are
left exactly as they were. Profiles are registered in conftest.py ("ci": bounded; "long":
benchmarks/fuzz_long.py).
"""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import qkv
from qkv.data.labelled import read_labelled
from qkv.errors import StorageError
from qkv.io import atomic_write, atomic_write_text, read_json_object
from qkv.tasks.search import SearchIndex
from qkv.train import TrainConfig, read_log
from qkv.train.checkpoint import STATE_FIELDS, read_state
from qkv.train.log import truncate_log

# JSON values of every shape, with the awkward numbers JSON readers meet (nan/inf as Python
# writes them, huge integers, negative zero).
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


def fresh_dir(root: Path) -> Path:
    """A new folder per Hypothesis example (the tmp_path fixture is shared by all of them)."""
    return Path(tempfile.mkdtemp(dir=root))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------------- configs

MODEL_FIELDS = ["family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                "head_dim", "d_ff", "max_seq_len", "position", "norm", "norm_eps", "activation",
                "dropout", "tie_embeddings", "labels", "pad_token_id", "rope_theta",
                "embed_max_len", "type_vocab_size", "bogus_field"]
small_sizes = st.integers(min_value=-2, max_value=70)


@given(st.dictionaries(st.sampled_from(MODEL_FIELDS), small_sizes | json_values, max_size=6))
def test_model_config_from_any_dict(data: dict[str, Any]):
    try:
        cfg = qkv.ModelConfig.from_dict(data)
    except qkv.ConfigError:
        return
    assert cfg.parameter_count() > 0
    if cfg.parameter_count() < 2_000_000:
        model = qkv.Transformer(cfg)  # a config that validates builds
        assert abs(model.num_parameters() - cfg.parameter_count()) <= \
            0.05 * model.num_parameters() + 64


@given(st.integers(min_value=1, max_value=2**40), st.integers(min_value=1, max_value=2**20),
       st.integers(min_value=1, max_value=2**12))
def test_huge_configs_are_refused_before_allocating(vocab, d_model, n_layers):
    cfg = qkv.ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=1,
                          max_seq_len=8)
    assume(cfg.parameter_count() * 4 > 64 * 2**30)  # more than any test machine has
    with pytest.raises(qkv.ConfigError, match="GiB"):
        qkv.Transformer(cfg)


TRAIN_FIELDS = ["lr", "min_lr", "weight_decay", "grad_clip", "time_limit", "seed", "beta1",
                "beta2", "dropout", "val_fraction", "max_steps", "batch_size", "warmup_steps"]
numbers = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2**70, 2**70)
           | st.none() | st.booleans() | st.text(max_size=3))


@given(st.dictionaries(st.sampled_from(TRAIN_FIELDS), numbers, max_size=4))
def test_train_config_from_any_numbers(data: dict[str, Any]):
    try:
        cfg = TrainConfig.from_dict(data)
    except (qkv.ConfigError, TypeError) as e:
        # TypeError only from comparing a str with a number is NOT acceptable
        assert isinstance(e, qkv.ConfigError), e
        return
    for name in ("lr", "weight_decay", "grad_clip", "beta1", "beta2"):
        value = getattr(cfg, name)
        assert value == value and abs(value) != float("inf")  # finite
    assert 0 <= cfg.seed < 2**64


# ---------------------------------------------------------------------- data files

cells = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)


@given(st.lists(st.lists(cells, min_size=0, max_size=4), max_size=6),
       st.sampled_from([".tsv", ".csv", ".jsonl"]), st.booleans())
def test_labelled_files_of_any_rows(tmp_path, rows, suffix, header):
    folder = fresh_dir(tmp_path)
    file = folder / f"data{suffix}"
    if suffix == ".jsonl":
        lines = [json.dumps(dict(zip(["sentence", "label", "x"], r, strict=False)))
                 if i % 3 else ",".join(r) for i, r in enumerate(rows)]
    else:
        sep = "\t" if suffix == ".tsv" else ","
        lines = ([sep.join(["sentence", "label"])] if header else []) + \
            [sep.join(r) for r in rows]
    file.write_text("\n".join(lines), encoding="utf-8")
    try:
        data = read_labelled(file)
    except qkv.QkvError:
        return
    assert len(data.texts) == len(data.labels) > 0
    assert all(isinstance(t, str) for t in data.texts)


@given(st.binary(max_size=200))
def test_labelled_files_of_any_bytes(tmp_path, content):
    file = fresh_dir(tmp_path) / "data.tsv"
    file.write_bytes(content)
    try:
        read_labelled(file)
    except qkv.QkvError:
        pass


# ---------------------------------------------------------------------- JSON files

@given(json_values | st.text(max_size=30).map(lambda t: {"raw": t}))
def test_read_json_object_of_anything(tmp_path, value):
    file = fresh_dir(tmp_path) / "x.json"
    text = value["raw"] if isinstance(value, dict) and set(value) == {"raw"} else \
        json.dumps(value)
    file.write_text(text, encoding="utf-8")
    try:
        data = read_json_object(file)
    except qkv.CheckpointError:
        return
    assert isinstance(data, dict)


good_state = {"step": 3, "max_steps": 10, "best": None, "best_step": 0, "elapsed": 1.5,
              "seen": 30, "sampler": {}, "rng": {"torch": "AA=="}}


@given(st.dictionaries(st.sampled_from([*STATE_FIELDS, "other"]), json_values, max_size=4),
       st.sets(st.sampled_from(list(STATE_FIELDS)), max_size=2))
def test_state_json_with_any_fields(tmp_path, changes, removed):
    folder = fresh_dir(tmp_path) / "training"
    folder.mkdir()
    state = {k: v for k, v in {**good_state, **changes}.items() if k not in removed}
    (folder / "state.json").write_text(json.dumps(state))
    try:
        read = read_state(folder)
    except qkv.CheckpointError as e:
        assert "damaged" in str(e)
        return
    for name, types in STATE_FIELDS.items():  # what resume reads has the right types
        assert isinstance(read[name], types) and not isinstance(read[name], bool)


@given(st.lists(json_values.map(json.dumps) | st.text(max_size=20), max_size=8),
       st.integers(min_value=0, max_value=10))
def test_log_jsonl_with_any_lines(tmp_path, lines, step):
    log = fresh_dir(tmp_path) / "log.jsonl"
    log.write_text("\n".join(lines), encoding="utf-8")
    records = read_log(log)
    assert all(isinstance(r, dict) for r in records)
    truncate_log(log, step)
    assert all(r.get("step", 0) <= step for r in read_log(log))


# ---------------------------------------------------------------------- search index files

@pytest.fixture(scope="module")
def index_files(tmp_path_factory) -> dict[str, bytes]:
    index = SearchIndex(torch.nn.functional.normalize(torch.randn(3, 4), dim=-1),
                        [{"text": "a"}, {"text": "b"}, {"text": "c"}], {"model": "m"})
    folder = index.save(tmp_path_factory.mktemp("index"))
    return snapshot(folder)


@given(st.sampled_from(["index.json", "passages.jsonl", "embeddings.safetensors"]),
       st.one_of(st.integers(min_value=0, max_value=400).map(lambda n: ("cut", n)),
                 json_values.map(lambda v: ("json", v)),
                 st.lists(json_values, max_size=4).map(lambda v: ("lines", v))))
def test_index_files_damaged_in_any_way(tmp_path, index_files, name, damage):
    folder = fresh_dir(tmp_path)
    for file, content in index_files.items():
        (folder / file).write_bytes(content)
    kind, value = damage
    if kind == "cut":
        (folder / name).write_bytes(index_files[name][:value])
    elif kind == "json":
        (folder / name).write_text(json.dumps(value))
    else:
        (folder / name).write_text("".join(json.dumps(v) + "\n" for v in value))
    try:
        index = SearchIndex.load(folder)
    except qkv.QkvError:
        return
    hits = index.search(torch.randn(2, index.embeddings.shape[1]), 2)
    assert len(hits) == 2 and all(isinstance(h["text"], str) for row in hits for h in row)


# ---------------------------------------------------------------------- writes that fail

@given(st.binary(max_size=64), st.sampled_from([errno.ENOSPC, errno.EFBIG, errno.EACCES,
                                                 errno.EROFS, errno.EIO]))
def test_a_write_that_fails_midway_never_replaces_the_old_file(tmp_path, partial, code):
    folder = fresh_dir(tmp_path)
    target = folder / "model.safetensors"
    atomic_write_text(target, "the good old file")

    def fails(tmp: str) -> None:
        Path(tmp).write_bytes(partial)
        raise OSError(code, "simulated")
    with pytest.raises(StorageError):
        atomic_write(target, fails)
    assert snapshot(folder) == {"model.safetensors": b"the good old file"}
