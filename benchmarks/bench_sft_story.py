"""The seed's story at CPU scale: pre-training teaches facts, SFT teaches to answer with them.

    python benchmarks/bench_sft_story.py --threads 2   # the full run (about 13 min on 2 cores)
    python benchmarks/bench_sft_story.py --quick       # a smoke run (the figures mean nothing)

1. A corpus is generated (deterministically, from --seed) about 200 invented countries, each
   with a capital city. Each capital is stated in --mentions short paragraphs about its
   country, each time in another of 14 phrasings, English or Portuguese ("The capital of
   Veltoria is Dunmar.", "O governo de Veltoria fica em Dunmar.", ...), beside other sentences
   about the country, in a random order. Questions appear too, the way web pages list them:
   several in a row, none answered.
2. A small character-level GPT (qkv's gpt-char-small, 3.2M parameters) is pre-trained on it.
3. Before SFT, each held-out question ("What is the capital of Veltoria?" or "Qual é a capital
   de Veltoria?", then a newline) is continued greedily up to the next newline. Counted: how
   often the continuation is an answer rather than another question, and how often it is
   exactly the right capital. Also counted: how often the pre-trained model completes the
   prose "The capital of Veltoria is" right (whether the fact is stored at all).
4. SFT (qkv.tasks.sft, a LoRA update of rank 4 on every linear) on question/answer pairs about
   60% of the countries (--sft-share); the chat template is the plainest one: the question on
   a line, the answer on the next. The SFT's validation pairs (which pick the best checkpoint)
   are about another 10% of the countries (--dev-share), never trained on: the checkpoint kept
   is the one that answers best about countries it was not fine-tuned on, not the one that
   has memorised its pairs.
5. The same count on the remaining 30%, the held-out countries: their capitals the model saw
   only in the pre-training prose, never in a question/answer pair, and they chose nothing.

The corpus follows Allen-Zhu & Li 2023 (Physics of Language Models, Part 3.1): knowledge
becomes extractable by fine-tuning when pre-training shows each fact in varied phrasings, in
permuted order, with the entity named in full each time. Every phrasing names the country
before its capital, the direction the question asks in (a causal model does not learn the
reverse: Berglund et al. 2023). A LoRA update extracts the stored facts where full fine-tuning
of the small model memorises the SFT pairs instead. Raschka, Build a Large Language Model (From
Scratch), ch. 7: before instruction fine-tuning, GPT-2 repeats or continues the instruction
instead of answering it.

Prints the before/after counts, a few examples in both languages, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

import qkv
from qkv.chat import ChatTemplate
from qkv.checkpoint import WEIGHTS, load_weights
from qkv.data.sft import SFTExample
from qkv.tasks.sft import SFTSettings, finetune_sft
from qkv.train import TrainConfig, train

SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "tor", "sa", "du", "mar", "zel", "qui", "bra",
             "no", "fe", "lis", "gar", "po", "te", "xan", "vi", "hel", "um", "dra", "sol",
             "cor", "bel", "ta", "ri", "mon", "ga"]

# Every phrasing names the country before its capital: a causal model learns "country ->
# capital" only from text in that order (the question asks in that direction), and each names
# the country in full, so that the fact is stored with the name (Allen-Zhu & Li's "fullname").
FACT_EN = ["The capital of {c} is {k}.", "{c} has its seat of government in {k}.",
           "In {c}, the capital is {k}.", "The capital city of {c} is called {k}.",
           "{c} is governed from its capital, {k}.", "Visitors to {c} often start in {k}.",
           "The parliament of {c} meets in {k}.", "Ask anyone in {c} and they will name {k}."]
FACT_PT = ["A capital de {c} é {k}.", "O governo de {c} fica em {k}.",
           "Em {c}, a capital é {k}.", "A cidade capital de {c} chama-se {k}.",
           "O parlamento de {c} reúne-se em {k}.", "Quem visita {c} costuma chegar por {k}."]
OTHER = ["{c} is known for its mountains.", "Many tourists visit {c} in the summer.",
         "{c} exports grain and wool.", "The people of {c} love music.",
         "{c} has a long coastline.", "O clima de {c} é ameno.", "{c} tem muitas praias.",
         "A bandeira de {c} é azul."]
ASK_EN = ["What is the capital of {c}?", "Which city is the capital of {c}?"]
ASK_PT = ["Qual é a capital de {c}?"]

TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' %}{{ m.content + '\n' }}"
            "{% else %}{{ m.content + eos_token + '\n' }}{% endif %}{% endfor %}")


def names(rng: random.Random, n: int, parts: tuple[int, int]) -> list[str]:
    seen: set[str] = set()
    out = []
    while len(out) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(*parts))).capitalize()
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def world(seed: int, n: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    all_names = names(rng, 2 * n, (2, 3))
    return list(zip(all_names[:n], all_names[n:], strict=True))  # (country, capital)


def corpus(facts: list[tuple[str, str]], seed: int, mentions: int) -> str:
    """Short paragraphs about each country, like many pages that each mention it: its capital
    in `mentions` of them, each time in another phrasing (English or Portuguese), beside other
    sentences about it, in a random order. Then FAQ-like lists of unanswered questions. All
    the blocks shuffled together."""
    rng = random.Random(seed + 1)
    phrasings = FACT_EN + FACT_PT
    blocks = []
    for c, k in facts:
        order = rng.sample(range(len(phrasings)), len(phrasings))
        for m in range(mentions):
            lines = [phrasings[order[m % len(order)]]] + rng.sample(OTHER, rng.randint(0, 1))
            rng.shuffle(lines)
            blocks.append(" ".join(s.format(c=c, k=k) for s in lines))
    countries = [c for c, _ in facts]
    for _ in range(len(facts) * mentions // 8):
        asks = [rng.choice(ASK_EN + ASK_PT).format(c=rng.choice(countries))
                for _ in range(rng.randint(3, 6))]
        blocks.append("\n".join(asks))
    rng.shuffle(blocks)
    return "\n\n".join(blocks) + "\n"


def questions(facts: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(question, answer, language) for every country, in English and Portuguese."""
    out = []
    for i, (c, k) in enumerate(facts):
        out.append((ASK_EN[i % len(ASK_EN)].format(c=c), k, "en"))
        out.append((ASK_PT[0].format(c=c), k, "pt"))
    return out


def qa_pairs(facts: list[tuple[str, str]]) -> list[SFTExample]:
    """The SFT examples about these countries: each question, answered by the capital."""
    return [SFTExample(messages=[{"role": "user", "content": q},
                                 {"role": "assistant", "content": k}])
            for q, k, _ in questions(facts)]


def measure(model, tok, qs: list[tuple[str, str, str]]) -> dict:
    prompts = [q + "\n" for q, _, _ in qs]
    outs = []
    for i in range(0, len(prompts), 64):
        outs += qkv.generate(model, tok, prompts[i:i + 64], max_new_tokens=40, temperature=0,
                             stop="\n")
    answered = [not o.strip().endswith("?") and bool(o.strip()) for o in outs]
    right = [o.strip() == k for o, (_, k, _) in zip(outs, qs, strict=True)]
    n = len(qs)
    by_lang = {lang: sum(r for r, (_, _, la) in zip(right, qs, strict=True) if la == lang)
               / sum(la == lang for _, _, la in qs) for lang in ("en", "pt")}
    return {"answer_rate": sum(answered) / n, "accuracy": sum(right) / n, "n": n,
            "accuracy_by_language": by_lang,
            "examples": [(q, o.strip(), k) for (q, k, _), o in zip(qs, outs, strict=True)]}


def recall(model, tok, facts: list[tuple[str, str]]) -> float:
    """How often the pre-trained model completes the prose "The capital of X is" with X's
    capital: whether the fact is stored at all, asked the way the prose states it."""
    prompts = [FACT_EN[0].format(c=c, k="").rstrip(".") for c, _ in facts]
    outs = []
    for i in range(0, len(prompts), 64):
        outs += qkv.generate(model, tok, prompts[i:i + 64], max_new_tokens=20, temperature=0,
                             stop=".")
    right = [o.strip().rstrip(".") == k for o, (_, k) in zip(outs, facts, strict=True)]
    return sum(right) / len(facts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--countries", type=int, default=200)
    p.add_argument("--mentions", type=int, default=8, help="paragraphs that state each capital")
    p.add_argument("--pretrain-steps", type=int, default=2500)
    p.add_argument("--lr", type=float, default=2e-3, help="pre-training peak learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="pre-training windows per update")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--lora-rank", type=int, default=4,
                   help="SFT trains a LoRA update of this rank (0: every weight)")
    p.add_argument("--lora-targets", default="all")
    p.add_argument("--sft-share", type=float, default=0.6,
                   help="fraction of the countries whose Q/A pairs SFT trains on")
    p.add_argument("--dev-share", type=float, default=0.1,
                   help="fraction whose Q/A pairs choose the SFT checkpoint (the rest: held out)")
    p.add_argument("--base", type=Path, metavar="DIR",
                   help="skip pre-training: SFT this pre-trained model (the base/ of an earlier "
                   "run with the same --seed, --countries and --mentions; the weights of its "
                   "last update, from base/training/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/story")
    args = p.parse_args()
    if args.quick:
        args.countries, args.mentions, args.pretrain_steps, args.sft_steps = 40, 8, 20, 10
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (0 < args.sft_share and 0 < args.dev_share and args.sft_share + args.dev_share < 1):
        p.error("--sft-share and --dev-share must be positive and leave some countries held out")
    facts = world(args.seed, args.countries)
    (out / "corpus.txt").write_text(corpus(facts, args.seed, args.mentions), encoding="utf-8")
    base_dir = out / "base"
    cfg = TrainConfig(data=str(out / "corpus.txt"), preset="gpt-char-small", context=128,
                      max_steps=args.pretrain_steps, eval_every=max(10, args.pretrain_steps // 5),
                      warmup_steps=min(100, args.pretrain_steps // 10), val_fraction=0.02,
                      eval_windows=100, out=str(base_dir), seed=args.seed, threads=args.threads,
                      progress=False, lr=args.lr, batch_size=args.batch_size,
                      d_model=args.d_model, n_layers=args.layers)
    if args.base is not None:  # the model at pre-training's last update, as a full run SFTs
        model, tok = qkv.load(args.base)  # (its model.safetensors is the lowest-val-loss one)
        load_weights(model, args.base / "training" / WEIGHTS)
        val_loss = json.loads((args.base / "story.json").read_text())["val_loss"]
    else:
        result = train(cfg, overwrite=True)
        model, tok, val_loss = result.model, result.tokenizer, result.val_loss
        (base_dir / "story.json").write_text(json.dumps({"val_loss": val_loss}) + "\n")
    model.eval()
    pretrain_s = time.perf_counter() - t0

    n_sft = round(args.sft_share * len(facts))
    n_dev = round(args.dev_share * len(facts))
    seen, dev_facts, held = facts[:n_sft], facts[n_sft:n_sft + n_dev], facts[n_sft + n_dev:]
    before = measure(model, tok, questions(held))
    stored = recall(model, tok, held)
    template = ChatTemplate(TEMPLATE, eos_token=tok.special_tokens.get("eos") or "")
    pairs, dev = qa_pairs(seen), qa_pairs(dev_facts)
    t1 = time.perf_counter()
    settings = SFTSettings(max_steps=args.sft_steps, batch_size=16, lr=args.sft_lr, packing=True,
                           progress=False, seed=args.seed, eval_every=max(5, args.sft_steps // 10),
                           lora_rank=args.lora_rank or None, lora_targets=args.lora_targets)
    tuned = finetune_sft(model, tok, pairs, dev, settings, out=out / "sft",
                         template=template, overwrite=True).model
    sft_s = time.perf_counter() - t1
    after = measure(tuned, tok, questions(held))
    seen_after = measure(tuned, tok, questions(seen))
    dev_after = measure(tuned, tok, questions(dev_facts))

    print(f"pre-training {args.pretrain_steps} steps ({pretrain_s / 60:.1f} min, final val loss "
          f"{val_loss:.3f}); SFT {args.sft_steps} steps on {len(pairs)} Q/A pairs about "
          f"{len(seen)} countries ({sft_s / 60:.1f} min), the checkpoint chosen on {len(dev)} "
          f"pairs about {len(dev_facts)} others")
    print(f"held-out countries ({len(held)}, questions in English and Portuguese):")
    print(f"  the pre-trained model completes 'The capital of X is' right for {100 * stored:.1f}%")
    print(f"  before SFT: {100 * before['answer_rate']:.1f}% answered, "
          f"{100 * before['accuracy']:.1f}% right")
    print(f"  after SFT:  {100 * after['answer_rate']:.1f}% answered, "
          f"{100 * after['accuracy']:.1f}% right (English "
          f"{100 * after['accuracy_by_language']['en']:.1f}%, Portuguese "
          f"{100 * after['accuracy_by_language']['pt']:.1f}%)")
    print(f"countries in the SFT pairs, after: {100 * seen_after['accuracy']:.1f}% right; "
          f"the checkpoint-choosing countries: {100 * dev_after['accuracy']:.1f}% right")
    print("examples (question | before | after | truth):")
    for i in (0, 1, 2, 3):
        q, b, k = before["examples"][i]
        print(f"  {q} | {b} | {after['examples'][i][1]} | {k}")
    total = time.perf_counter() - t0
    print(json.dumps({
        "before": {k: v for k, v in before.items() if k != "examples"},
        "after": {k: v for k, v in after.items() if k != "examples"},
        "stored": stored, "after_seen": {k: v for k, v in seen_after.items() if k != "examples"},
        "after_dev": {k: v for k, v in dev_after.items() if k != "examples"},
        "examples": [{"question": q, "before": b, "after": after["examples"][i][1],
                      "truth": k} for i, (q, b, k) in enumerate(before["examples"][:6])],
        "pretrain_s": round(pretrain_s, 1), "sft_s": round(sft_s, 1), "total_s": round(total, 1),
        "val_loss": val_loss, "settings": {k: str(v) if isinstance(v, Path) else v
                                           for k, v in vars(args).items()}}))
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
