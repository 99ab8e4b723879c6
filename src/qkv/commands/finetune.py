"""qkv finetune classify: train a text classifier on top of a pretrained model."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from ..hardware import resolve_device
from ..tasks.classify import ClassifySettings, finetune_classify_files
from ..tasks.sft import SFTSettings, finetune_sft_files
from ..train import distributed
from ._args import (
    add_lora_arguments,
    device,
    fraction,
    non_negative_float,
    parse_duration,
    positive_float,
    positive_int,
    seed,
)

ORDER = 40

CLASSIFY_EPILOG = """examples:
  qkv finetune classify --model all-MiniLM-L6-v2 --train benchmarks/data/sst2/train.tsv \\
      --dev benchmarks/data/sst2/dev.tsv --label-names negative,positive --out runs/sst2
  qkv finetune classify --model runs/gpt --train reviews.jsonl --text-column review \\
      --label-column stars --epochs 5 --out runs/stars

Files: .tsv (GLUE style, no quoting), .csv or .jsonl, with a header row (.tsv/.csv). The class
names are the distinct labels, sorted (numerically if they are all integers); --label-names
renames them in that order. The best model on the dev set is saved to --out. Ctrl-C saves a
checkpoint; the same command with --resume continues exactly."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model for a task (classify, sft)",
        description="Fine-tune a pretrained model for a task.",
    )
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    c = tasks.add_parser(
        "classify",
        help="text classification (sentiment, topic, ...) from labelled text",
        description="Add a classification head to an encoder (or a decoder, pooled at its last "
        "token) and fine-tune the whole model on labelled text. Evaluates accuracy and macro-F1 "
        "on the dev set every epoch and keeps the best model.",
        epilog=CLASSIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--model", required=True,
                   help="model directory or name, e.g. all-MiniLM-L6-v2")
    c.add_argument("--train", required=True, help="training file (.tsv, .csv or .jsonl)")
    c.add_argument("--dev", help="dev file for evaluation (without one: the training set)")
    c.add_argument("--out", required=True, help="directory for the best model and log.jsonl")
    c.add_argument("--text-column", default="sentence", help="column with the text "
                   "(default: sentence)")
    c.add_argument("--label-column", default="label", help="column with the label "
                   "(default: label)")
    c.add_argument("--label-names", help="comma-separated class names for the sorted labels, "
                   "e.g. negative,positive for 0,1")
    c.add_argument("--epochs", type=positive_int, default=3,
                   help="passes over the data (default 3)")
    c.add_argument("--batch-size", type=positive_int, default=32,
                   help="texts per step (default 32)")
    c.add_argument("--lr", type=positive_float, default=5e-5,
                   help="peak learning rate (default 5e-5)")
    c.add_argument("--weight-decay", type=non_negative_float, default=0.01,
                   help="AdamW weight decay")
    c.add_argument("--warmup", type=fraction, default=0.06,
                   help="fraction of steps for the linear warm-up (default 0.06)")
    c.add_argument("--max-length", type=positive_int, default=128,
                   help="tokens per text; longer texts are cut (default 128)")
    c.add_argument("--max-train-examples", type=positive_int,
                   help="train on a random subset of this many examples")
    c.add_argument("--time-limit", type=parse_duration, metavar="TIME",
                   help="stop after this long, e.g. 90s, 5m, 1h (then evaluate, keep the best)")
    c.add_argument("--eval-every", type=positive_int, help="also evaluate every N steps")
    c.add_argument("--pooling", choices=["mean", "cls", "last", "max", "pooler"],
                   help="text vector for the head (default: the model's own; last for decoders)")
    c.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast where the CPU/GPU supports it (default auto)")
    c.add_argument("--device", type=device, default="cpu", metavar="DEVICE",
                   help="auto, cpu (default), cuda, cuda:N or mps")
    c.add_argument("--compile", action="store_true", help="use torch.compile")
    c.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    c.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out exactly (repeat its other flags)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace the model already in --out (without it, that is refused)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                   help="train with N processes on this machine (runs torchrun, DDP; "
                   "--batch-size stays the global batch; docs/distributed.md)")
    add_lora_arguments(c)
    c.set_defaults(func=run_classify)
    register_sft(tasks)
    p.set_defaults(func=lambda args: _no_task(p))


SFT_EPILOG = """examples:
  qkv finetune sft --model runs/gpt --data qa.jsonl --out runs/gpt-qa
  qkv finetune sft --model gpt2-dir --data qa.jsonl --lora-rank 16 --pack --out runs/gpt2-lora
  qkv generate runs/gpt-qa --prompt $'Question: What is the capital of Brazil?\\nAnswer:' \\
      --temperature 0 --stop $'\\n'

Data: JSONL, one example per line: {"question": ..., "answer": ...},
{"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}.
Conversations are written with the model's chat template (chat_template.jinja, or the
chat_template of a Hugging Face tokenizer_config.json), else with qkv's default
("Question: ...\\nAnswer: ...", see docs/post-training.md). The loss is on the answers only
unless --loss-on all. Rows with a missing field or an empty answer are skipped and counted.
With --lora-rank the output is an adapter (adapter_config.json + adapter_model.safetensors,
PEFT's layout); `qkv merge` folds it into the base model."""


def register_sft(tasks: argparse._SubParsersAction) -> None:
    s = tasks.add_parser(
        "sft", help="supervised fine-tuning of a decoder on question/answer pairs",
        description="Supervised fine-tuning: teach a pretrained decoder (GPT, Llama) to answer, "
        "from question/answer pairs, prompt/completion pairs or chat conversations.",
        epilog=SFT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", required=True, help="decoder model directory (qkv or Hugging Face)")
    s.add_argument("--data", required=True, help="training examples (.jsonl)")
    s.add_argument("--dev", help="validation examples (.jsonl); default: hold out a part")
    s.add_argument("--out", required=True, help="directory for the best model and log.jsonl")
    s.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file")
    s.add_argument("--epochs", type=positive_float, default=3.0, help="passes (default 3)")
    s.add_argument("--max-steps", type=positive_int, help="updates (instead of --epochs)")
    s.add_argument("--batch-size", type=positive_int, default=8,
                   help="examples (or packed rows) per step (default 8)")
    s.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step")
    s.add_argument("--lr", type=positive_float, help="peak learning rate (default 1e-4; "
                   "1e-3 with LoRA)")
    s.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    s.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction (default 0.05)")
    s.add_argument("--max-length", type=positive_int, help="tokens per example (default: the "
                   "model's context)")
    s.add_argument("--overlong", choices=["truncate", "skip"], default="truncate",
                   help="longer examples: cut their end, or skip them (counted either way)")
    s.add_argument("--loss-on", choices=["completion", "all"], default="completion",
                   help="take the loss on the answers only (default) or on every token")
    s.add_argument("--pack", action="store_true",
                   help="pack short examples into full rows (each still sees only itself)")
    s.add_argument("--val-fraction", type=float, default=0.05,
                   help="held out without --dev (default 0.05)")
    s.add_argument("--eval-every", type=positive_int, help="also evaluate every N steps")
    s.add_argument("--time-limit", type=parse_duration, metavar="TIME",
                   help="stop after this long, e.g. 90s, 5m")
    s.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    s.add_argument("--device", type=device, default="cpu", metavar="DEVICE",
                   help="auto, cpu (default), cuda, cuda:N or mps")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out exactly (repeat its other flags)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the model already in --out (without it, that is refused)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_arguments(s)
    s.set_defaults(func=run_sft)


def run_sft(args: argparse.Namespace) -> int:
    lr = args.lr if args.lr is not None else (1e-3 if args.lora_rank else 1e-4)
    settings = SFTSettings(
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=lr, weight_decay=args.weight_decay, warmup=args.warmup,
        max_length=args.max_length, overlong=args.overlong, loss_on=args.loss_on,
        packing=args.pack, val_fraction=args.val_fraction, eval_every=args.eval_every,
        time_limit=args.time_limit, precision=args.precision, seed=args.seed,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
        progress=not args.no_progress)
    result = finetune_sft_files(args.model, args.data, args.dev, args.out, settings,
                                str(resolve_device(args.device)), args.resume,
                                args.chat_template, overwrite=args.overwrite)
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        print(f"qkv finetune: stopped at step {result.steps}; resume with the same command and "
              f"--resume (--out {shlex.quote(str(result.out))})", file=sys.stderr)
        return 130 if result.stopped_by == "SIGINT" else 143
    best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
    print(f"best validation loss {best} at step {result.best_step}; "
          f"{result.train_examples} training examples ({result.skipped} skipped, "
          f"{result.truncated} truncated), {result.steps} steps, {result.wall_s:.0f} s; "
          f"saved to {result.out}")
    print(json.dumps({"best_val_loss": result.best_val_loss, "best_step": result.best_step,
                      "steps": result.steps, "train_examples": result.train_examples,
                      "eval_examples": result.eval_examples, "skipped": result.skipped,
                      "truncated": result.truncated, "trainable": result.trainable,
                      "wall_s": result.wall_s, "precision": result.precision,
                      "out": str(result.out)}))
    return 0


def _no_task(parser: argparse.ArgumentParser) -> int:
    tasks = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    names = ", ".join(tasks.choices) if tasks is not None else "a task"
    print(f"{parser.prog}: error: name a task ({names}); see `{parser.prog} --help`",
          file=sys.stderr)
    return 2


def run_classify(args: argparse.Namespace) -> int:
    if args.nproc > 1 and not distributed.launched():
        return distributed.relaunch(args.nproc, distributed.strip_option(sys.argv[1:],
                                                                         "--nproc"))
    status = _run_classify(args)
    distributed.finish()  # (after an error the process ends, and with it the group)
    return status


def _run_classify(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.label_names.split(",")] if args.label_names else None
    settings = ClassifySettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, max_length=args.max_length,
        max_train_examples=args.max_train_examples, time_limit=args.time_limit,
        precision=args.precision, eval_every=args.eval_every, pooling=args.pooling,
        label_names=names, seed=args.seed, compile=args.compile, progress=not args.no_progress,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets)
    result = finetune_classify_files(args.model, args.train, args.dev, args.out,
                                     args.text_column, args.label_column, settings,
                                     str(distributed.start(resolve_device(args.device))),
                                     resume=args.resume, overwrite=args.overwrite)
    if not distributed.is_main():  # rank 0 reports for all
        return 0 if result.stopped_by not in ("SIGINT", "SIGTERM") else 143
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        print(f"qkv finetune: stopped at step {result.steps}; resume with the same command and "
              f"--resume (--out {shlex.quote(str(result.out))})", file=sys.stderr)
        return 130 if result.stopped_by == "SIGINT" else 143
    summary = {k: v for k, v in result.summary().items() if k != "history"}
    print(f"best {result.evaluated_on} accuracy {result.best_accuracy:.4f} "
          f"(macro-F1 {result.best_macro_f1:.4f}) at step {result.best_step}; "
          f"{result.train_examples} training examples, {result.epochs} epochs, "
          f"{result.wall_s:.0f} s; saved to {result.out}")
    print(json.dumps(summary))
    return 0
