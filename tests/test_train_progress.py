"""The training progress bar moves at every update, not only at log lines."""

from __future__ import annotations

from qkv.train.log import ProgressBar


def test_the_bar_moves_between_log_lines_and_a_log_line_does_not_count_twice():
    bar = ProgressBar(True, step=0, max_steps=100)
    for step in range(1, 8):
        bar.advance_to(step)  # updates with no log line (translation logs only at evaluations)
    assert bar.bar.n == 7
    bar.update(10, loss=1.5, per_s=100.0, lr=1e-3, total=100)  # a log line at step 10
    assert bar.bar.n == 10
    assert "loss 1.500" in bar.bar.postfix
    bar.advance_to(10)  # the same step again moves nothing
    assert bar.bar.n == 10
    bar.close()


def test_a_disabled_bar_ignores_every_call():
    bar = ProgressBar(False, step=5, max_steps=None)
    bar.advance_to(9)
    bar.update(10, loss=1.0, per_s=1.0, lr=1.0, total=None)
    bar.close()
    assert bar.bar is None


def test_a_resumed_bar_starts_at_its_step():
    bar = ProgressBar(True, step=40, max_steps=100)
    bar.advance_to(41)
    assert bar.bar.n == 41
    bar.close()
