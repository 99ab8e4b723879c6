"""The sliced cross-entropy of qkv.train.loss against PyTorch's F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qkv.train.loss as loss_module
from qkv.train import cross_entropy


@pytest.fixture
def many_slices(monkeypatch):
    """Slices of 7 rows or fewer (on a vocabulary of 50), so every test crosses slice edges."""
    monkeypatch.setattr(loss_module, "SLICE_ELEMENTS", 7 * 50 + 3)


def _logits(rows: int = 37, vocab: int = 50, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    return (3 * torch.randn(rows, vocab)).to(dtype).requires_grad_()


def _targets(rows: int = 37, vocab: int = 50) -> torch.Tensor:
    y = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(1))
    y[::5] = -100  # some ignored targets
    return y


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_pytorch_in_fp32_values_and_gradients(many_slices, reduction, smoothing):
    z, y = _logits(), _targets()
    ours = cross_entropy(z, y, reduction=reduction, label_smoothing=smoothing)
    want = F.cross_entropy(z, y, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    weights = torch.rand_like(want)  # a gradient that differs per row when reduction="none"
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), z)
    (g_want,) = torch.autograd.grad((want * weights).sum(), z)
    torch.testing.assert_close(g_ours, g_want, rtol=1e-5, atol=1e-5)


def test_ignored_targets_give_zero_loss_and_zero_gradient(many_slices):
    z, y = _logits(), _targets()
    losses = cross_entropy(z, y, reduction="none")
    assert (losses[y == -100] == 0).all() and (losses[y != -100] > 0).all()
    (grad,) = torch.autograd.grad(losses.sum(), z)
    assert (grad[y == -100] == 0).all()
    assert grad[y != -100].abs().sum() > 0


def test_another_ignore_index_is_honoured():
    z = _logits()
    y = torch.randint(0, 50, (37,), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(cross_entropy(z, y, ignore_index=int(y[0])),
                               F.cross_entropy(z, y, ignore_index=int(y[0])))


def test_bf16_logits_are_computed_in_fp32_and_the_gradient_keeps_their_dtype(many_slices):
    z, y = _logits(dtype=torch.bfloat16), _targets()
    ours = cross_entropy(z, y)
    assert ours.dtype == torch.float32
    z32 = z.detach().float().requires_grad_()
    want = F.cross_entropy(z32, y)  # the usual `logits.float()` recipe
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours, z)
    (g_want,) = torch.autograd.grad(want, z32)
    assert g_ours.dtype == torch.bfloat16
    torch.testing.assert_close(g_ours, g_want.bfloat16(), rtol=1e-2, atol=1e-5)


def test_a_batch_with_every_target_ignored_has_mean_zero():
    z = _logits()
    loss = cross_entropy(z, torch.full((37,), -100))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, z)
    assert (grad == 0).all()


@pytest.mark.parametrize("shapes", [((2, 3, 50), (2, 3)), ((6, 50), (5,))])
def test_bad_shapes_and_reductions_are_clear_errors(shapes):
    with pytest.raises(ValueError, match="takes logits"):
        cross_entropy(torch.zeros(shapes[0]), torch.zeros(shapes[1], dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), reduction="max")


def test_the_language_model_loss_uses_it():
    import qkv
    from conftest import tiny_config
    from qkv.train.lm import next_token_loss

    torch.manual_seed(0)
    model = qkv.Transformer(tiny_config(vocab_size=40, max_seq_len=16)).train()
    x = torch.randint(0, 40, (3, 16))
    y = torch.randint(0, 40, (3, 16))
    logits = model.logits(model.hidden_states(x))
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(next_token_loss(model, x, y), want, rtol=1e-5, atol=1e-6)
