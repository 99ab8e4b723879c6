"""Translation on Multi30k (and Tatoeba en-pt): the Transformer and the RNNs it replaced, in one
harness, on one metric.

    python benchmarks/bench_translate.py                       every target (hours on a CPU)
    python benchmarks/bench_translate.py --only de-en --time-budget 60m
    python benchmarks/bench_translate.py --only lstm bahdanau --time-budget 30m
    python benchmarks/bench_translate.py --only throughput     qkv vs HF MarianMTModel, one batch
    python benchmarks/bench_translate.py --quick               a smoke run: tiny budgets, subsets
    python benchmarks/bench_translate.py --only en-de --set norm_placement=post --runs runs/t1
                                                               a recipe trial (any setting)
    python benchmarks/bench_translate.py --only en-de --members 2 --threads 2
                                   two models trained side by side (one thread each), then
                                   their ensemble decodes (qkv.ensemble); each member's score
                                   is printed beside it
    python benchmarks/bench_translate.py --only en-de --members 2 --threads 2
        --member-set 0:preset=transformer-mt-tiny --member-set 1:bpe_dropout=0.1
                                   the same with a recipe of each member's own

Every run trains with qkv's own recipe (qkv.tasks.translate.train_translation: the one loop,
the joint BPE, label smoothing, token-budget batches), keeps the best checkpoint by validation
loss (or averages the last K), then decodes Multi30k test 2016 (1,000 sentences) and scores
it with sacreBLEU: cased (13a, signature printed), lowercased, and chrF. Decoding time is
measured greedy and with beam 5. The runs are written to --runs (default runs/bench-translate)
and the figures to --json-out.

Anchors (their numbers, not re-run here), all on Multi30k test 2016:
- bentrevett/pytorch-seq2seq, de->en, BLEU on lowercased spaCy tokens, greedy, 10 epochs on a
  GPU: LSTM 13.76, GRU + Bahdanau 28.30, Transformer 36.52;
- Transformer-Tiny (Wu et al. 2021, 4+4 layers, d=128), en->de, 41.02, lowercased and
  tokenised, beam 5, average of the last 10 checkpoints.
Their tokenised BLEU is not sacreBLEU's detokenised one: compare with care.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from _common import CPU, DATA, autocast, peer_autocast, print_table, race, threads

from qkv.commands._args import parse_duration
from qkv.data.parallel import collate, encode_pairs, joint_tokenizer, read_parallel
from qkv.hardware import set_threads, training_attention
from qkv.tasks.translate import (
    TranslateSettings,
    alignment,
    bleu_scores,
    build_translator,
    load_translator,
    load_translators,
    train_translation,
    translate,
    translation_loss,
)
from qkv.train.optim import make_optimizer

MULTI30K = DATA / "multi30k"
TATOEBA = DATA / "tatoeba_en_pt"

#: name -> (settings, default time budget in seconds, BLEU target (lowercased), anchor note)
RUNS: dict[str, tuple[dict[str, Any], float, float | None, str]] = {
    "de-en": (dict(src="de", tgt="en", decay="cosine", warmup_steps=400, dropout=0.2,
                   eval_every=250),
              3600, 38.0,
              "bentrevett Transformer 36.52 (tokenised, greedy)"),
    # post-norm: 39.74 against 39.38 pre-norm (docs/translation.md, 2026-12-07)
    "en-de": (dict(src="en", tgt="de", decay="cosine", warmup_steps=800, dropout=0.3,
                   norm_placement="post", average_last=10, eval_every=150), 5400, 41.5,
              "Transformer-Tiny 41.02 (tokenised, beam 5, avg 10)"),
    "lstm": (dict(src="de", tgt="en", family="rnn", rnn_cell="lstm", attention=False,
                  reverse_source=True,
                  lr=1e-3, warmup_steps=200, decay="cosine"), 1800, 15.0,
             "bentrevett LSTM 13.76 (tokenised, greedy)"),
    "bahdanau": (dict(src="de", tgt="en", family="rnn", rnn_cell="gru", attention=True,
                      precision="fp32",  # the README row's run was fp32
                      lr=1e-3, warmup_steps=200, decay="cosine"), 1800, 30.0,
                 "bentrevett GRU + Bahdanau 28.30 (tokenised, greedy)"),
    "en-pt": (dict(src="en", tgt="pt", data=str(TATOEBA)), 1200, None,
              "a first small-data baseline; no claim against opus-mt"),
}


def test_set(name: str, quick: bool, limit: int | None = None) -> tuple[list[str], list[str]]:
    settings = RUNS[name][0]
    if name == "en-pt":
        data = read_parallel(TATOEBA, "en", "pt", "test")
    else:
        data = read_parallel(MULTI30K, settings["src"], settings["tgt"], "test_2016_flickr")
    n = min(limit or len(data), 100 if quick else len(data))
    return data.src[:n], data.tgt[:n]


def run_one(name: str, budget: float, runs: Path, quick: bool, n_threads: int,
            beam: int, test_sentences: int | None = None,
            warmup: int | None = None, eval_every: int | None = None,
            score_only: bool = False, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    overrides, _, target, anchor = RUNS[name]
    overrides = {**overrides, **(changes or {})}  # --set: a recipe trial
    s = TranslateSettings(**{"data": str(MULTI30K), **overrides})
    # The budget covers the whole run: the training loop stops a minute early, which leaves
    # the time to learn the tokenizer and to validate the final model.
    reserve = 0.0 if quick else min(60.0, budget / 10)
    s.time_limit, s.max_steps, s.threads, s.progress = budget - reserve, None, n_threads, not quick
    s.eval_every = eval_every or overrides.get("eval_every", 1000)
    if warmup is not None:
        s.warmup_steps = warmup
    if quick:
        s.max_train_pairs, s.eval_every, s.bleu_sentences, s.vocab_size = 3000, 50, 50, 2000
        s.warmup_steps = 50
        if s.average_last:
            s.average_last = 2
    if score_only:  # the model of an earlier run, as its log describes it
        model, tok = load_translator(runs / name)
        records = [json.loads(line) for line in (runs / name / "log.jsonl").open()]
        evals = [r for r in records if "val_loss" in r]
        info = {"steps": records[-1]["step"], "train_s": records[-1]["elapsed"],
                "train_pairs": None, "averaged": s.average_last or 0,
                "val": {k: v for k, v in evals[-1].items() if k.startswith("val_")}}
        set_threads(n_threads)
    else:
        start = time.perf_counter()
        result = train_translation(s, out=runs / name)
        info = {"steps": result.step, "train_s": round(time.perf_counter() - start, 1),
                "train_pairs": result.train_pairs, "averaged": result.averaged,
                "val": result.final}
        model, tok = result.model, result.tokenizer
    return {"run": name, **info, "target_bleu_lowercase": target, "anchor": anchor,
            **test_scores(model, tok, name, quick, test_sentences, beam, s.max_length_ratio,
                          runs / name / "test.hyp"),
            "params": model.num_parameters()}


def test_scores(model: Any, tok: Any, name: str, quick: bool, test_sentences: int | None,
                beam: int, max_length_ratio: float, hyp_out: Path) -> dict[str, Any]:
    """Decode the test set greedy and with `beam` (timed), score both, write the beam's
    translations to hyp_out."""
    sources, refs = test_set(name, quick, test_sentences)
    timing: dict[str, float] = {}
    outputs: dict[int, list[str]] = {}
    for k in sorted({1, beam}):
        t0 = time.perf_counter()
        outputs[k] = translate(model, tok, sources, beam_size=k,
                               max_length_ratio=max_length_ratio, precision="fp32")
        timing[f"decode_beam{k}_s"] = round(time.perf_counter() - t0, 2)
    scores = {k: bleu_scores(hyps, refs) for k, hyps in outputs.items()}
    hyp_out.write_text("".join(h + "\n" for h in outputs[beam]))
    return {"sentences": len(sources), **timing,
            **{f"beam{k}": dict(sc) for k, sc in scores.items()}}


def run_members(name: str, k: int, args: argparse.Namespace, n_threads: int,
                changes: dict[str, Any], own: dict[int, list[str]]) -> dict[str, Any]:
    """An ensemble of k models of run `name`: each trained at the same time in its own process
    of this script (seed base + i, n_threads // k threads, the same budget), in
    --runs/member-i; then the k decode the test set together (qkv.ensemble: their next-token
    probabilities averaged). The wall time is one run's: the k train side by side."""
    per = max(1, n_threads // k)
    base_seed = int(changes.get("seed", 0))
    forwarded = [f"--set={key}={json.dumps(v) if not isinstance(v, str) else v}"
                 for key, v in changes.items() if key != "seed"]
    for flag in ("time_budget", "warmup_steps", "eval_every", "test_sentences"):
        if getattr(args, flag) is not None:
            forwarded += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    forwarded += ["--beam", str(args.beam)] + (["--quick"] if args.quick else [])
    dirs = [args.runs / f"member-{i}" for i in range(k)]
    if not args.score_only:
        procs = []
        for i, out in enumerate(dirs):
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--only", name, "--threads",
                   str(per), "--runs", str(out), "--json-out", str(out / "result.json"),
                   f"--set=seed={base_seed + i}", *forwarded,
                   *(f"--set={item}" for item in own.get(i, []))]  # after: they win
            print("member", i, ":", " ".join(cmd), flush=True)
            log = (args.runs / f"member-{i}.log").open("w")
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        for i, (proc, log) in enumerate(procs):
            code = proc.wait()
            log.close()
            if code != 0:
                sys.exit(f"member {i} failed (exit {code}): see {args.runs}/member-{i}.log")
    members = [json.loads((d / "result.json").read_text())[name] for d in dirs]
    model, tok = load_translators([d / name for d in dirs])
    set_threads(n_threads)
    overrides, _, target, anchor = RUNS[name]
    settings = TranslateSettings(**{"data": str(MULTI30K), **overrides, **changes})
    return {"run": f"{name} x{k}", "members": members,
            "steps": "+".join(str(m["steps"]) for m in members),
            "train_s": max(m["train_s"] for m in members),
            "target_bleu_lowercase": target, "anchor": f"{anchor}; an ensemble of {k}",
            **test_scores(model, tok, name, args.quick, args.test_sentences, args.beam,
                          settings.max_length_ratio, args.runs / f"{name}-ensemble.hyp")}


def throughput(n_threads: int, rounds: int, quick: bool) -> dict[str, float]:
    """Training tokens per second of qkv's encoder-decoder and HF's MarianMTModel of the same
    shape (transformer-mt-small: 3 + 3 layers, d=256, 4 heads, d_ff=1024), same batch, each in
    fp32 and under bf16 autocast; every contender's best setting counts."""
    from transformers import MarianConfig, MarianMTModel

    data = read_parallel(MULTI30K, "de", "en", "val")
    tok = joint_tokenizer(data, vocab_size=2000 if quick else 8000)
    pairs = encode_pairs(data, tok, 128)
    rows = list(range(0, 96 if not quick else 16))
    batch = collate(pairs, rows, 0)  # (src, src_mask, tgt, tgt_mask)
    tokens = int(batch[3].sum())
    s = TranslateSettings(data="-", vocab_size=tok.vocab_size)
    ours = build_translator(s, tok.vocab_size, 0, 1, 2).to(CPU).train()
    ours_opt = make_optimizer(ours, 1e-4, 0.0, fused=True)
    cfg = ours.config
    hf = MarianMTModel(MarianConfig(
        vocab_size=tok.vocab_size, d_model=cfg.d_model, encoder_layers=cfg.n_encoder_layers,
        decoder_layers=cfg.n_decoder_layers, encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len, pad_token_id=0, eos_token_id=2,
        decoder_start_token_id=1, dropout=cfg.dropout, activation_function="relu",
        scale_embedding=True)).train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    src, src_mask, tgt, tgt_mask = batch

    def qkv_step(precision: str):
        def step() -> None:
            with training_attention(CPU, precision), autocast(CPU, precision):
                loss = translation_loss(ours, batch, 0, 0.1)
            loss.backward()
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)
        return step

    def hf_step(precision: str):
        labels = tgt[:, 1:].masked_fill(tgt_mask[:, 1:] == 0, -100)

        def step() -> None:
            with peer_autocast(precision):
                out = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt[:, :-1],
                         decoder_attention_mask=tgt_mask[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                out.logits.float().transpose(1, 2), labels, ignore_index=-100,
                label_smoothing=0.1)
            loss.backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
        return step

    best, _ = race({"qkv fp32": qkv_step("fp32"), "qkv bf16": qkv_step("bf16"),
                    "HF Marian fp32": hf_step("fp32"), "HF Marian bf16": hf_step("bf16")},
                   rounds=rounds)
    speed = {name: tokens / sec for name, sec in best.items()}
    table = {"qkv (best)": max(speed["qkv fp32"], speed["qkv bf16"]),
             "HF Marian (best)": max(speed["HF Marian fp32"], speed["HF Marian bf16"]), **speed}
    print_table(f"training throughput, one batch of {len(rows)} pairs ({tokens} target tokens), "
                f"{n_threads} threads", table, "tok/s")
    return {k: round(v, 1) for k, v in table.items()}


def alignment_figure(runs: Path, path: Path) -> None:
    """One sentence's alignment: Transformer cross-attention and Bahdanau attention, side by
    side (needs the de-en and bahdanau runs, and matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = "Ein Mann mit einem roten Hut sitzt auf einer Bank."
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, (name, title) in zip(axes, (("de-en", "Transformer: last layer's cross-attention"),
                                        ("bahdanau", "GRU + Bahdanau attention")),
                                 strict=True):
        model, tok = load_translator(runs / name)
        target = translate(model, tok, [source], beam_size=5)[0]
        weights, src_tokens, tgt_tokens = alignment(model, tok, source, target)
        ax.imshow(weights.numpy(), cmap="Greys", vmin=0, vmax=1)
        ax.set_xticks(range(len(src_tokens)), src_tokens, rotation=90)
        ax.set_yticks(range(len(tgt_tokens)), tgt_tokens)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"alignment figure: {path}")


def recipe_changes(p: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE items as {field: value}; a value reads as JSON where it can (numbers,
    true/false, null), else as text."""
    known = {f.name for f in fields(TranslateSettings)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            p.error(f"--set {item!r}: expected KEY=VALUE with KEY one of the settings "
                    f"({', '.join(sorted(known))})")
        try:
            changes[key] = json.loads(text)
        except json.JSONDecodeError:
            changes[key] = text
    return changes


def member_changes(p: argparse.ArgumentParser, items: list[str], k: int) -> dict[int, list[str]]:
    """--member-set I:KEY=VALUE items as {member: [KEY=VALUE, ...]}, each checked as --set's."""
    own: dict[int, list[str]] = {}
    for item in items:
        index, sep, change = item.partition(":")
        if not sep or not index.isdigit() or int(index) >= k:
            p.error(f"--member-set {item!r}: expected I:KEY=VALUE with I below --members {k}")
        recipe_changes(p, [change])
        own.setdefault(int(index), []).append(change)
    return own


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=[*RUNS, "throughput"],
                   help="which runs (default: all)")
    p.add_argument("--time-budget", type=parse_duration, metavar="TIME",
                   help="training time of each run (default: the target's: 60m de-en, 90m "
                   "en-de, 30m each RNN, 20m en-pt)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 30 s of training on 3,000 pairs, 100 test sentences")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--test-sentences", type=int, metavar="N",
                   help="score only the first N test sentences (default: all)")
    p.add_argument("--warmup-steps", type=int, metavar="N",
                   help="override the recipe's warm-up (short budgets need a shorter one)")
    p.add_argument("--eval-every", type=int, metavar="N",
                   help="default: the recipe's (250 de-en, 150 en-de, else 1000)")
    p.add_argument("--score-only", action="store_true",
                   help="train nothing: decode and score the models already in --runs (their "
                   "training steps and time read from their log.jsonl)")
    p.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                   help="change one setting of the recipe (a TranslateSettings field), for a "
                   "trial: --set norm_placement=post --set lr=2e-3 (repeatable)")
    p.add_argument("--members", type=int, default=1, metavar="K",
                   help="train K models of each run at once, one process each (seeds 0..K-1, "
                   "the threads shared out), and score their ensemble (qkv.ensemble); with "
                   "--score-only, score the ensemble of --runs/member-*")
    p.add_argument("--member-set", dest="member_sets", action="append", default=[],
                   metavar="I:KEY=VALUE",
                   help="with --members: change one setting of member I only, after --set and "
                   "the member's seed (repeatable): --member-set 0:preset=transformer-mt-tiny")
    p.add_argument("--threads", type=int)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of the throughput race")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-translate"))
    p.add_argument("--json-out", type=Path, help="write every figure here")
    p.add_argument("--figure", type=Path, help="save the alignment heatmaps here (PNG)")
    args = p.parse_args()
    changes = recipe_changes(p, args.changes)
    if args.members < 1:
        p.error(f"--members {args.members}: give at least 1")
    if args.member_sets and args.members < 2:
        p.error("--member-set needs --members 2 or more")
    own = member_changes(p, args.member_sets, args.members)
    n = threads(args.threads)
    chosen = args.only or [*RUNS, "throughput"]
    results: dict[str, Any] = {"threads": n, "quick": args.quick}
    for name in chosen:
        if name == "throughput":
            results[name] = throughput(n, 2 if args.quick else args.rounds, args.quick)
            continue
        if args.members > 1:
            results[name] = r = run_members(name, args.members, args, n, changes, own)
            if changes:
                r["changes"] = changes
            if own:
                r["member_changes"] = own
            print(json.dumps(r), flush=True)
            continue
        budget = 30.0 if args.quick else (args.time_budget or RUNS[name][1])
        results[name] = r = run_one(name, budget, args.runs, args.quick, n, args.beam,
                                    args.test_sentences, args.warmup_steps, args.eval_every,
                                    args.score_only, changes)
        if changes:
            r["changes"] = changes
        print(json.dumps(r), flush=True)
    rows = {}
    for name in chosen:
        if name == "throughput":
            continue
        r = results[name]
        b = r[f"beam{args.beam}"]
        for i, m in enumerate(r.get("members", [])):
            mb = m[f"beam{args.beam}"]
            print(f"{name:>9}: member {i}: BLEU {mb['bleu']:.2f} cased, "
                  f"{mb['bleu_lowercase']:.2f} lowercased (beam {args.beam}), {m['steps']} "
                  f"steps in {m['train_s'] / 60:.1f} min")
        rows[f"qkv {r['run']}"] = b["bleu_lowercase"]
        label = f"{name} x{args.members}" if "members" in r else name
        print(f"{label:>9}: BLEU {b['bleu']:.2f} cased, {b['bleu_lowercase']:.2f} lowercased, "
              f"chrF {b['chrf']:.1f} (beam {args.beam}); greedy BLEU "
              f"{r['beam1']['bleu']:.2f}; trained {r['train_s'] / 60:.1f} min, {r['steps']} "
              f"steps; decode {r['decode_beam1_s']} s greedy, "
              f"{r.get(f'decode_beam{args.beam}_s')} s beam {args.beam} "
              f"({r['sentences']} sentences); target "
              f"{r['target_bleu_lowercase'] or '-'}; anchor: {r['anchor']}")
    if rows:
        print_table("BLEU (lowercased sacreBLEU) on the test set", rows, "BLEU", digits=2)
        signature = results[next(iter(k for k in chosen if k != "throughput"))][
            f"beam{args.beam}"]["bleu_signature"]
        print(f"sacreBLEU signature: {signature}")
    if args.figure:
        alignment_figure(args.runs, args.figure)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
