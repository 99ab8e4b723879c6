"""The generation engine of `qkv serve`: continuous (iteration-level) batching.

One thread owns the model. It loops:

1. drop the sequences whose client went away (their slot frees at the next step);
2. admit waiting sequences while fewer than `max_seqs` run: each new one reads its prompt alone
   (the "prefill") into its own KV cache and draws its first token;
3. run one decoding step for every running sequence together, draw each one's next token,
   and hand the new text to its request.

A sequence joins and leaves the batch at any step, so a short request never waits for a long one
(Yu et al. 2022, "Orca", call this iteration-level scheduling).

Same text alone or in a batch. A matrix product's rows are not always computed the same way
for different numbers of rows: PyTorch's fp32 CPU kernels sum one row in a different order than
eight. Attention, whose inputs have a different length for every sequence, runs per sequence on
its own cache: no padding, no mask (the model does this when `Transformer.next_token_logits` is
given a list of caches, one per row); the prefill runs per sequence too. What remains is the
width of the step's linear layers, and the engine measures, when it starts, from which width
on a row's logits stop depending on it: it runs a few probe sequences at every width from
`max_seqs` down, and beside different neighbours, and keeps the narrowest width that gives the
same bits (`width_from`). A step then has max(running sequences, width_from) rows, the rows
after the live ones filler (token 0). So a greedy or seeded request gives the same tokens alone
or beside others:

- bf16 weights (oneDNN's kernels, on a CPU with AMX or AVX512-BF16) and int8 weights with
  per-row int8 inputs (`Int8Linear`'s "int8-rows": exact integer sums) give the same bits at
  every width: a lone sequence runs one row, and eight rows cost little more than one,
  because the time goes into reading weights;
- bf16 on a CPU without native bf16 is emulated, and its one-row products differ from its
  many-row ones for rare inputs, too rare for the probe to see: such a model runs at the full
  `max_seqs` width whatever the probe says (`_narrow_steps_trusted`);
- fp32 on MKL changes between one row and two (and the packed product below differs from the
  plain one), so fp32 runs at the full `max_seqs` width.

The step's linear layers read weights laid out once for their kernels (`quantize.pack_linears`,
in place on the served model): bf16 weights in oneDNN's blocked layout, for any number of rows
(the same numbers as nn.Linear; 1.36x faster at 8 rows in bench_products.py), and fp32
weights in MKL's packed layout for a batch of `max_seqs` rows (eight rows then cost about what
one row costs with `nn.Linear`). The price is a second copy of the weights in memory;
`pack=False` turns it off.

A model whose rows depend on their neighbours' values (FBGEMM's int8 inputs share one range
per batch: `quantize_int8(activations="int8")`) fails the probe: `exact_verified` is then
False and the guarantee does not hold (`qkv serve --dtype int8` uses "int8-rows" for this).

`exact=False` gives up the guarantee for speed: the step then has as many rows as running
sequences, whatever the probe says.

Waiting requests are bounded (`max_queue`); beyond that `submit` raises QueueFull (HTTP 429).
"""

from __future__ import annotations

import collections
import copy
import ctypes
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..batching import model_device
from ..generate import TextRow, sample_next
from ..hardware import cpu_has_bf16
from ..layers.block import DecoderCache
from ..model import Transformer
from ..quantize import pack_linears

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
        if pack:  # weights laid out once for the step's kernels (see the module docstring)
            pack_linears(model, rows=max_seqs)
        self.max_seqs, self.max_queue = max_seqs, max_queue
        self.device = model_device(model)
        # The narrowest step that keeps every row's numbers (see the module docstring), and
        # whether rows are independent of their neighbours at all; measured for decoders.
        self.width_from, self.exact_verified = max_seqs, False
        if exact and model.config.family == "decoder":
            self.width_from, self.exact_verified = self._probe_widths()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.jobs: collections.deque[tuple[Callable[[], object], Callable]] = collections.deque()
        self.running: list[Sequence] = []
        self.lock = threading.Condition()
        self.stopping = False
        self.steps = 0  # decoding steps run (for tests and stats)
        self.trimmed_at = 0  # the step count when the engine last gave free memory back
        self.peak = 0  # the most sequences decoded in one step so far
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
                "peak_running": self.peak, "exact": self.exact and self.exact_verified,
                "width_from": self.width_from if self.exact else 1}

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout=5)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self.lock:
                idle = not (self.stopping or self.waiting or self.jobs or self.running)
            if idle and self.steps != self.trimmed_at:  # the work is done: give memory back
                self.trimmed_at = self.steps
                release_free_memory()
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
            self.running = self._live(self.running)
            for seq in admitted:
                self._guard(seq, self._prefill)
            self.running = self._live(self.running)
            if self.running:
                self.peak = max(self.peak, len(self.running))
                try:
                    self._step(self.running)
                except Exception as e:  # a bug, not a user error: fail these requests loudly
                    for seq in self.running:
                        self._fail(seq, e)
                self.steps += 1
                self.running = self._live(self.running)
        for seq in [*self.running, *self.waiting]:
            seq.emit({"type": "error", "message": "the server is shutting down"})

    @staticmethod
    def _live(seqs: list[Sequence]) -> list[Sequence]:
        """The sequences still running. A cancelled one's KV cache is let go now: the request
        that held it sits in a reference cycle (its emitter) that only a full garbage
        collection would free, megabytes each."""
        for seq in seqs:
            if seq.cancelled:
                seq.cache = None
        return [s for s in seqs if not (s.finished or s.cancelled)]

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
        seq.cache = None
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
        # room for the prompt and every token the request may add: never reallocated (the
        # pages a sequence does not reach are never touched, so they cost no memory)
        seq.cache = model.new_cache(min(model.config.max_seq_len,
                                        len(seq.prompt_ids) + s.max_tokens))
        ids = torch.tensor([seq.prompt_ids], device=self.device)  # (1, T)
        self._choose(seq, model.next_token_logits(ids, seq.cache))  # (1, V)
        self.running.append(seq)

    @torch.inference_mode()
    def _probe_widths(self) -> tuple[int, bool]:
        """(width_from, exact_verified): the narrowest step width from which a row's logits are
        the same bits at every wider width, and whether they are the same beside different
        neighbours. Probe sequences of a few random tokens, each with its own cache, step at
        every width from max_seqs down (the caches copied for each run)."""
        model, W = self.model, self.max_seqs
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, vocab, (1, 2 + r % 3), generator=gen) for r in range(2 * W)]
        caches = []
        for p in prompts:
            caches.append(model.new_cache())
            model.next_token_logits(p.to(self.device), caches[-1])
        nexts = torch.randint(0, vocab, (2 * W, 1), generator=gen)

        def step(rows: list[int], width: int) -> torch.Tensor:  # (len(rows), V)
            ids = torch.zeros(width, 1, dtype=torch.long)  # (width, 1), filler after the rows
            ids[:len(rows)] = nexts[rows]
            logits = model.next_token_logits(ids.to(self.device),
                                             copy.deepcopy([caches[r] for r in rows]))
            return logits[:len(rows)]

        full = step(list(range(W)), W)
        others = step([0, *range(W + 1, 2 * W)], W)  # row 0 beside other neighbours
        moved = step([*range(W + 1, 2 * W), 0], W)  # row 0's sequence in the last row
        if not (torch.equal(full[:1], others[:1]) and torch.equal(full[:1], moved[-1:])):
            return W, False
        if not self._narrow_steps_trusted():
            return W, True
        width = W
        while width > 1 and torch.equal(step(list(range(width - 1)), width - 1),
                                        full[:width - 1]):
            width -= 1
        return width, True

    def _narrow_steps_trusted(self) -> bool:
        """Whether a step narrower than max_seqs may be trusted on the probe's word. Not for
        bf16 weights on a CPU without native bf16 (no AMX, no AVX512-BF16): oneDNN then
        emulates bf16, and a one-row product takes another kernel whose sums differ from the
        many-row one's for rare inputs only (measured on such a machine: 1 of 300 random rows
        in the last bits, so the probe's few rows passed while a real sequence drifted)."""
        bf16 = any(p.dtype == torch.bfloat16 for p in self.model.parameters())
        return not (bf16 and self.device.type == "cpu" and not cpu_has_bf16())

    @torch.inference_mode()
    def _step(self, seqs: list[Sequence]) -> None:
        """One new token for each running sequence, linear layers on max(len(seqs),
        width_from) rows (on as many rows as sequences when not `exact`): each live row against
        its own cache, the rows after them filler (token 0)."""
        W = max(len(seqs), self.width_from) if self.exact else len(seqs)
        ids = torch.zeros(W, 1, dtype=torch.long, device=self.device)  # (W, 1)
        ids[:len(seqs), 0] = torch.tensor([seq.last_token for seq in seqs])
        caches = [seq.cache for seq in seqs if seq.cache is not None]
        if len(caches) != len(seqs):
            raise RuntimeError("a running sequence has no cache")
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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; a no-op elsewhere).

    Every sequence's KV cache is allocated at its prefill and freed when it ends. glibc
    serves such blocks from its heaps once a block of that size has been freed (its mmap
    threshold rises to it), and keeps the freed pages, so a server's resident memory creeps up
    from one burst of requests to the next. Doing this when the engine goes idle keeps it
    flat. There is no garbage collection here: the engine drops every cache the moment its
    sequence ends, is cancelled or fails, and a full collection would hold the interpreter
    lock for as long as it takes to walk every object (hundreds of milliseconds in a large
    process), stalling the server's event loop."""
    trim = _malloc_trim()
    if trim is not None:  # ctypes lets go of the interpreter lock during the call
        trim(0)


def wait_idle(engine: Engine, timeout: float = 5.0) -> bool:
    """Whether the engine has nothing running or waiting within `timeout` seconds (tests)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not engine.running and not engine.waiting:
            return True
        time.sleep(0.01)
    return False
