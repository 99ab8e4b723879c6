"""int8 weights (qkv.quantize): rounding bounds, the three product paths, whole models, the CLI."""

from __future__ import annotations

import copy
import platform

import pytest
import torch
from torch.nn import functional as F

import qkv
from conftest import tiny_config
from qkv.cli import main
from qkv.generate import decode_tokens
from qkv.quantize import Int8Linear, fbgemm_available, is_quantized, quantize_int8, quantize_rows
from qkv.tokenizer import Tokenizer


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rows_round_to_within_half_a_step():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different size
    w[5] = 0.0  # a zero row must not divide by zero
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert (q.abs().amax(dim=1)[torch.arange(64) != 5] == 127).all()  # each row uses its range
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (q[5] == 0).all()


def test_every_product_path_matches_the_float_layer():
    layer = torch.nn.Linear(96, 80)
    x = torch.randn(3, 5, 96)
    ref = layer(x)
    weight_only = Int8Linear.from_linear(layer, activations="float")
    deq = F.linear(x, weight_only.dequantized(), layer.bias)
    # fp32 input: dequantize and multiply; exactly the float product with the rounded weight.
    assert torch.equal(weight_only(x), deq)
    assert relative_error(deq, ref) < 0.01  # what rounding the weights costs
    # bf16 input on a CPU: PyTorch's fused weight-only kernel (bf16 scales and output).
    out = weight_only(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 80)
    assert relative_error(out, ref) < 0.02
    # int8 activations (FBGEMM where available): the input is rounded too, so a bit more error.
    dynamic = Int8Linear.from_linear(layer, activations="int8")
    assert relative_error(dynamic(x), ref) < 0.03
    assert dynamic(x).shape == ref.shape


def test_bad_activation_mode_is_refused():
    with pytest.raises(qkv.InputError, match="activations"):
        Int8Linear(torch.randn(4, 4), activations="int4")


@pytest.mark.parametrize("activations", ["int8", "float"])
def test_a_quantized_model_keeps_its_predictions(activations):
    model = qkv.Transformer(tiny_config(d_model=64, vocab_size=64)).eval()
    tokens = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        ref = model(tokens)
        quantized = quantize_int8(copy.deepcopy(model), activations)
        out = quantized(tokens)
    assert is_quantized(quantized) and not is_quantized(model)
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert relative_error(out, ref) < 0.03
    # The output layer got its own int8 copy; the float embedding table is unchanged.
    assert torch.equal(quantized.token_embedding.weight, model.token_embedding.weight)
    assert isinstance(quantized.lm_head, Int8Linear)
    # Generation runs through the quantized layers (KV cache and all) and picks the tokens the
    # float model would pick, fed the same text (teacher forcing): at least 9 of 10.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the scores, so that a choice is never a near-tie
        quantized = quantize_int8(copy.deepcopy(model), activations)
        produced = [int(t) for t in decode_tokens(quantized, [[1, 2, 3]], 10, temperature=0)]
        float_choice = model(torch.tensor([[1, 2, 3] + produced[:-1]]))[0, 2:].argmax(-1)
    assert sum(a == b for a, b in zip(produced, float_choice.tolist(), strict=True)) >= 9


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="FBGEMM is PyTorch's x86 backend")
def test_fbgemm_is_used_on_x86():
    # On x86 (this project's CI machine) the fast kernels must really be there and be used.
    assert fbgemm_available()
    layer = Int8Linear(torch.randn(16, 32), torch.randn(16), activations="int8")
    x = torch.randn(8, 32)
    few = layer(x[:2])
    assert list(layer._packs) == [("fbgemm", True)]  # FBGEMM ran, not the dequantizing path
    many = layer(x)  # from ONEDNN_FROM_ROWS rows on: oneDNN's kernel, its own packed copy
    assert ("onednn", True) in layer._packs and qkv.quantize.ONEDNN_FROM_ROWS <= 8
    exact = x @ layer.dequantized().T + layer.bias
    for out, ref in ((few, exact[:2]), (many, exact)):  # both round the input to 8 bits
        assert relative_error(out, ref) < 0.02
    assert torch.backends.quantized.engine == "x86"  # packing for oneDNN left it as it was


def test_a_quantized_model_cannot_be_saved(tmp_path):
    model = quantize_int8(qkv.Transformer(tiny_config()))
    with pytest.raises(qkv.InputError, match="int8 weights"):
        qkv.save(model, None, tmp_path / "m")
    with pytest.raises(qkv.InputError, match="already quantized"):
        quantize_int8(model)
    assert not (tmp_path / "m").exists()


def test_generate_with_int8_weights_from_the_command_line(tmp_path, capsys):
    tokenizer = Tokenizer.train(["abcdefgh " * 4], kind="char")
    model = qkv.Transformer(tiny_config(vocab_size=tokenizer.vocab_size))
    qkv.save(model, tokenizer, tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "abc", "--dtype", "int8",
                 "--max-new-tokens", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("abc") and len(out) > 3


ROWS_KERNELS = [k for k, ok in (("int_mm", hasattr(torch, "_int_mm")),
                                 ("fbgemm", fbgemm_available())) if ok]


@pytest.mark.parametrize("kernel", ROWS_KERNELS)
def test_int8_rows_gives_each_row_the_same_bits_whatever_its_neighbours(kernel, monkeypatch):
    """"int8-rows": each input row on its own range and exact integer sums, so a row's output
    does not depend on the batch (FBGEMM's "int8" shares one range: a loud neighbour changes a
    quiet row's numbers), and it is as close to the float layer as FBGEMM's path. Both kernels
    (torch._int_mm, FBGEMM with the two pinning rows) give it."""
    monkeypatch.setattr(qkv.quantize, "ROWS_KERNEL", kernel)
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 80)
    rows = Int8Linear.from_linear(layer, activations="int8-rows")
    x = torch.randn(8, 96)
    x[5] *= 50  # a row with a much wider range
    full = rows(x)
    for width in range(1, 9):
        assert torch.equal(rows(x[:width]), full[:width])
    assert torch.equal(rows(x[3:4]), full[3:4])
    quiet = torch.stack([x[0], x[5]])
    assert torch.equal(rows(quiet)[0], rows(x[:1])[0])
    assert relative_error(rows(x[:5]), layer(x[:5])) < 0.03
    assert rows(x.view(2, 4, 96)).shape == (2, 4, 80)
    if fbgemm_available():  # the control: the shared range does mix rows
        dynamic = Int8Linear.from_linear(layer, activations="int8")
        assert not torch.equal(dynamic(quiet)[0], dynamic(x[:1])[0])


def test_the_two_int8_rows_kernels_sum_the_same_integers():
    torch.manual_seed(1)
    layer = torch.nn.Linear(200, 64)
    rows = Int8Linear.from_linear(layer, activations="int8-rows")
    x = torch.randn(5, 200) * torch.tensor([[1.0], [30.0], [0.01], [1.0], [4.0]])
    out = {}
    for kernel in ROWS_KERNELS:
        qkv.quantize.ROWS_KERNEL, saved = kernel, qkv.quantize.ROWS_KERNEL
        try:
            out[kernel] = rows(x)
        finally:
            qkv.quantize.ROWS_KERNEL = saved
    first, *others = out.values()
    for other in others:  # the same integer sums; only the float rescaling's rounding differs
        torch.testing.assert_close(other, first, rtol=1e-5, atol=1e-5)
    assert len(ROWS_KERNELS) == 2  # this CPU has both


def test_int8_rows_model_decodes_like_fp32():
    model = qkv.Transformer(tiny_config(vocab_size=64)).eval()
    prompt = torch.randint(0, 64, (2, 12))
    with torch.inference_mode():
        ref = model(prompt).float()
        quant = quantize_int8(copy.deepcopy(model), activations="int8-rows")(prompt).float()
    agree = (ref.argmax(-1) == quant.argmax(-1)).float().mean().item()
    assert agree > 0.9 and relative_error(quant, ref) < 0.05
