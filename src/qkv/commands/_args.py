"""Argument types and habits every subcommand shares.

- a bad value prints one line ("qkv train: error: ...") and exits with status 2, like every
  other user mistake (cli.py installs `one_line_errors` on every parser);
- --time-limit reads the same everywhere: "90" or "90s", "5m", "1.5h", "1h30m";
- --device and --top-k are checked the same way wherever they appear;
- every number is finite and in its range before anything is allocated: non_negative_float
  (--weight-decay, --grad-clip), fraction (--top-p, --val-fraction, --dropout), seed (0 to
  2**64 - 1).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import NoReturn

from ..config import check_seed
from ..errors import ConfigError
from ..hardware import check_device_name

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
_NUMBER = r"(\d+(\.\d*)?|\.\d+)"


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "5m", "1.5h", "1h30m" (positive and finite)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    clean = text.strip().lower()
    if not clean or re.fullmatch(rf"({_NUMBER}([smhd]?))+", clean) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 5m or 1h30m")
    seconds = sum(float(number) * units[unit or "s"]
                  for number, _, unit in re.findall(rf"{_NUMBER}([smhd]?)", clean))
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite duration")
    return seconds


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _finite(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be negative")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def seed(text: str) -> int:
    """A random seed: a whole number from 0 to 2**64 - 1 (what torch's generators take)."""
    try:
        return check_seed(_whole(text))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device(text: str) -> str:
    """A device name: auto, cpu, cuda, cuda:N or mps (whether it exists is checked later)."""
    try:
        return check_device_name(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """--lora-rank, --lora-alpha, --lora-targets (qkv.lora), the same wherever LoRA applies:
    `qkv finetune classify`, `qkv finetune sft` and translation training (`qkv train --init`).
    A parser whose flags default to argparse.SUPPRESS (`qkv train`, which passes on only the
    flags given) gets no default target list: the settings hold it."""
    g = parser.add_argument_group("LoRA (train small low-rank updates instead of every weight)")
    g.add_argument("--lora-rank", type=positive_int, metavar="R",
                   help="rank of the LoRA updates; without it every weight is trained")
    g.add_argument("--lora-alpha", type=positive_float, metavar="A",
                   help="the updates are scaled by A / R (default 2 R)")
    g.add_argument("--lora-targets", metavar="LIST",
                   default=parser.argument_default if parser.argument_default == argparse.SUPPRESS
                   else "q,v", help="layers to adapt: q,k,v,o,up,down,gate or attn, ffn, all "
                   "(default q,v)")


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make `parser` and every sub-parser below it print argparse's errors as one line
    ("qkv train: error: ...") and exit with status 2, instead of the usage block."""

    def error(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                one_line_errors(child)
