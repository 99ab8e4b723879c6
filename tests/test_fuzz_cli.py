"""Property-based (Hypothesis) fuzzing of the command line.

For any flag values: the command succeeds (exit 0), or prints ONE line "qkv CMD: error: ..."
and exits with status 2. Never a traceback, never another status, and the model directory it
reads is left exactly as it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import qkv
from conftest import tiny_config
from qkv.cli import build_parser, main
from qkv.tasks.classify import ClassifySettings
from qkv.train import TrainConfig

# What people type where a number goes: numbers, words, nan/inf, huge and tiny values.
number_texts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e-300", "1e308", "0", "-0", "0x10", "1_000", "",
                     " 3", "2**70", "1e", "five", "90s", "1h30m", "-5m"]),
    st.text(max_size=6))
prompt_texts = st.text(st.characters(exclude_characters="\x00"), max_size=40)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `qkv ARGV`, in this process."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    err = capsys.readouterr().err
    return code, err


def assert_clean(code: int, err: str) -> None:
    assert "Traceback" not in err
    assert code in (0, 2), (code, err)
    if code == 2:
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and err.strip() == errors[0], err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = qkv.Tokenizer.train(["hello world, to be or not to be"], kind="char")
    model = qkv.Transformer(tiny_config(vocab_size=tok.vocab_size, max_seq_len=16,
                                        n_layers=1, d_model=16))
    return qkv.save(model, tok, tmp_path_factory.mktemp("cli") / "model")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@given(temperature=number_texts, top_p=number_texts, top_k=number_texts, seed=number_texts,
       max_new=st.integers(min_value=-3, max_value=6).map(str) | number_texts,
       prompt=prompt_texts, truncate=st.booleans())
def test_generate_with_any_flags(model_dir, capsys, temperature, top_p, top_k, seed, max_new,
                                 prompt, truncate):
    before = snapshot(model_dir)
    argv = ["generate", str(model_dir), f"--prompt={prompt}", f"--temperature={temperature}",
            f"--top-p={top_p}", f"--top-k={top_k}", f"--seed={seed}",
            f"--max-new-tokens={max_new}"] + (["--truncate-left"] if truncate else [])
    code, err = run_cli(argv, capsys)
    assert_clean(code, err)
    assert snapshot(model_dir) == before


TRAIN_FLAGS = ["--lr", "--min-lr", "--weight-decay", "--grad-clip", "--seed", "--dropout",
               "--val-fraction", "--time-limit", "--max-steps", "--warmup-steps", "--batch-size",
               "--d-model", "--n-layers", "--vocab-size", "--context", "--threads"]


def _parse(argv: list[str]) -> argparse.Namespace | None:
    """The namespace, or None after argparse's one-line error (exit status 2)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        return None


@given(st.dictionaries(st.sampled_from(TRAIN_FLAGS), number_texts, max_size=4))
def test_train_flags_are_refused_or_make_a_valid_config(capsys, flags):
    args = _parse(["train", *(f"{k}={v}" for k, v in flags.items())])
    if args is None:
        assert_clean(2, capsys.readouterr().err)
        return
    given_ = {k: v for k, v in vars(args).items()
              if k in {f.name for f in TrainConfig.__dataclass_fields__.values()}}
    if "time_limit" in given_ and "max_steps" not in given_:
        given_["max_steps"] = None
    try:
        cfg = TrainConfig(**given_)
    except qkv.ConfigError:
        return
    assert cfg.lr is not None and 0 < cfg.lr < float("inf")
    assert cfg.weight_decay >= 0 and cfg.grad_clip >= 0 and 0 <= cfg.seed < 2**64


FINETUNE_FLAGS = ["--lr", "--weight-decay", "--warmup", "--seed", "--epochs", "--batch-size",
                  "--max-length", "--time-limit", "--eval-every"]


@given(st.dictionaries(st.sampled_from(FINETUNE_FLAGS), number_texts, max_size=4))
def test_finetune_flags_are_refused_or_make_valid_settings(capsys, flags):
    args = _parse(["finetune", "classify", "--model", "m", "--train", "t", "--out", "o",
                   *(f"{k}={v}" for k, v in flags.items())])
    if args is None:
        assert_clean(2, capsys.readouterr().err)
        return
    settings = ClassifySettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, max_length=args.max_length,
        time_limit=args.time_limit, eval_every=args.eval_every, seed=args.seed)
    try:
        settings.check()
    except qkv.InputError:
        return
    assert settings.lr > 0 and settings.weight_decay >= 0 and 0 <= settings.seed < 2**64
