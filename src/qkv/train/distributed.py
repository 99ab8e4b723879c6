"""Training on several processes (one per GPU, or CPU processes): what changes, in one place.

    torchrun --nproc_per_node=2 -m qkv train ...      (or: qkv train --nproc 2 ...)

torchrun starts the processes ("ranks") and tells each its RANK, WORLD_SIZE and where to meet
(MASTER_ADDR, MASTER_PORT). The loop (train/loop.py) stays the same; it asks a `Parallel`:

    shard       every rank draws the SAME global micro-batch from the objective's stream and keeps
                its own slice of the rows. `--batch-size` is therefore the global batch, the data
                position is one number for all ranks, and a run resumes on any world size.
    weighting   a loss is a mean over the targets of a micro-batch. Rank r's mean covers w_r of
                the batch's W targets; scaling it by n * w_r / W (n ranks) makes the average
                over ranks (what DDP and FSDP compute) exactly the mean over all W targets, as
                one process would take it, however the padding or masking falls on each rank.
    call        the loss runs inside the forward of a wrapper module (`LossModule`), so DDP's
                gradient all-reduce and FSDP's all-gathers see every forward, whatever model
                methods the objective calls.
    agree       stop requests (Ctrl-C, SIGTERM, the time limit) and a time-fitted schedule are
                agreed on by all ranks after every update: no rank leaves the loop alone.
    state       weights and optimizer state are gathered whole (FSDP's shards included) and
                written by rank 0 in the one-process format, without `module.` or FSDP
                prefixes: a plain process loads them. Each rank's random state is kept.

DDP (Li et al. 2020, "PyTorch Distributed") keeps a full copy of the model on every rank and
averages the gradients. FSDP2 (`fully_shard`; Zhao et al. 2023) keeps 1/n of every block's
weights, gradients and optimizer state on each rank and gathers a block's weights just before it
runs. With one process none of this runs: the loop is exactly the single-process loop.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .checkpoint import b64, unb64

SIGNALS = (None, "SIGINT", "SIGTERM")


# ---------------------------------------------------------------------- the process group

def launched() -> bool:
    """True in a process started by torchrun (or anything that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that logs, shows progress and writes files."""
    return rank() == 0


def start(device: torch.device, timeout_s: float = 600) -> torch.device:
    """Join the process group when launched by torchrun (gloo on a CPU, nccl on CUDA); returns
    this rank's device (cuda:LOCAL_RANK for a GPU). Without torchrun: nothing, `device` back.

    A collective that waits longer than `timeout_s` (a rank died or hangs) raises."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"training on several processes needs a CPU or CUDA, not {device}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return device


def finish() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it fills a cache), then the others (they read it)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def relaunch(nproc: int, argv: Sequence[str], nnodes: int = 1) -> int:
    """Run `python -m qkv ARGV` under torchrun with `nproc` processes on this machine; the exit
    status of torchrun (non-zero if any rank failed)."""
    if nnodes != 1:
        raise ConfigError("--nproc starts processes on this machine only; for several machines "
                          "run torchrun on each (docs/distributed.md)")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "qkv", *argv]
    print("qkv: running " + " ".join(command[2:]), file=sys.stderr)
    return subprocess.run(command, check=False).returncode


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """argv without `option VALUE` (or `option=VALUE`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def rank_rng_states(device: torch.device) -> list[dict[str, str]]:
    """Every rank's random states (the CPU's, and its GPU's), in rank order, for a checkpoint;
    [] with one process."""
    if not active():
        return []
    own = [torch.get_rng_state()]
    if device.type == "cuda":
        own.append(torch.cuda.get_rng_state(device))
    gathered = []
    for state in own:
        state = state.to(device)  # NCCL gathers GPU tensors only
        parts = [torch.empty_like(state) for _ in range(world_size())]
        dist.all_gather(parts, state)
        gathered.append([b64(p) for p in parts])
    return [{"torch": gathered[0][r], **({"cuda_device": gathered[1][r]} if device.type == "cuda"
                                         else {})} for r in range(world_size())]


def set_rank_rng_state(states: list[dict[str, str]], device: torch.device) -> None:
    """This rank's random states from `rank_rng_states`, if the checkpoint has them (a run on
    as many processes or more)."""
    if not active() or rank() >= len(states):
        return
    torch.set_rng_state(unb64(states[rank()]["torch"]))
    if device.type == "cuda" and "cuda_device" in states[rank()]:
        torch.cuda.set_rng_state(unb64(states[rank()]["cuda_device"]), device)


# ---------------------------------------------------------------------- batches and the loss

def shard(batch: Sequence[torch.Tensor], weight: Callable[[Any], float] | None, rank: int,
          world: int) -> tuple[tuple[torch.Tensor, ...], float]:
    """(this rank's rows of a global micro-batch, the factor its mean loss is scaled by).

    Rows are split as evenly as they go (the last ranks get one more). A rank whose slice holds
    no target (no rows, or nothing masked) computes another rank's slice with factor 0: it still
    takes part in every collective, adds nothing, and its loss is finite."""
    rows = int(batch[0].shape[0])
    bounds = [rows * r // world for r in range(world + 1)]
    slices = [tuple(t[bounds[r]:bounds[r + 1]] for t in batch) for r in range(world)]
    count = weight or (lambda b: b[0].shape[0])
    weights = [float(count(s)) if bounds[r + 1] > bounds[r] else 0.0
               for r, s in enumerate(slices)]
    total = sum(weights)
    if total == 0:  # nothing to learn from in this micro-batch: as one process would, a mean
        return tuple(batch), 1.0
    mine = rank if weights[rank] > 0 else next(r for r, w in enumerate(weights) if w > 0)
    return slices[mine], world * weights[rank] / total


class LossModule(nn.Module):
    """Runs `fn(model, *args)` as its forward, so that a wrapper's hooks (DDP's gradient
    all-reduce, FSDP's all-gathers) see it, whatever methods of the model `fn` calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def my_share(items: Sequence[Any]) -> list[tuple[Any, bool]]:
    """This rank's share of fixed evaluation batches, as (item, counts): every rank gets the same
    number of items (those short of real ones repeat the first with counts=False), so a rank
    with nothing to evaluate still joins FSDP's all-gathers and never leaves another waiting."""
    if not active() or not items:
        return [(item, True) for item in items]
    mine = [(item, True) for item in items[rank()::world_size()]]
    per_rank = -(-len(items) // world_size())
    return mine + [(items[0], False)] * (per_rank - len(mine))


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each value added up over the ranks (the same on every rank)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return tuple(t.tolist())


# ---------------------------------------------------------------------- FSDP2

def shard_fully(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
                ) -> nn.Module:
    """FSDP2: every block of the model's `layers` lists, then the rest, sharded over the ranks;
    the optimizer is pointed at the sharded parameters (and its state, if any, sharded too).
    Returns the root module the loss runs through."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh = init_device_mesh(device.type, (world_size(),))
    before = {id(p): name for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh)
    root = LossModule(model)
    fully_shard(root, mesh=mesh)
    if fsdp_sums_gradients(device):  # PyTorch issue #162338 (docs/distributed.md)
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    after = dict(model.named_parameters())
    state = optimizer.state
    for group in optimizer.param_groups:
        new = [after[before[id(p)]] for p in group["params"]]
        for old, p in zip(group["params"], new, strict=True):
            if old in state:
                assert isinstance(p, DTensor)
                state[p] = {k: distribute_tensor(v, p.device_mesh, p.placements)
                            if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                            for k, v in state.pop(old).items()}
        group["params"] = new
        if group.get("fused"):  # the fused AdamW kernel takes plain tensors only
            group["fused"], group["foreach"] = False, True
    return root


_FSDP_SUMS: dict[str, bool] = {}


def fsdp_sums_gradients(device: torch.device | None = None) -> bool:
    """Whether FSDP2 on this backend adds the ranks' gradients instead of averaging them
    (PyTorch issue #162338, seen with gloo). Measured once: every rank's gradient of x.sum()
    is 1, so an average gives 1 and a sum gives the world size."""
    backend = str(dist.get_backend())
    if backend not in _FSDP_SUMS:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
                else torch.device("cpu")
        probe = nn.Linear(1, world_size(), bias=False, device=device)  # a weight row per rank
        fully_shard(probe, mesh=init_device_mesh(device.type, (world_size(),)))
        probe(torch.ones(1, 1, device=device)).sum().backward()
        grad = probe.weight.grad
        assert grad is not None
        full = full_tensor(grad)
        _FSDP_SUMS[backend] = bool(full.flatten()[0].item() > 1.5)
    return _FSDP_SUMS[backend]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor gathered whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # type: ignore[union-attr]


# ---------------------------------------------------------------------- what the loop asks

class Parallel:
    """The loop's view of the other ranks. With one process every method is the identity."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, fsdp: bool = False) -> None:
        self.model, self.rank, self.world, self.fsdp = model, rank(), world_size(), fsdp
        self.main = self.rank == 0
        self.wrapper: Any = None
        if fsdp and self.world == 1:
            fsdp = self.fsdp = False  # one process holds everything anyway
        if fsdp:
            self.wrapper = shard_fully(model, optimizer, device)
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapper = DistributedDataParallel(
                LossModule(model), device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True)  # a task may leave a head unused (classification)

    def shard(self, batch: Sequence[torch.Tensor], weight: Callable[[Any], float] | None
              ) -> tuple[tuple[torch.Tensor, ...], float]:
        if self.world == 1:
            return tuple(batch), 1.0
        return shard(batch, weight, self.rank, self.world)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(model, *args), through the wrapper when there is one."""
        return fn(self.model, *args) if self.wrapper is None else self.wrapper(fn, *args)

    def evaluate(self, fn: Callable[[Any], dict[str, float]]) -> dict[str, float]:
        """The objective's evaluation, run by every rank (FSDP needs all of them to gather the
        weights); rank 0's metrics are everyone's, so that all ranks keep the same best model."""
        metrics = fn(self.model) if not self.fsdp else self.wrapper(fn)
        if self.world == 1:
            return metrics
        values = torch.tensor([metrics[k] for k in sorted(metrics)], dtype=torch.float64)
        dist.broadcast(values, 0)
        return dict(zip(sorted(metrics), values.tolist(), strict=True))

    @contextlib.contextmanager
    def accumulating(self, yes: bool) -> Iterator[None]:
        """Inside, gradients are not synchronised (a micro-batch before the last)."""
        if not yes or self.wrapper is None:
            yield
        elif self.fsdp:
            self.wrapper.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.wrapper.set_requires_gradient_sync(True)
        else:
            with self.wrapper.no_sync():
                yield

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The average of `t` over the ranks."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t

    def agree(self, signal: str | None, out_of_time: bool, max_steps: int | None
              ) -> tuple[str | None, bool, int | None]:
        """A stop any rank saw, and the largest fitted step count, hold for all ranks."""
        if self.world == 1:
            return signal, out_of_time, max_steps
        t = torch.tensor([SIGNALS.index(signal), int(out_of_time),
                          -1 if max_steps is None else max_steps], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        code, late, steps = t.tolist()
        return SIGNALS[code], bool(late), None if steps < 0 else steps

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's full state dict (every rank must call this under FSDP)."""
        state = self.model.state_dict()
        if not self.fsdp:
            return state
        return {k: full_tensor(v).detach().cpu() for k, v in state.items()}

    def optimizer_full(self, optimizer: torch.optim.Optimizer
                       ) -> contextlib.AbstractContextManager[None]:
        """Inside, the optimizer's state tensors are whole (gathered from FSDP's shards)."""
        return _whole_state(optimizer) if self.fsdp else contextlib.nullcontext()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@contextlib.contextmanager
def _whole_state(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    saved = {p: dict(s) for p, s in optimizer.state.items()}
    try:
        for s in optimizer.state.values():
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    s[k] = full_tensor(v)
        yield
    finally:
        for p, s in saved.items():
            optimizer.state[p] = s
