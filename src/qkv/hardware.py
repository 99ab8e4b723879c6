"""Where and in what number format to run: device, precision, CPU threads. Training,
fine-tuning, embedding, evaluation and generation all decide these here, the same way.

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
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import ConfigError, PrecisionError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp32")


def check_device_name(name: str) -> str:
    """`name` if it names a device ("auto", "cpu", "cuda", "cuda:1", "mps"); else ConfigError."""
    kind, _, index = str(name).partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"device={name!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    return str(name)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple's MPS, then the CPU; an explicit device must exist."""
    if isinstance(name, torch.device):
        name = str(name)
    kind = check_device_name(name).partition(":")[0]
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = kind = "cuda" if cuda else "mps" if mps else "cpu"
    if kind == "cuda" and not cuda:
        raise ConfigError(f"device={name} was asked for, but PyTorch sees no CUDA GPU")
    if kind == "cuda" and ":" in name and int(name.partition(":")[2]) >= torch.cuda.device_count():
        raise ConfigError(f"device={name} was asked for, but PyTorch sees "
                          f"{torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not mps:
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


def fast_bf16(device: str | torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively: a CUDA GPU with bf16, or a CPU with
    AMX or AVX512-BF16. Another device (Apple's mps) answers False without looking at the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def resolve_precision(name: str, device: str | torch.device = "cpu") -> str:
    """"bf16" or "fp32". "auto" is bf16 where the hardware computes it natively (fast_bf16).

    An unknown name, or bf16 on a device that cannot compute it at all, raises PrecisionError.
    bf16 on a CPU without the native instructions is allowed: it is correct, only slower."""
    if name not in PRECISIONS:
        raise PrecisionError(f"precision={name!r} is not one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if name == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if name == "bf16" and device.type == "mps":
        raise PrecisionError("precision=bf16 is not supported on the mps device; use fp32")
    return name


def autocast(device: str | torch.device, precision: str):
    """A context in which matrix products run in bf16 (weights stay fp32), or a no-op (fp32)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def hold_frozen_weights(model: torch.nn.Module, precision: str) -> dict[str, torch.Tensor]:
    """For training under bf16 autocast: the frozen weights of the linear layers held in bf16.

    Autocast casts every weight to bf16 at each use and keeps the cast only for the weights
    that are trained; a frozen weight (the base under a LoRA update) is cast again at every
    forward pass, 124M numbers for GPT-2 each time. Cast them once instead (in place). A frozen
    weight shared with an embedding (a tied output layer) stays fp32 for the embedding, whose
    lookup feeds the fp32 residual stream; its linear layer gets its own bf16 copy (the same
    numbers autocast would make), tied again by `restore_weights`. Returns {name in the state
    dict: the original fp32 tensor (for a tied weight, the shared parameter itself)}, for
    saving and for `restore_weights`; {} unless `precision` is bf16."""
    if precision != "bf16":
        return {}
    embedded = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear)
                for p in m.parameters(recurse=False)}
    frozen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
              and m.weight.dtype == torch.float32]
    chosen = {id(m.weight) for _, m in frozen if id(m.weight) not in embedded}
    held: dict[str, torch.Tensor] = {
        name: p.data for name, p in model.named_parameters(remove_duplicate=False)
        if id(p) in chosen}  # every name of a shared weight
    for p in model.parameters():  # each weight once
        if id(p) in chosen:
            p.data = p.data.to(torch.bfloat16)
    for name, m in frozen:  # a tied output layer: its own bf16 copy, the embedding keeps fp32
        if id(m.weight) in embedded:
            held[f"{name}.weight" if name else "weight"] = m.weight
            m.weight = torch.nn.Parameter(m.weight.detach().to(torch.bfloat16),
                                          requires_grad=False)
    return held


def restore_weights(model: torch.nn.Module, held: dict[str, torch.Tensor]) -> None:
    """Put back the tensors `hold_frozen_weights` replaced, and tie again what it untied."""
    for module_name, m in model.named_modules():
        for pname, p in list(m.named_parameters(recurse=False)):
            name = f"{module_name}.{pname}" if module_name else pname
            original = held.get(name)
            if isinstance(original, torch.nn.Parameter) and original is not p:
                setattr(m, pname, original)  # the shared parameter, tied again
            elif original is not None:
                p.data = original


#: Sequences at least this long train their bf16 attention with PyTorch's fused kernel on a CPU.
FUSED_ATTENTION_FROM = 256


def training_attention(device: torch.device, precision: str, length: int | None = None):
    """The attention kernel to train with: a context around forward *and* backward.

    On a CPU in bf16 the best kernel depends on the sequence `length` (measured with torch 2.13
    on Sapphire Rapids, forward + backward): for short sequences the plain "math" kernel
    (matmul, softmax, matmul) is 2-3x faster than the fused flash-attention kernel (64 tokens:
    1.6 ms against 4.2 ms for nanoGPT's baby shape); from about 256 tokens the fused kernel wins
    and keeps winning (GPT-2's 256: 15 ms against 23 ms; 512 with a mask: 90 ms against 300 ms)
    because it never writes the (T, T) attention weights. Elsewhere the default choice stands.
    """
    if device.type == "cpu" and precision == "bf16" and (length is None
                                                         or length < FUSED_ATTENTION_FROM):
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


KERNEL_CACHE = 64  # compiled oneDNN kernels kept per process (oneDNN's own default: 1,024)


def small_kernel_cache() -> None:
    """Keep at most KERNEL_CACHE compiled oneDNN kernels in this process (and the processes it
    starts), unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is already set.

    oneDNN, which runs PyTorch's CPU matrix products, compiles a kernel for each new shape and
    caches it. Training on batches of varying shapes (length-bucketed translation batches, for
    one) fills its 1,024-entry cache, and every entry keeps its working memory; a smaller cache
    saved memory there at no cost in speed (measured in docs/performance.md). oneDNN reads the
    variable once, when it makes its first kernel, so the CLI calls this first thing; in your
    own program, set the variable before the first matrix product."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(KERNEL_CACHE))


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
