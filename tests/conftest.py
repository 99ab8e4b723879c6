import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

import qkv
from qkv.train import read_log

# Hypothesis (tests/test_fuzz_*.py): "ci", the default, is bounded so that the whole fuzz suite
# runs in well under two minutes on two cores; "long" is for benchmarks/fuzz_long.py (or
# QKV_FUZZ_PROFILE=long python -m pytest tests/test_fuzz_*.py), hundreds of times more inputs.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=int(os.environ.get("QKV_FUZZ_EXAMPLES", 2000)),
                          deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("QKV_FUZZ_PROFILE", "ci"))

# The test models are tiny: one thread is as fast as two, and two processes each spinning two
# threads on a 2-core machine slow each other down by an order of magnitude.
torch.set_num_threads(1)


# Six short captions the embedding and search tests share.
CAPTIONS = [
    "A brown dog runs along the sandy beach.",
    "Two children eat ice cream on a bench.",
    "A man plays the guitar on a street corner.",
    "A woman rides a bicycle through the city.",
    "Snow covers the mountains behind a small cabin.",
    "A chef cooks pasta in a busy kitchen.",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(family: str = "decoder", **overrides) -> qkv.ModelConfig:
    """A model small enough to run hundreds of times in a test."""
    base = dict(family=family, vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=96)
    return qkv.ModelConfig(**{**base, **overrides})


def tiny_encoder(tok: qkv.Tokenizer, **overrides) -> qkv.Transformer:
    """A 2-layer, 32-wide encoder for the vocabulary of `tok` (with its [MASK] id)."""
    options = dict(vocab_size=tok.vocab_size, max_seq_len=32, mask_token_id=tok.mask_id)
    return qkv.Transformer(tiny_config("encoder", **{**options, **overrides}))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold bit-for-bit the same tensors under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def losses(run: Path) -> list[tuple[int, float, float | None]]:
    """(step, training loss, validation loss or None) of every line of a run's log.jsonl."""
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_log(run)]


def interrupt_at(step: int) -> Callable[[dict[str, Any]], None]:
    """A log callback that presses Ctrl-C (sends this process SIGINT) when update `step` is
    logged: the loop then saves a checkpoint after that update and returns."""

    def callback(record: dict[str, Any]) -> None:
        if record["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)
    return callback


@pytest.fixture
def interrupt_then_resume():
    """go(run, step) -> (full, cut, resumed). `run(name, callback=None, resume=False)` trains
    into the run directory `name`: once uninterrupted ("full"), once stopped by Ctrl-C after
    update `step` ("cut"), then resumed in the same directory. The caller compares them."""

    def go(run: Callable[..., Any], step: int) -> tuple[Any, Any, Any]:
        full = run("full")
        cut = run("cut", callback=interrupt_at(step))
        assert cut.stopped_by == "SIGINT"
        resumed = run("cut", resume=True)
        return full, cut, resumed
    return go
