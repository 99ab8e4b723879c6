"""train/distributed.py without other processes: how a batch is shared out and its losses
weighted, the one-process path left untouched, and the launcher's command line.
(Two real ranks: tests/test_distributed_ranks.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.train.distributed import Parallel, my_share, shard, strip_option, sum_over_ranks
from qkv.train.lm import targets

SRC = Path(__file__).resolve().parents[1] / "src"


def masked_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 rows of 6 tokens whose targets are unevenly masked: 5, 1, 0 and 3 targets."""
    x = torch.arange(24).reshape(4, 6) % 50
    y = torch.full((4, 6), -100)
    y[0, :5], y[1, 2], y[3, 1:4] = 7, 9, 11
    return x, y


def test_rows_are_split_evenly_and_weighted_by_the_global_target_count():
    batch = masked_batch()
    (x0, y0), s0 = shard(batch, targets, 0, 2)
    (x1, y1), s1 = shard(batch, targets, 1, 2)
    assert torch.equal(torch.cat((x0, x1)), batch[0])
    assert (s0, s1) == (2 * 6 / 9, 2 * 3 / 9)  # 6 of the 9 targets on rank 0, 3 on rank 1
    _, s = shard(batch, None, 2, 3)  # no weight given: rows (1, 1, 2 of 4)
    assert s == 3 * 2 / 4


def test_a_rank_without_targets_computes_a_copy_that_counts_zero():
    x, y = masked_batch()
    batch = (x[:3], y[:3])  # 3 rows on 4 ranks: rank 0 has no row; rank 3 has no target
    for r in (0, 3):
        (xr, yr), s = shard(batch, targets, r, 4)
        assert s == 0 and targets((xr, yr)) > 0  # a finite loss, scaled to nothing
    nothing = (x[2:3], y[2:3])  # no target anywhere: the plain mean, as one process
    assert shard(nothing, targets, 1, 2) == (nothing, 1.0)


def test_the_average_of_weighted_rank_gradients_is_the_one_process_gradient():
    torch.manual_seed(0)
    model = qkv.Transformer(qkv.ModelConfig(family="decoder", vocab_size=50, d_model=16,
                                            n_layers=1, n_heads=2, max_seq_len=8, dropout=0.0))
    batch = masked_batch()

    def loss(b):
        x, y = b
        return F.cross_entropy(model.logits(model.hidden_states(x)).flatten(0, 1), y.flatten())

    def grads(scaled_losses: list[torch.Tensor]) -> torch.Tensor:
        model.zero_grad()
        torch.stack(scaled_losses).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    one = grads([loss(batch)])
    shares = [shard(batch, targets, r, 2) for r in range(2)]
    ranks = grads([loss(b) * s / 2 for b, s in shares])  # what DDP's average computes
    naive = grads([loss(b) / 2 for b, _ in shares])  # each rank's own mean, averaged
    assert torch.allclose(ranks, one, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(naive, one, atol=1e-4)  # the test can tell


def test_one_process_is_left_as_it_is():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    par = Parallel(model, optimizer, torch.device("cpu"), fsdp=True)  # FSDP needs torchrun
    assert par.wrapper is None and not par.fsdp and par.main
    batch = masked_batch()
    local, scale = par.shard(batch, targets)
    assert local[0] is batch[0] and scale == 1.0
    t = torch.tensor(3.5)
    assert par.mean(t) is t and par.agree("SIGINT", True, 7) == ("SIGINT", True, 7)
    assert my_share([1, 2]) == [(1, True), (2, True)] and sum_over_ranks(1.0, 2.0) == (1.0, 2.0)


def test_the_launcher_removes_its_own_option():
    assert strip_option(["train", "--nproc", "2", "--out", "x"], "--nproc") == \
        ["train", "--out", "x"]
    assert strip_option(["train", "--nproc=2"], "--nproc") == ["train"]


def test_python_m_qkv_is_the_command():
    done = subprocess.run([sys.executable, "-m", "qkv", "train", "--help"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=60)
    assert done.returncode == 0
    assert "--nproc N" in done.stdout and "--fsdp" in done.stdout


@pytest.mark.parametrize("argv", [["train", "--nproc", "0"], ["train", "--nproc", "two"]])
def test_a_bad_process_count_is_one_line(argv, capsys):
    from qkv.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
