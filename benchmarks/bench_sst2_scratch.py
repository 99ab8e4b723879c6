"""The whole encoder path from nothing: masked-LM pre-training, then SST-2 fine-tuning, reported
next to the same model fine-tuned from random weights (the control).

    python benchmarks/bench_sst2_scratch.py                       # ~12 minutes on a 2-core CPU
    python benchmarks/bench_sst2_scratch.py --pretrain-time 20m --corpus shakespeare
    python benchmarks/bench_sst2_scratch.py --quick               # a smoke run

Steps (all through qkv's public functions, as `qkv train` / `qkv finetune classify` run them):
1. pre-train bert-tiny (4 layers, d=256, WordPiece 8,000) with masked-LM for --pretrain-time on
   --corpus: "shakespeare" (the bundled tiny Shakespeare), "sst2" (the SST-2 training sentences
   *without their labels*, i.e. in-domain unlabelled text), or "both" (default);
2. fine-tune it on --train-examples labelled SST-2 sentences for --epochs, evaluate on the 872
   dev sentences;
3. the control: an identical model with random weights (same tokenizer) fine-tuned the same way.

The difference between 2 and 3 is what pre-training bought. A collapse check is printed too:
the spread of the encoder's token vectors across positions (0 means every token came out as
the same vector, as it did when this recipe used the decoder's learning rate, 2e-3).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import BUNDLED, DATA, threads

import qkv
from qkv.commands._args import parse_duration
from qkv.data import read_labelled
from qkv.tasks.classify import ClassifySettings, finetune_classifier
from qkv.train import TrainConfig, train

SST2 = DATA / "sst2"


def write_corpus(kind: str, folder: Path) -> Path:
    """The pre-training text as a folder of .txt files."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind in ("shakespeare", "both"):
        (folder / "tiny_shakespeare.txt").write_text(BUNDLED.read_text(encoding="utf-8"),
                                                      encoding="utf-8")
    if kind in ("sst2", "both"):  # the sentences only: no label is seen before fine-tuning
        texts = read_labelled(SST2 / "train.tsv").texts
        (folder / "sst2_train_sentences.txt").write_text("\n".join(texts) + "\n",
                                                          encoding="utf-8")
    return folder


def token_spread(model: qkv.Transformer, tokenizer: qkv.Tokenizer) -> float:
    """Mean over dimensions of the std of token vectors across positions (0 = collapsed)."""
    texts = read_labelled(SST2 / "dev.tsv").texts[:64]
    with torch.inference_mode():  # one text at a time: no padding to mask out
        h = torch.cat([model.eval().encode(torch.tensor([ids]))[0]  # (T, d)
                       for ids in tokenizer.encode_batch(texts)["input_ids"]])
    return h.std(dim=0).mean().item()  # h: (real tokens, d)


def finetune(model, tokenizer, args) -> dict:
    settings = ClassifySettings(epochs=args.epochs, lr=args.lr, max_length=64,
                                max_train_examples=args.train_examples,
                                label_names=["negative", "positive"], progress=False)
    result = finetune_classifier(model, tokenizer, read_labelled(SST2 / "train.tsv"),
                                 read_labelled(SST2 / "dev.tsv"), settings)
    return {"dev_accuracy": round(result.best_accuracy, 4),
            "dev_macro_f1": round(result.best_macro_f1, 4),
            "train_examples": result.train_examples, "epochs": result.epochs,
            "seconds": round(result.wall_s, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 20 s of pre-training, 500 fine-tuning sentences (about a "
                   "minute); the accuracies mean little")
    p.add_argument("--corpus", choices=("shakespeare", "sst2", "both"), default="both")
    p.add_argument("--pretrain-time", default="6m", help="masked-LM pre-training time (6m)")
    p.add_argument("--train-examples", type=int, default=20000,
                   help="labelled SST-2 sentences for fine-tuning (20000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.quick:
        args.pretrain_time, args.train_examples, args.epochs = "20s", 500, 1
    threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(args.corpus, Path(tmp) / "corpus")
        t0 = time.perf_counter()
        run = train(TrainConfig(family="encoder", data=str(corpus), out=str(Path(tmp) / "bert"),
                                time_limit=parse_duration(args.pretrain_time), max_steps=None,
                                progress=False))
        pretrain_s = time.perf_counter() - t0
        pretrained, tokenizer = qkv.load(Path(tmp) / "bert")  # the best checkpoint
    report = {"corpus": args.corpus, "pretrain_updates": run.step,
              "pretrain_seconds": round(pretrain_s), "mlm_val_loss": round(run.best_val_loss, 4),
              "token_spread_pretrained": round(token_spread(pretrained, tokenizer), 3)}
    torch.manual_seed(0)
    control = qkv.Transformer(pretrained.config)
    report["token_spread_random"] = round(token_spread(control, tokenizer), 3)
    report["pretrained"] = finetune(pretrained, tokenizer, args)
    report["random_init"] = finetune(control, tokenizer, args)

    a, b = report["pretrained"]["dev_accuracy"], report["random_init"]["dev_accuracy"]
    print(f"MLM pre-training on {args.corpus}: {run.step} updates in {pretrain_s:.0f} s, "
          f"val loss {run.best_val_loss:.3f}; token spread {report['token_spread_pretrained']}")
    print(f"SST-2 dev accuracy after fine-tuning on {args.train_examples:,} sentences, "
          f"{args.epochs} epoch(s): pre-trained {100 * a:.2f}%, random init {100 * b:.2f}%, "
          f"difference {100 * (a - b):+.2f} points")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
