"""qkv translate DIR "text": translate with a trained encoder-decoder (or a Marian checkpoint).

This module also holds what translation adds to two other commands: the training flags of
`qkv train --family encoder-decoder|rnn` and the BLEU report of `qkv eval DIR --src --ref`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..hardware import resolve_device, resolve_precision, set_threads
from ..tasks.translate import (
    TranslateSettings,
    bleu_of_files,
    decoding_defaults,
    load_translators,
    train_translation,
    translate,
)
from ..train.checkpoint import find_training_checkpoint, read_state
from ._args import add_lora_arguments, device, positive_float, positive_int

ORDER = 25


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "translate", help="translate text with an encoder-decoder (beam search)",
        description=(
            "Translate with a model directory that `qkv train --family encoder-decoder` (or\n"
            "--family rnn) wrote, or a Marian/BART checkpoint. Texts come from the command\n"
            "line, from --file (one sentence a line), or from standard input; translations\n"
            "are printed one a line, in the input order."),
        epilog="examples:\n"
        "  qkv translate runs/de-en \"Ein Mann fährt Fahrrad.\"\n"
        "  qkv translate runs/de-en --file test.de --beam 5 > test.hyp\n"
        "  echo \"Zwei Hunde spielen.\" | qkv translate runs/de-en --beam 1\n"
        "  qkv translate runs/en-de-a \"A dog runs.\" --ensemble runs/en-de-b   # two models",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="model directory")
    p.add_argument("text", nargs="*", help="sentences to translate (default: --file or stdin)")
    p.add_argument("--file", metavar="FILE", help="a UTF-8 file, one sentence a line")
    _ensemble_flag(p)
    _decoding_flags(p)
    p.set_defaults(func=run)


def _decoding_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=positive_int, metavar="K",
                   help="beam size (default: the model's, else 5; 1 = greedy)")
    p.add_argument("--length-penalty", type=float, metavar="A",
                   help="finished translations are ranked by log-prob / length^A (default 1)")
    p.add_argument("--max-length-ratio", type=positive_float, metavar="R",
                   help="at most R x the source length + 10 tokens (default 1.5)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N")
    p.add_argument("--device", type=device, default="cpu", metavar="DEVICE",
                   help="auto, cpu (default), cuda, cuda:N or mps")
    p.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp32"))


def _ensemble_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--ensemble", action="append", default=[], metavar="DIR",
                   help="decode with DIR's model too, averaging the models' next-token "
                   "probabilities (repeatable; the models must share one tokenizer; decoding "
                   "costs once per model)")


def _decoding(args: argparse.Namespace) -> dict[str, Any]:
    saved = decoding_defaults(args.dir)
    return {"beam_size": args.beam or saved.get("beam_size", 5),
            "length_penalty": (args.length_penalty if args.length_penalty is not None
                               else saved.get("length_penalty", 1.0)),
            "max_length_ratio": args.max_length_ratio or saved.get("max_length_ratio", 1.5)}


def _read_lines(path: str) -> list[str]:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path} is not UTF-8 text (line {line})") from None
    return [line.strip() for line in text.splitlines()]


def run(args: argparse.Namespace) -> int:
    if args.text and args.file:
        raise InputError("give sentences or --file, not both")
    if args.text:
        texts = list(args.text)
    elif args.file:
        texts = _read_lines(args.file)
    else:
        if sys.stdin.isatty():
            print("qkv translate: reading sentences from standard input (Ctrl-D ends)",
                  file=sys.stderr)
        texts = [line.strip() for line in sys.stdin.read().splitlines()]
    if not texts:
        raise InputError("no text to translate")
    dev = resolve_device(args.device)
    set_threads()
    model, tokenizer = load_translators([args.dir, *args.ensemble], device=dev)
    precision = resolve_precision(args.precision, dev)
    keep = [i for i, t in enumerate(texts) if t]  # empty lines stay empty
    found = translate(model, tokenizer, [texts[i] for i in keep], batch_size=args.batch_size,
                      precision=precision, **_decoding(args)) if keep else []
    out = [""] * len(texts)
    for i, text in zip(keep, found, strict=True):
        out[i] = text
    sys.stdout.write("".join(line + "\n" for line in out))
    return 0


# ---------------------------------------------------------------------- qkv eval --src --ref

def add_bleu_flags(p: argparse.ArgumentParser) -> None:
    """The flags `qkv eval` gains for translation."""
    g = p.add_argument_group("translation (BLEU)")
    g.add_argument("--src", metavar="FILE", help="source sentences, one a line: report BLEU")
    g.add_argument("--ref", metavar="FILE", help="their reference translations, line-aligned")
    g.add_argument("--hyp-out", metavar="FILE", help="also write the translations here")
    _ensemble_flag(g)
    g.add_argument("--beam", type=positive_int, metavar="K",
                   help="beam size (default: the model's, else 5)")
    g.add_argument("--length-penalty", type=float, metavar="A")
    g.add_argument("--max-length-ratio", type=positive_float, metavar="R")
    g.add_argument("--json", action="store_true", help="print the scores as one JSON line")


def run_bleu(args: argparse.Namespace) -> int:
    """qkv eval DIR --src FILE --ref FILE: sacreBLEU (cased, 13a), lowercased BLEU and chrF."""
    if not (args.src and args.ref):
        raise InputError("BLEU needs both --src and --ref")
    dev = resolve_device(args.device)
    set_threads()
    model, tokenizer = load_translators([args.dir, *args.ensemble], device=dev)
    precision = resolve_precision(args.precision, dev)
    start = time.perf_counter()
    scores, hyps = bleu_of_files(model, tokenizer, args.src, args.ref,
                                 batch_size=args.batch_size, precision=precision,
                                 **_decoding(args))
    scores["decode_s"] = round(time.perf_counter() - start, 2)
    if args.hyp_out:
        Path(args.hyp_out).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    if args.json:
        print(json.dumps(scores))
        return 0
    print(f"BLEU {scores['bleu']:.2f}  ({scores['bleu_signature']})")
    print(f"BLEU lowercased {scores['bleu_lowercase']:.2f}")
    print(f"chrF {scores['chrf']:.2f}  ({scores['chrf_signature']})")
    print(f"{scores['sentences']:,} sentences decoded in {scores['decode_s']:.1f} s")
    return 0


# ---------------------------------------------------------------------- qkv train --family ...

#: `qkv train` flags that mean the same for translation, by TranslateSettings name.
SHARED = ("data", "preset", "n_layers", "d_model", "n_heads", "context", "dropout", "max_steps",
          "time_limit", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "grad_accum",
          "device", "precision", "compile", "seed", "threads", "eval_every", "log_every",
          "vocab_size", "family")
#: What a translator given by --init fixes: a run that starts from it cannot change these.
FIXED_BY_INIT = ("preset", "n_layers", "d_model", "n_heads", "norm_placement", "dropout",
                 "vocab_size", "rnn_cell", "attention", "d_hidden", "reverse_source")
#: `qkv train` flags that a translation run does not use.
UNUSED = ("tokenizer", "val_fraction", "cache_dir", "eval_windows", "sample_tokens", "prompt",
          "batch_size")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """The flags `qkv train` gains for --family encoder-decoder and --family rnn."""
    g = p.add_argument_group("translation (--family encoder-decoder or rnn)")
    g.add_argument("--src", metavar="LANG", help="source language: the file suffix (train.de) "
                   "or TSV header column")
    g.add_argument("--tgt", metavar="LANG", help="target language")
    g.add_argument("--max-tokens", type=positive_int, metavar="N",
                   help="tokens per batch, padding included (default 4096)")
    g.add_argument("--label-smoothing", type=float, metavar="EPS", help="default 0.1")
    g.add_argument("--bpe-dropout", type=float, metavar="P",
                   help="BPE-dropout (Provilkov et al. 2020): each epoch, segment the training "
                   "pairs anew, skipping each BPE merge with probability P (0.1 in the paper; "
                   "default 0: off); validation and decoding keep the usual segmentation")
    g.add_argument("--norm-placement", choices=("pre", "post"),
                   help="layer norm before each sublayer (pre, the preset's: trains with a "
                   "short warm-up) or after the residual sum (post, as in Vaswani et al.)")
    g.add_argument("--decay", choices=("inverse_sqrt", "cosine"),
                   help="learning-rate decay after the warm-up (default inverse_sqrt)")
    g.add_argument("--average-last", type=int, metavar="K",
                   help="the final model averages the weights of the last K evaluations")
    g.add_argument("--best", choices=("loss", "bleu"),
                   help="keep the checkpoint with the lowest val loss (default) or best BLEU")
    g.add_argument("--bleu-sentences", type=int, metavar="N",
                   help="validation sentences decoded for val BLEU at each evaluation "
                   "(default 300; 0: none)")
    g.add_argument("--rnn-cell", choices=("lstm", "gru"), help="--family rnn: the cell "
                   "(default gru)")
    g.add_argument("--no-attention", dest="attention", action="store_false",
                   help="--family rnn: no attention (Sutskever et al. 2014's bottleneck)")
    g.add_argument("--reverse-source", action="store_true",
                   help="--family rnn --no-attention: read the source backwards, as "
                   "Sutskever et al. did (their LSTM gained ~5 BLEU)")
    g.add_argument("--d-hidden", type=positive_int, metavar="N", help="--family rnn: state size")
    g.add_argument("--beam", dest="beam_size", type=positive_int, metavar="K",
                   help="beam size saved as the model's decoding default (default 5)")
    g.add_argument("--init", metavar="DIR",
                   help="fine-tune this translator (a directory `qkv translate` reads) instead of "
                   "training a new one: its weights and tokenizer; with --lora-rank, only a "
                   "LoRA adapter is trained and saved")
    add_lora_arguments(p)


def run_training(given: dict[str, Any], resume: bool, overwrite: bool, progress: bool) -> int:
    """qkv train --family encoder-decoder|rnn (called by commands/train.py)."""
    unused = [k for k in UNUSED if k in given]
    if unused:
        raise InputError(f"--{unused[0].replace('_', '-')} does not apply to translation "
                         "training" + (" (use --max-tokens)" if unused[0] == "batch_size"
                                       else ""))
    if "init" in given:
        fixed = [k for k in FIXED_BY_INIT if k in given]
        if fixed:
            raise InputError(f"--{fixed[0].replace('_', '-')} does not apply with --init (the "
                             "model is that translator, as it is)")
    elif "lora_rank" in given:
        raise InputError("--lora-rank trains an update to a translator that exists: give "
                         "--init DIR")
    out = Path(given.pop("out", f"runs/{given.get('src', 'src')}-{given.get('tgt', 'tgt')}"
                         f"-{given.get('family')}"))
    if resume:
        folder = find_training_checkpoint(out)
        if folder is None:
            raise InputError(f"{out} holds no training checkpoint to resume from")
        saved = read_state(folder).get("settings", {})
        settings = TranslateSettings.from_dict({**saved, **given, "progress": progress})
    else:
        if (out / "training").exists() and not overwrite:
            raise InputError(f"{out} already holds a run: add --resume to continue it or "
                             "--overwrite to start afresh")
        if "time_limit" in given and "max_steps" not in given:
            given["max_steps"] = None  # fit the schedule to the time
        settings = TranslateSettings.from_dict({**given, "progress": progress})
    result = train_translation(settings, out=out, resume=resume)
    quoted = shlex.quote(str(out))
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        print(f"qkv train: stopped at step {result.step}; resume with:\n"
              f"  qkv train --family {settings.family} --out {quoted} --resume",
              file=sys.stderr)
        return 130 if result.stopped_by == "SIGINT" else 143
    shown = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in result.final.items())
    what = f"average of the last {result.averaged} evaluations" if result.averaged else \
        f"best at step {result.best_step}"
    print(f"{shown} ({what}; {result.step} steps, {result.wall_s:.0f} s); model in {out}")
    if result.skipped:
        print("skipped training pairs: " + ", ".join(f"{n} {why}" for why, n in
                                                      sorted(result.skipped.items())))
    with_example = translate(result.model, result.tokenizer, [_example(settings)], beam_size=1)
    print(f"example: {_example(settings)} -> {with_example[0]}")
    print(f"next: qkv translate {quoted} \"...\"   or   qkv eval {quoted} --src FILE --ref FILE")
    return 0


def _example(s: TranslateSettings) -> str:
    return {"de": "Ein Mann fährt mit dem Fahrrad.", "en": "A man is riding a bike.",
            "pt": "O gato está dormindo."}.get(s.src, "Hello.")
