"""Cross-entropy over a large vocabulary, a slice of rows at a time.

The next-token loss of a GPT is a softmax over the whole vocabulary (50,257 entries for GPT-2)
at every position. Written as `F.cross_entropy(logits.float(), y)`, a step of B x T positions
makes several full (B*T, vocab) tensors: the fp32 copy of the bf16 logits, the log-softmax, a
zero-filled gradient for it and the gradient cast back to bf16. For GPT-2 at 1,024 positions
each is 200 MB, and writing them costs more time than the arithmetic.

`cross_entropy` computes the same numbers without them. The forward pass keeps, per row, only
the log-sum-exp of its logits (the softmax's normaliser); the backward pass rebuilds the softmax
a slice of rows at a time, in fp32, and writes the gradient directly in the logits' own dtype:

    loss_i        = logsumexp(z_i) - z_i[y_i]
    dloss_i/dz_i  = softmax(z_i) - onehot(y_i)

With label smoothing eps (Szegedy et al. 2016; the Transformer paper's 0.1) the target is
q = (1 - eps) onehot(y) + eps / V, and only one more number per row is needed, the mean logit:

    loss_i        = logsumexp(z_i) - (1 - eps) z_i[y_i] - eps mean(z_i)
    dloss_i/dz_i  = softmax(z_i) - (1 - eps) onehot(y_i) - eps / V

Every slice is computed in fp32 whatever the logits' dtype, as F.cross_entropy on fp32 logits
does; the full fp32 logits are never materialised.
"""

from __future__ import annotations

import torch

#: Elements per slice: rows x vocabulary, about 2 MB of fp32, so that a slice stays in the CPU's
#: cache between its passes (measured on GPT-2's 50k vocabulary: 4-20 rows are fastest).
SLICE_ELEMENTS = 1 << 19


def _slices(rows: int, vocab: int):
    step = max(1, SLICE_ELEMENTS // max(1, vocab))
    return ((i, min(rows, i + step)) for i in range(0, rows, step))


class _CrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of logits (N, V) against targets (N,), smoothed by `eps`; ignored
    rows give 0."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                ignore_index: int, eps: float) -> torch.Tensor:
        rows, vocab = logits.shape
        kept = targets != ignore_index
        safe = torch.where(kept, targets, 0)  # an ignored row looks up entry 0, then counts 0
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        mean = torch.empty(rows, dtype=torch.float32, device=logits.device) if eps else None
        for i, j in _slices(rows, vocab):
            z = logits[i:j].float()
            lse[i:j] = torch.logsumexp(z, dim=-1)
            if mean is not None:
                mean[i:j] = z.mean(dim=-1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()  # z_i[y_i], (N,)
        losses = lse - picked if mean is None else lse - (1.0 - eps) * picked - eps * mean
        losses = torch.where(kept, losses, 0.0)
        ctx.save_for_backward(logits, safe, kept, lse)
        ctx.eps = eps
        return losses

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        logits, safe, kept, lse = ctx.saved_tensors
        eps = ctx.eps
        rows, vocab = logits.shape
        scale = torch.where(kept, grad.float(), 0.0)  # (N,) dloss/dloss_i, 0 where ignored
        out = torch.empty_like(logits)
        for i, j in _slices(rows, vocab):
            p = logits[i:j].float()  # (n, V)
            p.sub_(lse[i:j, None]).exp_()  # softmax(z), from the saved normaliser
            if eps:
                p.sub_(eps / vocab)
            p[torch.arange(j - i, device=p.device), safe[i:j]] -= 1.0 - eps  # the target's part
            p.mul_(scale[i:j, None])
            out[i:j] = p  # in the logits' dtype
        return out, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """F.cross_entropy(logits.float(), targets, ignore_index=..., reduction=...,
    label_smoothing=...) for logits (N, V) of any float dtype and targets (N,), computed a slice
    of rows at a time (see the module docstring). "mean" averages over the targets that are not
    ignored (0 if none is)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy takes logits (N, V) and targets (N,), not "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    losses = _CrossEntropy.apply(logits, targets, ignore_index, float(label_smoothing))  # (N,)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / (targets != ignore_index).sum().clamp(min=1)
    raise ValueError(f"reduction={reduction!r} is not mean, sum or none")
