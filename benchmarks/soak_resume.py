"""Kill-and-resume soak: SIGKILL a training run at random moments, resume it, and check that
nothing was lost.

    python benchmarks/soak_resume.py --quick            # 20 kills of a tiny run (a few minutes)
    python benchmarks/soak_resume.py --kills 100 --steps 400

1. An uninterrupted reference run: `qkv train` of a tiny GPT on the bundled Shakespeare.
2. The same run in another directory, killed with SIGKILL (no chance to save anything) at a
   random moment, again and again; after every kill the run directory is checked: its config,
   its log, the checkpoint it would resume from (state.json, weights, optimizer), the best
   model. A directory that fails any check counts as corrupt. The next start resumes
   (`--resume`), or starts over when the kill came before the first checkpoint.
3. After the last kill the run is left to finish. Its per-step training losses and its
   validation losses are compared with the reference's: resume is exact, so they must be
   equal, to the last digit written to log.jsonl.

Prints one JSON line of figures (kills, corrupt directories, resumes, steps lost to kills,
whether the losses match). Exit status 1 if any directory was corrupt or a loss differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import qkv  # noqa: E402
from qkv.checkpoint import WEIGHTS, load_weights  # noqa: E402
from qkv.data import BUNDLED  # noqa: E402
from qkv.train import read_log  # noqa: E402
from qkv.train.checkpoint import (  # noqa: E402
    find_training_checkpoint,
    read_optimizer,
    read_state,
)


def train_command(out: Path, data: Path, cache: Path, steps: int, eval_every: int,
                  extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "qkv.cli", "train", "--data", str(data), "--out", str(out),
            "--cache-dir", str(cache), "--preset", "gpt-char-tiny", "--n-layers", "2",
            "--d-model", "64", "--n-heads", "4", "--context", "64", "--batch-size", "8",
            "--max-steps", str(steps), "--eval-every", str(eval_every), "--log-every", "1",
            "--eval-windows", "16", "--threads", "1", "--seed", "7", "--no-progress",
            "--sample-tokens", "0", *extra]


def environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def check_directory(out: Path) -> str | None:
    """None if the run directory is sound (as far as resume and load go), else what is wrong."""
    try:
        folder = find_training_checkpoint(out)
        if (out / "log.jsonl").exists():
            read_log(out)
        if folder is None:  # killed before the first checkpoint: nothing to resume, fine
            return None
        read_state(folder)
        read_optimizer(folder)
        model, _ = qkv.load(out)  # the best model, with config.json and tokenizer.json
        load_weights(model, folder / WEIGHTS)  # the latest weights, to resume from
    except qkv.QkvError as e:
        return str(e)
    except Exception as e:  # anything else is corruption qkv did not even recognise
        return f"{type(e).__name__}: {e}"
    return None


def losses(out: Path) -> dict[int, tuple[Any, Any]]:
    return {r["step"]: (r["train_loss"], r.get("val_loss")) for r in read_log(out)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 kills of a 120-step run")
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.quick:
        args.kills, args.steps = 20, 120
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="qkv-soak-"))
    data, cache = work / "tiny.txt", work / "cache"
    data.write_text(BUNDLED.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    env = environment()

    t0 = time.perf_counter()
    reference = work / "reference"
    subprocess.run(train_command(reference, data, cache, args.steps, args.eval_every, []),
                   env=env, check=True, capture_output=True)
    full_s = time.perf_counter() - t0
    print(f"reference run: {args.steps} steps in {full_s:.1f} s", file=sys.stderr)

    out = work / "soak"
    kills = corrupt = resumes = restarts = 0
    problems: list[str] = []
    steps_redone = 0
    while True:
        folder = find_training_checkpoint(out)
        extra = ["--resume"] if folder is not None else ["--overwrite"]
        resumes += folder is not None
        restarts += folder is None
        start_step = read_state(folder)["step"] if folder is not None else 0
        process = subprocess.Popen(train_command(out, data, cache, args.steps, args.eval_every,
                                                 extra), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        if kills >= args.kills:  # enough: let it finish
            _, err = process.communicate()
            if process.returncode != 0:
                problems.append(f"the last run failed: {err.decode()[-300:]}")
            break
        try:
            process.wait(timeout=rng.uniform(0.2, full_s))
            finished = True  # it finished before the kill came: start over from scratch
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            finished = False
            kills += 1
        if process.stderr is not None:
            process.stderr.close()
        problem = check_directory(out)
        if problem is not None:
            corrupt += 1
            problems.append(problem)
            shutil.rmtree(out, ignore_errors=True)
        if finished:
            shutil.rmtree(out, ignore_errors=True)
        else:
            reached = max(losses(out)) if (out / "log.jsonl").exists() and losses(out) else 0
            now = find_training_checkpoint(out)
            saved = read_state(now)["step"] if now is not None else 0
            steps_redone += max(0, reached - max(saved, start_step))

    want, got = losses(reference), losses(out)
    same = want == got
    figures = {"kills": kills, "corrupt_directories": corrupt, "resumes": resumes,
               "fresh_starts": restarts, "steps": args.steps, "eval_every": args.eval_every,
               "steps_redone_after_kills": steps_redone, "log_records_compared": len(want),
               "losses_identical": same,
               "final_train_loss": got.get(args.steps, (None, None))[0],
               "final_val_loss": got.get(args.steps, (None, None))[1],
               "reference_final_val_loss": want.get(args.steps, (None, None))[1],
               "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(figures))
    for problem in problems[:5]:
        print(f"problem: {problem}", file=sys.stderr)
    if not same:
        differ = [s for s in sorted(set(want) | set(got)) if want.get(s) != got.get(s)][:5]
        print(f"losses differ at steps {differ}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work directory: {work}", file=sys.stderr)
    return 0 if corrupt == 0 and same and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
