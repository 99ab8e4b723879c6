"""SST-2 sentiment: fine-tune the pretrained all-MiniLM-L6-v2 with qkv and report dev accuracy.

    python benchmarks/bench_sst2.py                      # the full run (defaults)
    python benchmarks/bench_sst2.py --max-train-examples 3000 --epochs 1   # short
    python benchmarks/bench_sst2.py --quick                             # a smoke run

The defaults are the intended full run: all 67,349 training sentences, stopped by a 30-minute
budget for training on a 2-core CPU, evaluated on the 872 dev sentences. Target: >= 88% dev
accuracy. For reference, published dev accuracies: DistilBERT 91.3, BERT-base 92.7 (both much
larger: 66M and 110M parameters against MiniLM-L6's 22M).

It prints the dev accuracy and macro-F1, the number of training examples, the epochs run, the
wall time, and the machine, then one JSON line with everything. On a machine whose cores are
busy with other jobs, pass --threads 1: two threads fighting other processes for two cores made
each step up to 10x slower in our measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from qkv.tasks.classify import ClassifySettings, finetune_classify_files

HERE = Path(__file__).resolve().parent

REFERENCES = {"DistilBERT": 91.3, "BERT-base": 92.7}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 500 training sentences, 1 epoch (about a minute); the "
                   "accuracy means little")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="model directory or name")
    p.add_argument("--data", default=str(HERE / "data" / "sst2"),
                   help="folder with train.tsv and dev.tsv")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--time-limit", type=float, default=1800.0,
                   help="seconds of fine-tuning before it stops and keeps the best (default 30 "
                   "minutes)")
    p.add_argument("--eval-every", type=int, default=500, help="evaluate every N steps too")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls", "pooler", "max"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-sst2", help="where the best model is saved")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.max_train_examples, args.epochs = args.max_train_examples or 500, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = ClassifySettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
        max_train_examples=args.max_train_examples, time_limit=args.time_limit,
        eval_every=args.eval_every, pooling=args.pooling, precision=args.precision,
        label_names=["negative", "positive"], seed=args.seed, progress=not args.no_progress)
    data = Path(args.data)
    t0 = time.perf_counter()
    result = finetune_classify_files(args.model, data / "train.tsv", data / "dev.tsv", args.out,
                                     "sentence", "label", settings, args.device)
    wall = time.perf_counter() - t0
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores visible, torch "
               f"{torch.__version__} with {torch.get_num_threads()} threads, "
               f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"SST-2 dev accuracy {100 * result.best_accuracy:.2f}% "
          f"(macro-F1 {100 * result.best_macro_f1:.2f}%) with {args.model}")
    print(f"  {result.train_examples} training examples, {result.epochs} epochs "
          f"({result.steps} steps of {args.batch_size}), best at step {result.best_step}"
          f"{', stopped by the time limit' if result.stopped_by_time_limit else ''}")
    print(f"  wall time {wall:.0f} s (fine-tuning incl. evaluations {result.wall_s:.0f} s), "
          f"precision {result.precision}; {machine}")
    print("  reference dev accuracy: " + ", ".join(f"{k} {v}" for k, v in REFERENCES.items()))
    summary = {**{k: v for k, v in result.summary().items() if k != "history"},
               "model": args.model, "wall_s_total": round(wall, 1), "machine": machine,
               "settings": vars(args)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
