import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
import torch

import qkv

# The test models are tiny: one thread is as fast as two, and two processes each spinning two
# threads on a 2-core machine slow each other down by an order of magnitude.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(family: str = "decoder", **overrides) -> qkv.ModelConfig:
    """A model small enough to run hundreds of times in a test."""
    base = dict(family=family, vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=96)
    return qkv.ModelConfig(**{**base, **overrides})


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
