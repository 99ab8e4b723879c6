"""Training on two processes (gloo, on the CPU) against one process: same weights, same
evaluation, exact resume, checkpoints any process loads, and failures that end the run.

The two ranks run tests/dist_worker.py once for every scenario (the module fixture); the
one-process references run here. Two more tests go through the real torchrun: two "nodes" on
127.0.0.1, and a rank killed in the middle of a run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qkv
from dist_worker import (
    TEXT,
    classify,
    interrupt_at,
    lm_config,
    mlm_config,
    recorded_norms,
    train_run,
)
from qkv.checkpoint import read_safetensors
from qkv.train import read_log, train
from qkv.train.checkpoint import find_training_checkpoint, read_state

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parents[1] / "src"
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
TOL = 1e-6  # fp32: the ranks add the same terms in another order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **extra}


def launch(world: int, *args: str, timeout: float = 240) -> None:
    """Run the worker as `world` ranks (the variables torchrun would set) and wait for all."""
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for r in range(world)]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-3000:]}"


def final(run: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(run / "training" / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The root holding every run: one-process references (here) and two-rank runs (worker)."""
    root = tmp_path_factory.mktemp("dist")
    with recorded_norms() as norms:
        train(lm_config(root, "lm-1"))
    (root / "norms-1.json").write_text(json.dumps(norms))
    train_run(mlm_config(root, "mlm-1"))
    train(lm_config(root, "w1-full", max_steps=8))
    train(lm_config(root, "w1-cut", max_steps=8), callback=interrupt_at(4))
    launch(2, str(root))
    return root


def test_two_ranks_equal_one_process_with_twice_the_batch(runs):
    one, two = final(runs / "lm-1"), final(runs / "lm-2")
    assert max_diff(one, two) <= TOL
    log1, log2 = read_log(runs / "lm-1"), read_log(runs / "lm-2")
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == [1, 2, 3, 4, 5]
    for a, b in zip(log1, log2, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5
        assert a["tokens"] == b["tokens"]  # the global count
    # one evaluation batch: the second rank had none, and the loss is the same
    assert abs(log1[2]["val_loss"] - log2[2]["val_loss"]) <= 1e-5


def test_the_gradient_norm_clip_is_the_same_on_one_and_two_ranks(runs):
    one = json.loads((runs / "norms-1.json").read_text())
    worker = json.loads((runs / "worker.json").read_text())
    assert len(one) == 5 and min(one) > 0.05  # the clip (0.05) acted on every update
    for two in (worker["norms_ddp"], worker["norms_fsdp"]):
        assert len(two) == 5
        assert all(abs(a - b) <= 1e-5 * a for a, b in zip(one, two, strict=True))


def test_masked_lm_losses_are_weighted_by_the_global_target_count(runs):
    assert max_diff(final(runs / "mlm-1"), final(runs / "mlm-2")) <= TOL


def test_fsdp2_on_gloo_equals_ddp_and_one_process(runs):
    fsdp = final(runs / "lm-fsdp")
    assert max_diff(fsdp, final(runs / "lm-2")) <= TOL
    assert max_diff(fsdp, final(runs / "lm-1")) <= TOL
    # the workaround for PyTorch #162338 (a plain sum, then FSDP divides) also averages: it is
    # what runs where the probe finds a summing backend
    assert max_diff(final(runs / "lm-fsdp-sum"), fsdp) <= TOL
    assert isinstance(json.loads((runs / "worker.json").read_text())["fsdp_sums_gradients"],
                      bool)


def test_resume_under_ddp_is_bit_exact(runs):
    full, cut = final(runs / "exact-full"), final(runs / "exact-cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    assert read_state(runs / "exact-cut" / "training")["step"] == 8
    state = read_state(runs / "exact-full" / "training")
    ranks = state["rng_ranks"]
    assert len(ranks) == 2 and ranks[0]["torch"] != ranks[1]["torch"]
    full_log = [(r["step"], r["train_loss"]) for r in read_log(runs / "exact-full")]
    assert full_log == [(r["step"], r["train_loss"]) for r in read_log(runs / "exact-cut")]


def test_resume_under_fsdp_is_bit_exact(runs):
    full, cut = final(runs / "fsdp-full"), final(runs / "fsdp-cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    assert read_state(runs / "fsdp-cut" / "training")["step"] == 8


def test_a_one_process_checkpoint_resumes_on_two_ranks_and_back(runs):
    reference = final(runs / "w1-full")
    assert read_state(runs / "w1-cut" / "training")["step"] == 8  # resumed by the two ranks
    assert max_diff(final(runs / "w1-cut"), reference) <= TOL
    assert read_state(runs / "w2-cut" / "training")["step"] == 4  # cut by the two ranks
    train(lm_config(runs, "w2-cut", max_steps=8), resume=True)  # here: one process
    assert max_diff(final(runs / "w2-cut"), reference) <= TOL


def test_a_time_limit_ends_every_rank_at_the_same_update(runs):
    state = read_state(runs / "timed" / "training")  # the worker finished: no rank was left
    assert state["step"] > 12 and read_log(runs / "timed")[-1]["step"] == state["step"]


def test_checkpoints_have_no_wrapper_prefixes(runs):
    plain = set(final(runs / "lm-1"))
    for name in ("lm-2", "lm-fsdp"):
        for file in (runs / name / "training" / "model.safetensors", runs / name /
                     "model.safetensors"):
            keys = set(read_safetensors(file))
            assert keys == plain
            assert not any(k.startswith(("module.", "_orig_mod.", "model.")) or
                           "_fsdp_wrapped_module" in k for k in keys)
        optimizer = read_safetensors(runs / name / "training" / "optimizer.safetensors")
        assert {k.rsplit("/", 1)[0] for k in optimizer} <= plain


def test_a_rank_without_rows_in_the_last_batch_keeps_in_step(runs):
    one = classify(runs).state_dict()
    two = read_safetensors(runs / "classify-2.safetensors")
    assert max_diff({k: one[k] for k in two}, two) <= 1e-5


# ---------------------------------------------------------------------- the real torchrun

def qkv_train_args(data: Path, out: Path, steps: int, *more: str) -> list[str]:
    return ["train", "--data", str(data), "--preset", "gpt-char-tiny", "--n-layers", "1",
            "--d-model", "32", "--n-heads", "2", "--context", "16", "--batch-size", "4",
            "--max-steps", str(steps), "--eval-every", "3", "--eval-windows", "8",
            "--precision", "fp32", "--device", "cpu", "--threads", "1", "--no-progress",
            "--sample-tokens", "0", "--cache-dir", str(out.parent / "cache"),
            "--out", str(out), *more]


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1]
                                               .split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        todo += kids
    return found


def rank_pid(pid: int, rank: int) -> int | None:
    for child in descendants(pid):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return child
    return None


def test_torchrun_as_two_nodes_on_localhost(tmp_path):
    data, out, port = tmp_path / "data.txt", tmp_path / "run", str(free_port())
    data.write_text(TEXT, encoding="utf-8")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={n}",
         "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
         "-m", "qkv", *qkv_train_args(data, out, 4)],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for n in range(2)]
    try:
        outputs = [p.communicate(timeout=180)[0].decode(errors="replace") for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for n, (p, text) in enumerate(zip(nodes, outputs, strict=True)):
        assert p.returncode == 0, f"node {n}:\n{text[-3000:]}"
    assert "best val loss" in outputs[0] and "best val loss" not in outputs[1]  # rank 0 speaks
    assert [r["step"] for r in read_log(out)] == [3, 4]
    model, _ = qkv.load(out)  # a plain process loads what two wrote
    assert model.config.n_layers == 1


def test_a_killed_rank_ends_the_run_loudly_and_keeps_the_checkpoint(tmp_path):
    data, out = tmp_path / "data.txt", tmp_path / "run"
    data.write_text(TEXT, encoding="utf-8")
    run = subprocess.Popen(
        [sys.executable, "-m", "qkv", *qkv_train_args(data, out, 100_000, "--eval-every", "2",
                                                      "--nproc", "2")],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while find_training_checkpoint(out) is None:  # training, with a checkpoint written
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0]
            time.sleep(0.2)
        victim = rank_pid(run.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        output = run.communicate(timeout=60)[0].decode(errors="replace")
        assert time.monotonic() - killed < 60
        assert run.returncode != 0, output[-2000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    folder = find_training_checkpoint(out)
    assert folder is not None and read_state(folder)["step"] % 2 == 0
    model, _ = qkv.load(out)
    model.load_state_dict({**model.state_dict(), **read_safetensors(folder / "model.safetensors")})
