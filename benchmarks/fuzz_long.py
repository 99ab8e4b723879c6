"""The long profile of the fuzz suite: tests/test_fuzz_*.py with many more generated inputs.

    python benchmarks/fuzz_long.py              # "long" profile: 2000 inputs per property
    python benchmarks/fuzz_long.py --examples 200000 -k index

CI runs the same properties with the bounded "ci" profile (tests/conftest.py). Every failure
Hypothesis finds is printed with the smallest input that shows it; add that input as a plain
test next to the property once it is fixed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=None,
                        help="inputs per property (default: the long profile's 2000)")
    parser.add_argument("-k", default=None, help="only the properties matching this pytest -k")
    args = parser.parse_args()
    env = {**os.environ, "QKV_FUZZ_PROFILE": "long",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                       os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
               *sorted(str(p) for p in (ROOT / "tests").glob("test_fuzz_*.py"))]
    if args.examples is not None:
        env["QKV_FUZZ_EXAMPLES"] = str(args.examples)
    if args.k:
        command += ["-k", args.k]
    return subprocess.call(command, env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
