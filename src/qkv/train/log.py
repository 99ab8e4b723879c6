"""What a training run tells the person watching it, and what it leaves for later.

    log.jsonl      one JSON object per line: step, training loss, learning rate, speed, and at
                   every evaluation the metrics (read_log reads it back)
    progress bar   step, loss, throughput, learning rate and the time left (tqdm, on stderr)
    StopRequest    Ctrl-C (SIGINT) and SIGTERM become a request the loop sees after its step
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

LOG = "log.jsonl"


def append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to `step`: a resumed run rewrites what came after. A line that is
    not a JSON record (the half-written last line of a killed run) is dropped, with a warning."""
    if not path.is_file():
        return
    records = _records(path, warn=True)
    kept = [line for line, record in records if record.get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a log.jsonl (a run directory or the file itself). A damaged line (the
    half-written last line of a killed run) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG
    return [record for _, record in _records(path, warn=False)]


def _records(path: Path, warn: bool) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every readable line of a log."""
    out = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        steps = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(steps, int) or isinstance(steps, bool):
            if warn:
                print(f"qkv: warning: {path}, line {n}, is not a log record (a write cut short?); "
                      "dropped", file=sys.stderr)
            continue
        out.append((line, record))
    return out


def printer(enabled: bool, name: str = "train") -> Callable[..., None]:
    """Progress messages "qkv NAME: ..." on stderr (only with `enabled`); warnings always."""

    def say(message: str, warning: bool = False) -> None:
        if enabled or warning:
            print(f"qkv {name}: {message}", file=sys.stderr)
    return say


class StopRequest:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a request the loop sees after its current step.

    A second Ctrl-C gives up waiting and raises KeyboardInterrupt at once.
    """

    def __init__(self, name: str = "train") -> None:
        self.signal: str | None = None
        self.name = name
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\nqkv {self.name}: {self.signal} received: saving a checkpoint after this step "
              "(press Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ProgressBar:
    """A tqdm bar showing step, loss, throughput, learning rate and the time left (or nothing)."""

    def __init__(self, enabled: bool, step: int, max_steps: int | None, desc: str = "training",
                 unit: str = "tok"):
        self.bar: Any = None
        self.unit = unit
        if enabled:
            self.bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True,
                            desc=desc, file=sys.stderr)

    def update(self, step: int, loss: float, per_s: float, lr: float, total: int | None) -> None:
        """A log line's figures, and the bar moved to `step`."""
        if self.bar is None:
            return
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.set_postfix_str(f"loss {loss:.3f}, {per_s:,.0f} {self.unit}/s, lr {lr:.2e}",
                                 refresh=False)
        self.advance_to(step)

    def advance_to(self, step: int) -> None:
        """Move the bar to `step` between log lines: it costs no loss read, so it runs every
        update and the bar moves even when log lines are rare."""
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
