"""qkv train: train a GPT on a text file (or the bundled Shakespeare), then print a sample;
or with --family encoder, pre-train a BERT by masked language modelling, then fill in a mask."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from ..data import corpus_files
from ..errors import InputError
from ..generate import generate
from ..tasks.mlm import fill_mask, masked_lm_objective
from ..tasks.translate import TRANSLATION_ONE_PROCESS
from ..train import TrainConfig, distributed, next_token_objective, train
from ..train.checkpoint import find_training_checkpoint, read_state
from ._args import (
    device,
    fraction,
    non_negative_float,
    parse_duration,
    positive_float,
    positive_int,
    seed,
)
from .translate import add_training_flags, run_training

#: The settings of a language-model run (the other flags belong to translation).
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}

ORDER = 10

EPILOG = """examples:
  qkv train                                   a small char GPT on tiny Shakespeare (~4 min)
  qkv train --data my.txt --out runs/mine     your own text (a file or a folder of files)
  qkv train --data books/ --tokenizer bpe --vocab-size 4096 --time-limit 30m
  qkv train --preset gpt-char-tiny --max-steps 500 --precision fp32
  qkv train --out runs/mine --resume          continue an interrupted run exactly
  qkv train --family encoder --data my.txt --out runs/bert   a masked-LM BERT (bert-tiny)
  qkv train --nproc 2 --out runs/ddp          2 processes (torchrun, DDP); same result as 1
  torchrun --nproc_per_node=8 -m qkv train --fsdp ...   8 GPUs, the model sharded (FSDP2)
  qkv train --family encoder-decoder --data multi30k/ --src de --tgt en --out runs/de-en
  qkv train --family rnn --data multi30k/ --src de --tgt en    GRU + Bahdanau attention

Ctrl-C saves a checkpoint and prints the command that resumes it."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a GPT on your text, then print a sample",
        description=(
            "Train a decoder-only (GPT) language model on a UTF-8 text file or folder.\n"
            "With no arguments it trains the gpt-char-small preset on the bundled tiny\n"
            "Shakespeare. The run directory receives the best model (load it with qkv.load\n"
            "or `qkv generate`), log.jsonl, and training/ (the state --resume continues from).\n"
            "--family encoder pre-trains a BERT-style encoder by masked language modelling\n"
            "instead (default preset bert-tiny, wordpiece tokenizer)."),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only the flags given appear in args
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="PATH",
                      help="UTF-8 text file or folder of files (default: tiny Shakespeare)")
    data.add_argument("--tokenizer", choices=("char", "bpe", "wordpiece"),
                      help="char (default): one token per character; bpe: byte-level BPE; "
                      "wordpiece (default of an encoder): BERT's, with a [MASK] token")
    data.add_argument("--vocab-size", type=positive_int, metavar="N",
                      help="vocabulary size of a bpe or wordpiece tokenizer (default 8000)")
    data.add_argument("--val-fraction", type=fraction, metavar="F",
                      help="fraction held out for validation (default 0.1, the end of the text)")
    data.add_argument("--cache-dir", metavar="DIR",
                      help="where token ids are cached (default: .qkv-cache next to --out)")
    model = p.add_argument_group("model")
    model.add_argument("--family", choices=("decoder", "encoder", "encoder-decoder", "rnn"),
                       help="decoder (default): next-token prediction (GPT); encoder: masked "
                       "language modelling (BERT); encoder-decoder: translation (the paper's "
                       "Transformer); rnn: translation with an LSTM/GRU baseline")
    model.add_argument("--preset", metavar="NAME",
                       help="model preset (default gpt-char-small, or bert-tiny for an encoder; "
                       "see qkv.presets.names())")
    model.add_argument("--n-layers", type=positive_int, metavar="N")
    model.add_argument("--d-model", type=positive_int, metavar="N")
    model.add_argument("--n-heads", type=positive_int, metavar="N")
    model.add_argument("--context", type=positive_int, metavar="N",
                       help="context length in tokens (the model's max_seq_len)")
    model.add_argument("--dropout", type=fraction, metavar="P")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max-steps", type=positive_int, metavar="N",
                     help="number of updates (default 500)")
    opt.add_argument("--time-limit", type=parse_duration, metavar="TIME",
                     help="stop after this long, e.g. 90s, 5m, 1h; alone, the learning-rate "
                     "schedule is fitted to the time")
    opt.add_argument("--batch-size", type=positive_int, metavar="N")
    opt.add_argument("--grad-accum", type=positive_int, metavar="N",
                     help="micro-batches per update (gradient accumulation)")
    opt.add_argument("--lr", type=positive_float, metavar="LR",
                     help="peak learning rate (default 2e-3 for a decoder, 1e-3 for an encoder)")
    opt.add_argument("--min-lr", type=non_negative_float, metavar="LR",
                     help="final learning rate of the cosine decay (default lr/10)")
    opt.add_argument("--warmup-steps", type=int, metavar="N",
                     help="updates of linear warm-up (default 50 for a decoder, 150 for an "
                     "encoder)")
    opt.add_argument("--weight-decay", type=non_negative_float, metavar="W")
    opt.add_argument("--grad-clip", type=non_negative_float, metavar="C",
                     help="0 turns clipping off")
    run_ = p.add_argument_group("run")
    run_.add_argument("--out", metavar="DIR", help="run directory (default runs/<preset>)")
    run_.add_argument("--resume", action="store_true",
                      help="continue the run in --out from its last checkpoint")
    run_.add_argument("--overwrite", action="store_true",
                      help="start afresh in an --out that already holds a run")
    run_.add_argument("--device", type=device, metavar="DEVICE",
                      help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    run_.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                      help="auto (default): bf16 where the hardware has it, else fp32")
    run_.add_argument("--compile", action="store_true", help="use torch.compile")
    run_.add_argument("--nproc", type=positive_int, metavar="N",
                      help="train with N processes on this machine (runs torchrun; "
                      "--batch-size stays the global batch; docs/distributed.md)")
    run_.add_argument("--fsdp", action="store_true",
                      help="under torchrun: shard the model over the processes (FSDP2) "
                      "instead of copying it to each (DDP)")
    run_.add_argument("--seed", type=seed)
    run_.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads")
    run_.add_argument("--eval-every", type=positive_int, metavar="N")
    run_.add_argument("--eval-windows", type=positive_int, metavar="N",
                      help="validation windows per evaluation (default 500)")
    run_.add_argument("--log-every", type=positive_int, metavar="N")
    run_.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_.add_argument("--sample-tokens", type=int, metavar="N",
                      help="tokens of the sample printed at the end (default 300; 0: none)")
    run_.add_argument("--prompt", help="prompt of that sample (default: a new line)")
    add_training_flags(p)  # translation: commands/translate.py
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    nproc = getattr(args, "nproc", 1)
    if nproc > 1 and getattr(args, "family", None) in ("encoder-decoder", "rnn"):
        raise InputError(TRANSLATION_ONE_PROCESS)
    if nproc > 1 and not distributed.launched():
        return distributed.relaunch(nproc, distributed.strip_option(sys.argv[1:], "--nproc"))
    status = _run(args)
    distributed.finish()  # (after an error the process ends, and with it the group)
    return status


def _run(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "nproc")}
    resume = given.pop("resume", False)
    overwrite = given.pop("overwrite", False)
    progress = not given.pop("no_progress", False)
    sample_tokens = given.pop("sample_tokens", 300)
    if given.get("family") in ("encoder-decoder", "rnn"):  # translation: commands/translate.py
        return run_training(given, resume, overwrite, progress)
    prompt = given.pop("prompt", "\n")
    foreign = [k for k in given if k not in TRAIN_FIELDS]
    if foreign:  # a flag of the translation group (commands/translate.py)
        raise InputError(f"--{foreign[0].replace('_', '-')} applies to translation training "
                         "(--family encoder-decoder or rnn)"
                         + ("; a decoder is fine-tuned with LoRA by `qkv finetune sft "
                            "--lora-rank`" if foreign[0].startswith("lora") else ""))
    if "time_limit" in given and "max_steps" not in given:
        given["max_steps"] = None  # fit the schedule to the time
    if resume:  # start from the run's own settings; flags given now override them
        base = TrainConfig(**{k: v for k, v in given.items()
                              if k in ("out", "preset", "family")})
        folder = find_training_checkpoint(Path(base.out_dir))
        saved = read_state(folder)["config"] if folder is not None else {}
        cfg = TrainConfig.from_dict({**saved, **given, "progress": progress})
    else:
        cfg = TrainConfig(**given, progress=progress)

    objective = masked_lm_objective if cfg.family == "encoder" else next_token_objective
    result = train(cfg, resume=resume, overwrite=overwrite, objective=objective)
    out = shlex.quote(str(result.out))
    if not distributed.is_main():  # rank 0 reports for all
        return 0 if result.stopped_by not in ("SIGINT", "SIGTERM") else 143
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        print(f"qkv train: stopped at step {result.step}; resume with:\n"
              f"  qkv train --out {out} --resume", file=sys.stderr)
        return 130 if result.stopped_by == "SIGINT" else 143
    if result.best_val_loss is not None:
        print(f"best val loss {result.best_val_loss:.4f} after {result.step} steps "
              f"({result.elapsed:.0f} s); model in {result.out}")
    if cfg.family == "encoder":
        if sample_tokens > 0:
            _print_fill_mask(result, cfg)
        print(f"next: qkv fill-mask {out} \"The [MASK] of the story.\"")
        return 0
    if sample_tokens > 0:
        print("--- sample ---")
        result.model.eval()
        text = generate(result.model, result.tokenizer, prompt, max_new_tokens=sample_tokens,
                        temperature=0.8, seed=cfg.seed,
                        stream=lambda piece: print(piece, end="", flush=True))
        if not str(text).endswith("\n"):
            print()
        print("---")
    print(f"next: qkv generate {out} --prompt \"ROMEO:\"")
    return 0


def _print_fill_mask(result, cfg) -> None:
    """A fill-mask example: a line of the held-out end of the text with one word masked."""

    with open(corpus_files(cfg.data)[-1], "rb") as f:  # the last few kilobytes only
        f.seek(max(0, f.seek(0, 2) - 8192))
        tail = f.read().decode("utf-8", errors="ignore")
    words = next((line.split() for line in tail.splitlines()[1:] if 5 <= len(line.split()) <= 12),
                 None)
    if words is None:
        return
    words[len(words) // 2] = "[MASK]"
    text = " ".join(words)
    print(f"--- fill-mask: {text} ---")
    result.model.eval()
    for guess in fill_mask(result.model, result.tokenizer, text, top_k=5)[0]:
        print(f"  {guess['score']:.4f}  {guess['token_str']}")
    print("---")
