"""Plot the loss curves of a training run: python benchmarks/plot_loss.py runs/X/log.jsonl out.png

Training loss (one point per log line) and validation loss (one point per evaluation) against
the number of updates, on a second axis against wall-clock minutes. Needs matplotlib
(`pip install qkv[plot]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read(path: Path) -> list[dict]:
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        sys.exit(f"plot_loss: {path} does not exist")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log", type=Path, help="a log.jsonl (or its run directory)")
    parser.add_argument("out", type=Path, help="the image to write (.png, .svg, ...)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--target", type=float, default=None,
                        help="draw a horizontal line at this loss")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_loss: matplotlib is needed: pip install matplotlib")

    records = read(args.log)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"], r["elapsed"]) for r in records if "val_loss" in r]
    if not train:
        sys.exit(f"plot_loss: {args.log} has no training records")

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(*zip(*train, strict=True), label="train loss", color="#4C72B0", linewidth=1.2)
    if val:
        steps, losses, _ = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", label="validation loss", color="#DD8452", markersize=4)
        best = min(val, key=lambda v: v[1])
        ax.annotate(f"{best[1]:.3f} at {best[2] / 60:.1f} min", (best[0], best[1]),
                    textcoords="offset points", xytext=(-60, 12), fontsize=9)
    if args.target is not None:
        ax.axhline(args.target, color="gray", linestyle="--", linewidth=0.8,
                   label=f"target {args.target}")
    ax.set_xlabel("update (step)")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(args.title or f"qkv training: {args.log}")
    ax.grid(alpha=0.3)
    ax.legend()
    last = records[-1]
    if last.get("elapsed") and last.get("step"):  # a second x axis in minutes
        per_step = last["elapsed"] / last["step"] / 60
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step,
                                                   lambda m: m / per_step))
        top.set_xlabel("wall-clock minutes (average pace)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
