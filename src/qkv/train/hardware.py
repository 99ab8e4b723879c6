"""Where and in what number format to train: device, precision, CPU threads.

bf16 ("brain float 16") keeps fp32's 8-bit exponent, so it covers the same range of values, but
only 8 bits of mantissa. Matrix multiplications in bf16 run several times faster on hardware built
for it (CUDA GPUs since Ampere; Intel CPUs with AMX or AVX512-BF16), and the precision is enough
for training when it is used through *autocast*: the weights, the optimizer and the loss stay in
fp32, and only the matrix products (and the activations between them) are computed in bf16.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path

import torch

from ..errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple's MPS, then the CPU; an explicit device must exist."""
    if name not in DEVICES:
        raise ConfigError(f"device={name!r} is not one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise ConfigError("device=cuda was asked for, but PyTorch sees no CUDA GPU")
    if name == "mps" and not mps:
        raise ConfigError("device=mps was asked for, but this PyTorch has no Apple MPS backend")
    return torch.device(name)


@functools.cache
def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (Intel AMX or AVX512-BF16)."""
    capability = str(torch.backends.cpu.get_cpu_capability()).lower()
    if "amx" in capability:
        return True
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return False
    try:
        flags = set()
        for line in cpuinfo.read_text(errors="ignore").splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_precision(name: str, device: torch.device) -> str:
    """"bf16" or "fp32". "auto" is bf16 where the hardware computes it natively."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision={name!r} is not one of {', '.join(PRECISIONS)}")
    if name != "auto":
        if name == "bf16" and device.type == "mps":
            raise ConfigError("precision=bf16 is not supported on the mps device; use fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """A context in which matrix products run in bf16 (or a no-op for fp32)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def training_attention(device: torch.device, precision: str):
    """The attention kernel to train with: a context around forward *and* backward.

    On a CPU in bf16, PyTorch's fused flash-attention kernel is fast forward but its backward
    pass is several times slower than in fp32 (measured with torch 2.x on Sapphire Rapids); the
    plain "math" kernel (matmul, softmax, matmul) runs on the fast bf16 matrix units both ways.
    Everywhere else the default choice stands.
    """
    if device.type == "cpu" and precision == "bf16":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def available_cpus() -> int:
    """CPUs this process may run on (a container may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def idle_cpus(sample_seconds: float = 0.3) -> int | None:
    """How many CPUs are idle right now (Linux: two looks at /proc/stat), or None if unknown."""

    def totals() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all time, idle + iowait

    try:
        total0, idle0 = totals()
        time.sleep(sample_seconds)
        total1, idle1 = totals()
    except (OSError, ValueError, IndexError):
        return None
    cpus = os.cpu_count() or 1
    busy = cpus * (1 - (idle1 - idle0) / max(1, total1 - total0))
    return max(0, cpus - round(busy))


def set_threads(threads: int | None = None) -> int:
    """Use `threads` intra-op threads; by default one per CPU that is available and idle now
    (at least one). Returns the number.

    PyTorch splits each operation over its threads and waits for the slowest: a thread that
    shares its CPU with another program makes every operation wait for it, so on a busy machine
    fewer threads run much faster (10x on a 2-core laptop with one core taken). Pass `threads`
    for runs that must repeat bit for bit on any load.
    """
    if threads is None:
        idle = idle_cpus()
        threads = min(torch.get_num_threads(), available_cpus())
        if idle is not None:
            threads = max(1, min(threads, idle))
    if threads < 1:
        raise ConfigError(f"threads={threads} must be at least 1")
    torch.set_num_threads(threads)
    return threads
