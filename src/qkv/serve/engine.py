"""The generation engine of `qkv serve`: continuous (iteration-level) batching.

One thread owns the model. It loops:

1. drop the sequences whose client went away (their slot frees at the next step);
2. admit waiting sequences while fewer than `max_seqs` run: each new one reads its prompt alone
   (the "prefill") into its own KV cache and draws its first token;
3. run one decoding step for every running sequence together, draw each one's next token,
   and hand the new text to its request.

A sequence joins and leaves the batch at any step, so a short request never waits for a long one
(Yu et al. 2022, "Orca", call this iteration-level scheduling).

Same text alone or in a batch. The step runs every linear layer on a batch of exactly
`max_seqs` rows, whatever the number of running sequences (empty slots are zeros). A matrix
product's rows are computed the same way for the same shapes, but not across shapes (PyTorch's
CPU kernels sum in a different order for one row than for eight), so a fixed width keeps each
row's numbers independent of its neighbours. Attention, whose inputs have a different length
for every sequence, runs per sequence on its own cache: no padding, no mask (the model does
this when `Transformer.next_token_logits` is given a list of caches, one per row). The prefill
runs per sequence too. So a greedy or seeded request gives the same tokens alone or beside
others.

A fixed width costs little on a CPU if the weights are packed for it: fp32 linear layers of the
step use MKL's packed matrix product (`torch.ops.mkl._mkl_linear`, the kernel PyTorch's own
compiler uses for CPU inference), which lays each weight out once for a batch of `max_seqs`
rows instead of at every call; eight rows then cost about what one row costs with `nn.Linear`.
The price is a second copy of the weights in memory; `pack=False` turns it off.

`exact=False` gives up the guarantee for speed when few sequences run: the step then has as
many rows as running sequences, so a lone sequence costs what it costs in `qkv.generate`, but
its text may change (by an fp32 rounding that flips an argmax) when others join it.

Waiting requests are bounded (`max_queue`); beyond that `submit` raises QueueFull (HTTP 429).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import model_device
from ..generate import TextRow, sample_next
from ..layers.block import DecoderCache
from ..model import Transformer

Emit = Callable[[dict], None]


class QueueFull(Exception):
    """The waiting queue is full; try again later."""


@dataclass
class Sampling:
    """How one sequence draws its tokens (already checked by the app)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's and the k best


class Sequence:
    """One generated continuation: its tokens, its KV cache, and where its events go.

    Events (dicts) passed to `emit`, from the engine thread:
        {"type": "text", "text": piece, "logprobs": [token entries]}
        {"type": "done", "finish_reason": "stop" | "length", "completion_tokens": n}
        {"type": "error", "message": ...}
    """

    def __init__(self, prompt_ids: list[int], sampling: Sampling, emit: Emit) -> None:
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.emit = emit
        self.last_token: int | None = None
        self.generated = 0
        self.cache: DecoderCache | None = None  # the model's decoder cache, made at prefill
        self.row: TextRow | None = None
        self.generator: torch.Generator | None = None
        self.cancelled = False
        self.finished = False
        self.pending_logprobs: list[dict] = []

    def cancel(self) -> None:
        """Ask the engine to stop this sequence at its next step (thread-safe: one flag)."""
        self.cancelled = True


class Engine:
    """Runs the sequences of many requests on one decoder model, in a background thread."""

    def __init__(self, model: Transformer, tokenizer, max_seqs: int = 8,
                 max_queue: int = 64, pack: bool = True, exact: bool = True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.exact = exact
        self.packed = _PackedLinears(model, max_seqs) if pack else _PackedLinears(None, 0)
        self.max_seqs, self.max_queue = max_seqs, max_queue
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.jobs: collections.deque[tuple[Callable[[], object], Callable]] = collections.deque()
        self.running: list[Sequence] = []
        self.lock = threading.Condition()
        self.stopping = False
        self.steps = 0  # decoding steps run (for tests and stats)
        self.peak = 0  # the most sequences decoded in one step so far
        self.device = model_device(model)
        self.thread = threading.Thread(target=self._loop, name="qkv-serve-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ called from the app

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); QueueFull when the queue has no room for them."""
        with self.lock:
            if len(self.waiting) + len(self.jobs) + len(seqs) > self.max_queue:
                raise QueueFull
            self.waiting.extend(seqs)
            self.lock.notify()

    def run_job(self, fn: Callable[[], object], done: Callable[[object, BaseException | None],
                                                              None]) -> None:
        """Run fn() on the engine thread between steps; done(result, error) afterwards."""
        with self.lock:
            if len(self.waiting) + len(self.jobs) + 1 > self.max_queue:
                raise QueueFull
            self.jobs.append((fn, done))
            self.lock.notify()

    def wake(self) -> None:
        with self.lock:
            self.lock.notify()

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting),
                "max_seqs": self.max_seqs, "max_queue": self.max_queue, "steps": self.steps,
                "peak_running": self.peak}

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout=5)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.stopping or self.waiting or self.jobs or self.running):
                    self.lock.wait(timeout=0.5)
                if self.stopping:
                    break
                self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
                jobs = list(self.jobs)
                self.jobs.clear()
                admitted = []
                while self.waiting and len(self.running) + len(admitted) < self.max_seqs:
                    admitted.append(self.waiting.popleft())
            for fn, done in jobs:
                self._run_job(fn, done)
            self.running = [s for s in self.running if not s.cancelled]
            for seq in admitted:
                self._guard(seq, self._prefill)
            self.running = [s for s in self.running if not (s.finished or s.cancelled)]
            if self.running:
                self.peak = max(self.peak, len(self.running))
                try:
                    self._step(self.running)
                except Exception as e:  # a bug, not a user error: fail these requests loudly
                    for seq in self.running:
                        self._fail(seq, e)
                self.steps += 1
                self.running = [s for s in self.running if not (s.finished or s.cancelled)]
        for seq in [*self.running, *self.waiting]:
            seq.emit({"type": "error", "message": "the server is shutting down"})

    def _run_job(self, fn, done) -> None:
        try:
            result = fn()
        except BaseException as e:  # handed to the request, which reports it
            done(None, e)
        else:
            done(result, None)

    def _guard(self, seq: Sequence, fn: Callable[[Sequence], None]) -> None:
        try:
            fn(seq)
        except Exception as e:
            self._fail(seq, e)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.finished = True
        seq.emit({"type": "error", "message": f"{type(error).__name__}: {error}"})

    # ------------------------------------------------------------------ the model

    @torch.inference_mode()
    def _prefill(self, seq: Sequence) -> None:
        """Read the prompt of one sequence into its own cache and draw its first token."""
        model = self.model
        s = seq.sampling
        seq.row = TextRow(self.tokenizer, s.stop, self.tokenizer.eos_id)
        if s.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(s.seed)
        seq.cache = model.new_cache()
        ids = torch.tensor([seq.prompt_ids], device=self.device)  # (1, T)
        self._choose(seq, model.next_token_logits(ids, seq.cache))  # (1, V)
        self.running.append(seq)

    @torch.inference_mode()
    def _step(self, seqs: list[Sequence]) -> None:
        """One new token for each running sequence, linear layers on `max_seqs` rows (on as
        many rows as sequences when not `exact`): each live row against its own cache, the
        rows after them filler (token 0)."""
        W = self.max_seqs if self.exact else len(seqs)
        ids = torch.zeros(W, 1, dtype=torch.long, device=self.device)  # (W, 1)
        ids[:len(seqs), 0] = torch.tensor([seq.last_token for seq in seqs])
        caches = [seq.cache for seq in seqs if seq.cache is not None]
        if len(caches) != len(seqs):
            raise RuntimeError("a running sequence has no cache")
        with self.packed.active():
            logits = self.model.next_token_logits(ids, caches)  # (W, V)
        for r, seq in enumerate(seqs):
            self._choose(seq, logits[r:r + 1])

    def _choose(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Draw the next token of `seq` from its logits (1, V) and emit what it adds."""
        s = seq.sampling
        token = int(sample_next(logits, s.temperature, s.top_k, s.top_p, seq.generator)[0])
        seq.last_token = token
        seq.generated += 1
        if s.logprobs is not None and token != self.tokenizer.eos_id:
            seq.pending_logprobs.append(self._logprob_entry(logits[0], token, s.logprobs))
        row = seq.row
        if row is None:
            raise RuntimeError("a sequence chose a token before its prefill")
        piece = row.push(token)
        ended = row.done  # end-of-text or a stop string
        limit = seq.generated >= s.max_tokens
        if piece or (seq.pending_logprobs and (ended or limit)):
            seq.emit({"type": "text", "text": piece, "logprobs": seq.pending_logprobs})
            seq.pending_logprobs = []
        if ended or limit:
            if not ended and (rest := row.flush()):
                seq.emit({"type": "text", "text": rest, "logprobs": seq.pending_logprobs})
                seq.pending_logprobs = []
            seq.finished = True
            seq.cache = None  # free the memory now
            seq.emit({"type": "done", "finish_reason": "stop" if ended else "length",
                      "completion_tokens": seq.generated})

    def _logprob_entry(self, logits: torch.Tensor, token: int, k: int) -> dict:
        logp = logits.log_softmax(dim=-1)  # (V,)
        entry = {"token": self._token_text(token), "logprob": float(logp[token]), "top": []}
        if k:
            values, index = logp.topk(min(k, logp.shape[-1]))
            entry["top"] = [(self._token_text(int(t)), float(v))
                            for v, t in zip(values.tolist(), index.tolist(), strict=True)]
        return entry

    def _token_text(self, token: int) -> str:
        return self.tokenizer.backend.decode([token], skip_special_tokens=False)


class _PackedLinears:
    """The fp32 linear layers of a CPU model, with their weights packed by MKL for `width`
    rows; inside `active()` a product of exactly `width` rows uses the packed copy."""

    def __init__(self, model: nn.Module | None, width: int) -> None:
        self.layers: list[tuple[nn.Linear, Callable]] = []
        if model is None or not _mkl_packing():
            return
        for m in model.modules():
            if type(m) is not nn.Linear:  # not a subclass: those have their own forward
                continue
            w = m.weight
            if w.dtype == torch.float32 and w.device.type == "cpu":
                packed = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), width)
                self.layers.append((m, functools.partial(_packed_linear, m, packed, width)))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for layer, forward in self.layers:
            layer.forward = forward
        try:
            yield
        finally:
            for layer, _ in self.layers:
                layer.__dict__.pop("forward", None)  # back to nn.Linear.forward


def _mkl_packing() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _packed_linear(layer: nn.Linear, packed: torch.Tensor, width: int,
                   x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])  # (rows, in_features)
    if flat.shape[0] != width:
        return F.linear(x, layer.weight, layer.bias)
    y = torch.ops.mkl._mkl_linear(flat, packed, layer.weight, layer.bias, width)
    return y.view(*x.shape[:-1], y.shape[-1])


def wait_idle(engine: Engine, timeout: float = 5.0) -> bool:
    """Whether the engine has nothing running or waiting within `timeout` seconds (tests)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not engine.running and not engine.waiting:
            return True
        time.sleep(0.01)
    return False
