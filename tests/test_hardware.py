"""qkv.hardware (device, precision, threads) and qkv.batching (padding, eval mode)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import qkv.hardware as hw
from qkv.batching import eval_mode, evaluating, model_device, pad_id, pad_rows
from qkv.errors import ConfigError, PrecisionError


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_exactly_where_the_cpu_has_it(monkeypatch, native, expected):
    monkeypatch.setattr(hw, "cpu_has_bf16", lambda: native)
    assert hw.resolve_precision("auto", "cpu") == expected
    assert hw.resolve_precision("fp32", "cpu") == "fp32"
    assert hw.resolve_precision("bf16", "cpu") == "bf16"  # asked for: slow without it, not wrong


def test_an_mps_device_never_reads_the_cpu_flags(monkeypatch):
    def cpu_flags():
        raise AssertionError("the CPU's flags say nothing about an Apple GPU")

    monkeypatch.setattr(hw, "cpu_has_bf16", cpu_flags)
    assert hw.resolve_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(PrecisionError, match="bf16 is not supported on the mps device"):
        hw.resolve_precision("bf16", "mps")
    with pytest.raises(PrecisionError, match="precision='fp16' is not one of auto, bf16, fp32"):
        hw.resolve_precision("fp16", "cpu")


def test_the_bf16_detector_is_asked_once():
    hw.cpu_has_bf16.cache_clear()
    hw.cpu_has_bf16()
    hw.cpu_has_bf16()
    assert hw.cpu_has_bf16.cache_info().misses == 1


@pytest.mark.parametrize(("name", "message"), [
    ("tpu", "device='tpu' is not one of"), ("cuda:x", "device='cuda:x'"),
    ("mps:0", "device='mps:0'"), ("fp8", "device='fp8'")])
def test_bad_device_names(name, message):
    with pytest.raises(ConfigError, match=message):
        hw.resolve_device(name)


def test_a_device_that_is_not_there_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hw.resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        hw.resolve_device("cuda:1")
    assert hw.resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_autocast_computes_matrix_products_in_bf16_only_when_asked():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with hw.autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with hw.autocast(torch.device("cpu"), "fp32"):
        assert (a @ b).dtype == torch.float32


def test_set_threads_sets_and_checks():
    before = torch.get_num_threads()
    try:
        assert hw.set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ConfigError, match="threads=0"):
            hw.set_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("side", "ids", "mask"), [
    ("right", [[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]]),
    ("left", [[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]]),
])
def test_pad_rows_on_either_side(side, ids, mask):
    got_ids, got_mask = pad_rows([[5, 6, 7], [8]], 0, side=side)
    assert got_ids.tolist() == ids and got_mask.tolist() == mask
    assert got_ids.dtype == got_mask.dtype == torch.long


def test_pad_rows_to_a_given_length():
    ids, mask = pad_rows([[5, 6], [7]], 9, side="left", length=4)
    assert ids.tolist() == [[9, 9, 5, 6], [9, 9, 9, 7]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


def test_pad_rows_rejects_a_side_that_does_not_exist():
    with pytest.raises(ValueError, match="side='top'"):
        pad_rows([[1]], 0, side="top")


@pytest.mark.parametrize(("pad", "eos", "expected"), [(3, 7, 3), (None, 7, 7), (None, None, 0)])
def test_the_pad_id_is_pad_else_eos_else_zero(pad, eos, expected):
    assert pad_id(SimpleNamespace(pad_id=pad, eos_id=eos)) == expected


@pytest.mark.parametrize("was_training", [True, False])
def test_evaluating_switches_dropout_and_autograd_off_then_restores(was_training):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train(was_training)
    with evaluating(model):
        assert not model.training and not torch.is_grad_enabled()
        assert not model(torch.ones(1, 2)).requires_grad
    assert model.training == was_training and torch.is_grad_enabled()
    assert model_device(model) == torch.device("cpu")


def test_a_generator_in_eval_mode_leaves_autograd_alone_between_its_yields():
    model = torch.nn.Dropout(0.5).train()

    def tokens():
        with eval_mode(model):
            yield model.training
            yield model.training

    stream = tokens()
    assert next(stream) is False and torch.is_grad_enabled()
    assert next(stream) is False
    stream.close()
    assert model.training


@pytest.mark.parametrize("precision, length, math", [
    ("bf16", 64, True), ("bf16", None, True), ("bf16", hw.FUSED_ATTENTION_FROM, False),
    ("bf16", 1024, False), ("fp32", 64, False)])
def test_training_attention_picks_the_kernel_by_precision_and_length(precision, length, math):
    """bf16 on a CPU: the math kernel for short sequences, the fused one from 256 tokens."""
    from torch.nn.attention import SDPBackend

    calls = []
    q = torch.randn(1, 2, 8, 4)
    with hw.training_attention(torch.device("cpu"), precision, length):
        calls.append(torch._fused_sdp_choice(q, q, q))
    forced_math = calls[0] == SDPBackend.MATH.value if hasattr(SDPBackend.MATH, "value") \
        else calls[0] == int(SDPBackend.MATH)
    assert forced_math == math


def test_the_cli_keeps_onednns_kernel_cache_small_unless_told_otherwise(monkeypatch, capsys):
    from qkv.cli import main

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert main([]) == 0  # no command: the help, after the setting
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(hw.KERNEL_CACHE) == "64"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")  # the user's choice stands
    assert main([]) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
