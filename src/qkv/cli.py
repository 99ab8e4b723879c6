"""The `qkv` command. Each subcommand lives in its own module under `qkv/commands/`.

A subcommand module defines `ORDER` (its place in `qkv --help`) and `register(subparsers)`, which
adds its parser and sets `func(args) -> int`. Shared argument types live in `commands/_args.py`.
User mistakes (a bad flag, or any QkvError) print one line and exit with status 2; so do the
filesystem's refusals (no space, no permission, a file where a folder should be), turned into a
sentence here, in one place. Ctrl-C exits with 130; a closed stdout (`qkv generate ... | head`)
ends the command quietly, as Unix tools do.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import sys

from . import commands
from ._version import __version__
from .commands._args import one_line_errors
from .errors import QkvError
from .hardware import small_kernel_cache
from .io import os_error_sentence

EPILOG = """examples:
  qkv train                                   train a small GPT on Shakespeare, then sample
  qkv generate runs/gpt --prompt "ROMEO:"     continue a prompt
  qkv info runs/gpt                           what a model directory holds

Run `qkv COMMAND --help` for the options of each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkv",
        description="qkv: the Transformer from first principles, on PyTorch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [importlib.import_module(f"{commands.__name__}.{m.name}")
               for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    for module in sorted(modules, key=lambda m: getattr(m, "ORDER", 100)):
        module.register(sub)
    one_line_errors(parser)  # every parser: one line and exit status 2
    return parser


def main(argv: list[str] | None = None) -> int:
    small_kernel_cache()  # before any matrix product: oneDNN reads it once
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except QkvError as e:
        print(f"qkv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nqkv {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_stdout()
    except OSError as e:
        if e.errno == errno.EPIPE:
            return _closed_stdout()
        print(f"qkv {args.command}: error: {os_error_sentence(e, action='using')}",
              file=sys.stderr)
        return 2
    except MemoryError:
        print(f"qkv {args.command}: error: out of memory; try a smaller model, batch or "
              "context", file=sys.stderr)
        return 2


def _closed_stdout() -> int:
    """The reader of our stdout went away (`| head`): stop quietly, as Unix tools do, and keep
    Python from complaining about the unflushed buffer at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE: what a shell reports for a Unix tool killed by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
