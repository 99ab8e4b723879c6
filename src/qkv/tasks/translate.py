"""Translation: train an encoder-decoder on sentence pairs, translate, and score with BLEU.

    result = train_translation(TranslateSettings(data="multi30k/", src="de", tgt="en"),
                               out="runs/de-en")
    model, tok = load_translator("runs/de-en")
    translate(model, tok, ["Ein Hund läuft."], beam_size=5)     # ["A dog is running."]
    bleu_scores(hypotheses, references)                          # sacreBLEU, lowercased, chrF

The recipe around the one training loop (train/loop.py):

    1. data        pairs (data/parallel.py) -> one joint BPE tokenizer -> token ids
    2. model       a Transformer preset (transformer-mt-small), or a recurrent baseline
                   (qkv.baselines: LSTM/GRU, with or without Bahdanau attention)
    3. objective   label-smoothed cross-entropy over the target tokens (padding never counts),
                   on token-budget batches of similar lengths; evaluated by validation loss and
                   by greedy BLEU on validation sentences
    4. fit         warm-up then inverse-sqrt (or cosine) decay, dropout, the best checkpoint by
                   loss or BLEU, exact resume; `average_last=K` then averages the weights of the
                   last K evaluations (checkpoint averaging, Vaswani et al. 2017, section 6.1)

Label smoothing (Szegedy et al. 2016; the Transformer used eps = 0.1): the target distribution
puts 1 - eps on the reference token and spreads eps uniformly over the whole vocabulary, so
the model is never pushed to infinite confidence:

    loss = - sum_v q(v) log p(v),    q = (1 - eps) * onehot(y) + eps / V

averaged over the real target tokens of the batch.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..baselines import RNNConfig, RNNTranslator
from ..batching import evaluating, model_device, pad_rows, sorted_batches
from ..checkpoint import CONFIG, TOKENIZER, WEIGHTS, load, load_weights, save_weights
from ..data.parallel import (
    Pairs,
    ParallelData,
    TokenBatches,
    collate,
    encode_pairs,
    has_split,
    hash_split,
    joint_tokenizer,
    read_aligned,
    read_parallel,
    translation_ids,
)
from ..ensemble import Ensemble
from ..errors import ConfigError, InputError
from ..hardware import autocast, resolve_device, resolve_precision, set_threads
from ..io import read_config_json, read_json_object, read_safetensors
from ..layers.attention import record_attention
from ..lora import apply_lora, describe_trainable, save_adapter
from ..model import Transformer
from ..presets import get as get_preset
from ..seq2seq import generate_seq2seq
from ..tokenizer import Tokenizer
from ..train import LoopConfig, Objective, Schedule, fit, make_optimizer
from ..train.checkpoint import find_training_checkpoint, read_state
from ..train.distributed import launched
from ..train.log import printer
from ..train.loss import cross_entropy

#: The model kinds `family` may name: the Transformer, and the recurrent baselines.
FAMILIES = ("encoder-decoder", "rnn")
TRANSLATION_ONE_PROCESS = ("translation training (--family encoder-decoder or rnn) runs in one "
                           "process; give it the cores with --threads instead of --nproc")
#: Decoding defaults saved next to a trained model (translation.json).
DECODING = "translation.json"
AVERAGING = "averaging"

Translator = Transformer | RNNTranslator
#: What translate() decodes with: a translator, or several as one (qkv.ensemble).
Decoder = Translator | Ensemble


# ---------------------------------------------------------------------- the loss

def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, pad: int,
                        smoothing: float = 0.1) -> torch.Tensor:
    """Mean label-smoothed cross-entropy over the tokens of `target` (B, T) that are not `pad`;
    logits (B, T, V). q = (1 - eps) onehot + eps / V (see the module docstring)."""
    # (1 - eps) * -log p(reference) + eps * -(1/V) sum_v log p(v), a slice of rows at a time
    return cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=pad,
                         label_smoothing=smoothing)


def translation_loss(model: Any, batch: tuple[torch.Tensor, ...], pad: int,
                     smoothing: float) -> torch.Tensor:
    """The loss of a batch (src, src_mask, tgt, tgt_mask): the decoder reads the target without
    its last token and predicts it without its first (<s>)."""
    src, src_mask, tgt, tgt_mask = batch
    logits = model(src, tgt[:, :-1], src_mask=src_mask, tgt_mask=tgt_mask[:, :-1])
    return label_smoothed_loss(logits, tgt[:, 1:], pad, smoothing)


# ---------------------------------------------------------------------- BLEU

def bleu_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacreBLEU (cased, 13a tokenisation) with its signature, lowercased BLEU, and chrF.

    Uses the `sacrebleu` package (Post 2018), so that the numbers compare with published ones."""
    if len(hypotheses) != len(references):
        raise InputError(f"{len(hypotheses)} translations but {len(references)} references")
    if not references:
        raise InputError("no sentences to score")
    try:
        from sacrebleu.metrics.bleu import BLEU
        from sacrebleu.metrics.chrf import CHRF
    except ImportError:
        raise InputError("BLEU needs the sacrebleu package: pip install sacrebleu") from None
    cased, lower, chrf = BLEU(), BLEU(lowercase=True), CHRF()
    hyps, refs = list(hypotheses), [list(references)]
    bleu = cased.corpus_score(hyps, refs)
    return {"bleu": bleu.score, "bleu_signature": str(cased.get_signature()),
            "bleu_lowercase": lower.corpus_score(hyps, refs).score,
            "chrf": chrf.corpus_score(hyps, refs).score,
            "chrf_signature": str(chrf.get_signature()), "sentences": len(hyps)}


# ---------------------------------------------------------------------- translating

def source_ids(tokenizer: Any, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Each text's ids and </s> (Marian's convention too), cut to max_len tokens."""
    _, _, eos = translation_ids(tokenizer)
    rows = tokenizer.encode_batch(list(texts), add_special_tokens=False)["input_ids"]
    return [[*row[:max_len - 1], eos] for row in rows]


def translate(model: Decoder, tokenizer: Any, texts: Sequence[str], beam_size: int = 5,
              length_penalty: float = 1.0, max_length_ratio: float | None = 1.5,
              batch_size: int = 64, max_new_tokens: int | None = None,
              precision: str = "fp32") -> list[str]:
    """Translate texts in batches of similar length; the outputs keep the input order."""
    cfg = model.config
    if cfg.family not in FAMILIES:
        raise InputError(f"translation needs an encoder-decoder model; this one is a "
                         f"{cfg.family}")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise InputError("texts must be a list of strings")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size} must be at least 1")
    pad, bos, eos = translation_ids(tokenizer)
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else bos
    rows = source_ids(tokenizer, texts, cfg.max_seq_len)
    limit = max_new_tokens or cfg.max_seq_len
    device = model_device(model)
    out: list[str] = [""] * len(rows)
    with evaluating(model), autocast(device, precision):
        for batch in sorted_batches([len(r) for r in rows], batch_size):
            ids, mask = pad_rows([rows[i] for i in batch], pad, device=device)
            found = generate_seq2seq(model, ids, mask, max_new_tokens=limit, beam_size=beam_size,
                                     length_penalty=length_penalty, start_id=start, eos_id=eos,
                                     max_length_ratio=max_length_ratio)
            for i, target in zip(batch, found, strict=True):
                out[i] = tokenizer.decode(target, skip_special_tokens=True).strip()
    return out


def alignment(model: Translator, tokenizer: Any, source: str,
              target: str) -> tuple[torch.Tensor, list[str], list[str]]:
    """(weights (T, S), source tokens, target tokens): how much each target token (a row,
    predicted after the tokens before it) attended to each source token. The Transformer's is its
    last decoder layer's cross-attention, averaged over heads; an RNN's is Bahdanau's attention.
    Both are read with record_attention."""
    _, bos, _ = translation_ids(tokenizer)
    src = source_ids(tokenizer, [source], model.config.max_seq_len)[0]
    tgt = [bos, *tokenizer.encode(target, add_special_tokens=False)]
    device = model_device(model)
    if isinstance(model, RNNTranslator):
        if not model.config.attention:
            raise InputError("a recurrent translator without attention has no alignment")
        name = "attention"
    else:
        name = f"decoder.layers.{model.config.n_decoder_layers - 1}.cross_attn"
    with evaluating(model), record_attention(model) as maps:
        model(torch.tensor([src], device=device), torch.tensor([tgt], device=device))
    weights = torch.cat(maps[name], dim=2)[0].float().mean(0)  # (T, S), averaged over heads
    pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in src]
    out = [tokenizer.decode([t], skip_special_tokens=False) for t in tgt[1:]] + ["</s>"]
    return weights.cpu(), pieces, out


def load_translator(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[Translator, Tokenizer]:
    """(model, tokenizer) from a directory: a qkv Transformer, a recurrent baseline, or a
    Hugging Face Marian/BART checkpoint."""
    path = Path(path)
    config_path = path / CONFIG
    data = read_config_json(path) if config_path.is_file() else {}
    if data.get("family") == "rnn":
        model: Translator = RNNTranslator(RNNConfig.from_dict(data))
        load_weights(model, path / WEIGHTS)  # type: ignore[arg-type]
        tokenizer = Tokenizer.load(path / TOKENIZER) if (path / TOKENIZER).is_file() else None
    else:
        model, tokenizer = load(path, device=device)
    if tokenizer is None:
        raise InputError(f"{path} has no tokenizer.json, so text cannot be encoded")
    if model.config.family not in FAMILIES:
        raise InputError(f"{path} is a {model.config.family} model; translation needs an "
                         "encoder-decoder")
    return model.to(device).eval(), tokenizer


def load_translators(paths: Sequence[str | Path], device: str | torch.device = "cpu"
                     ) -> tuple[Decoder, Tokenizer]:
    """(model, tokenizer) from one directory, as load_translator; from several, an Ensemble
    of them (qkv.ensemble), which must share one tokenizer: the same tokenizer.json."""
    if not paths:
        raise InputError("no model directory given")
    loaded = [load_translator(p, device) for p in paths]
    if len(loaded) == 1:
        return loaded[0]
    first = loaded[0][1].backend.to_str()
    for path, (_, tok) in zip(paths[1:], loaded[1:], strict=True):
        if tok.backend.to_str() != first:
            raise InputError(f"{path} has another tokenizer than {paths[0]}: an ensemble's "
                             "models must share one (train them on the same data and "
                             "--vocab-size, or start them from one --init)")
    return Ensemble([m for m, _ in loaded]).eval(), loaded[0][1]


def decoding_defaults(path: str | Path) -> dict[str, Any]:
    """The decoding settings saved with a trained model ({} for other models)."""
    file = Path(path) / DECODING
    return read_json_object(file) if file.is_file() else {}


# ---------------------------------------------------------------------- checkpoint averaging

def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of several state dicts of one model (computed in fp64)."""
    if not states:
        raise InputError("no checkpoints to average")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise InputError("the checkpoints to average do not hold the same tensors")
    out = {}
    for k, first in states[0].items():
        if not first.is_floating_point():
            out[k] = first.clone()
            continue
        total = sum(s[k].double() for s in states)
        out[k] = (total / len(states)).to(first.dtype)  # type: ignore[union-attr]
    return out


class Snapshots:
    """The weights of the last K evaluations, in out/averaging/ (or in memory without `out`)."""

    def __init__(self, keep: int, folder: Path | None):
        self.keep, self.folder = keep, folder
        self.memory: list[tuple[int, dict[str, torch.Tensor]]] = []

    def steps(self) -> list[int]:
        if self.folder is None:
            return [step for step, _ in self.memory]
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("step-*.safetensors"))

    def add(self, step: int, model: torch.nn.Module) -> None:
        if self.folder is None:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.memory = [*self.memory, (step, weights)][-self.keep:]
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_weights(model, self.folder / f"step-{step}.safetensors",
                     getattr(model, "tied_weights", dict)())  # a tied matrix once
        for old in self.steps()[:-self.keep]:
            (self.folder / f"step-{old}.safetensors").unlink(missing_ok=True)

    def forget_after(self, step: int) -> None:
        """After a resume: the snapshots a killed run wrote after its checkpoint go."""
        if self.folder is not None:
            for later in [s for s in self.steps() if s > step]:
                (self.folder / f"step-{later}.safetensors").unlink(missing_ok=True)

    def average(self) -> dict[str, torch.Tensor]:
        if self.folder is None:
            return average_state_dicts([w for _, w in self.memory])
        return average_state_dicts([read_safetensors(self.folder / f"step-{s}.safetensors")
                                    for s in self.steps()])


# ---------------------------------------------------------------------- the recipe

@dataclass
class TranslateSettings:
    """The knobs of training a translator; the defaults suit Multi30k on a CPU."""

    data: str = ""                  # a folder of split files or a TSV (see data/parallel.py)
    src: str = "de"
    tgt: str = "en"
    family: str = "encoder-decoder"  # or "rnn"
    preset: str = "transformer-mt-small"
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    norm_placement: str | None = None  # "pre" or "post" (the original paper's); None: preset's
    rnn_cell: str = "gru"           # rnn: "lstm" or "gru"
    attention: bool = True          # rnn: Bahdanau attention (False: Sutskever's bottleneck)
    reverse_source: bool = False    # rnn without attention: read the source backwards
    d_hidden: int = 512             # rnn sizes
    d_embed: int = 256
    vocab_size: int = 8000
    context: int = 128              # tokens per sentence; longer training pairs are skipped
    max_tokens: int = 4096          # tokens per batch, padding included
    max_steps: int | None = 6000
    time_limit: float | None = None
    lr: float = 1e-3
    warmup_steps: int = 800
    decay: str = "inverse_sqrt"     # or "cosine"
    min_lr: float | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dropout: float | None = None    # None: the preset's (0.1), or 0.3 for an RNN
    label_smoothing: float = 0.1
    bpe_dropout: float = 0.0        # BPE-dropout of the training pairs (Provilkov et al. 2020)
    grad_accum: int = 1
    eval_every: int = 500
    bleu_sentences: int = 300       # validation sentences decoded (greedy) for val_bleu; 0: none
    best: str = "loss"              # pick the best checkpoint by "loss" or "bleu"
    average_last: int = 0           # average the weights of the last K evaluations
    val_pairs: int = 500            # held out from a single TSV without a validation split
    max_train_pairs: int | None = None  # a random subset of the training pairs (quick runs;
                                        # the same subset for every seed)
    beam_size: int = 5              # decoding defaults saved with the model
    length_penalty: float = 1.0
    max_length_ratio: float = 1.5
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    compile: bool = False
    seed: int = 0
    progress: bool = True
    log_every: int | None = None
    init: str | None = None         # start from this translator (its weights and tokenizer)
    lora_rank: int | None = None    # LoRA (qkv.lora) on `init`: train low-rank updates only
    lora_alpha: float | None = None  # scale alpha / rank (default 2 * rank)
    lora_targets: str = "q,v"       # which linears get updates (qkv.lora.TARGETS)

    def check(self) -> None:
        if not self.data:
            raise ConfigError("translation training needs --data (a folder or a TSV file)")
        if self.lora_rank is not None and self.init is None:
            raise ConfigError("LoRA trains an update to a translator that exists: give --init "
                              "DIR (a trained encoder-decoder)")
        if self.lora_rank is not None and self.family == "rnn":
            raise ConfigError("LoRA applies to the Transformer families, not to --family rnn")
        if self.family not in FAMILIES:
            raise ConfigError(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.src == self.tgt:
            raise ConfigError(f"--src and --tgt are both {self.src!r}")
        for name, allowed in (("norm_placement", ("pre", "post", None)),
                              ("best", ("loss", "bleu")), ("decay", ("inverse_sqrt", "cosine"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of "
                                  f"{', '.join(a for a in allowed if a)}")
        if self.best == "bleu" and self.bleu_sentences < 1:
            raise ConfigError("best=bleu needs bleu_sentences > 0")
        for name in ("bpe_dropout", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        for name in ("vocab_size", "context", "max_tokens", "eval_every", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')}={getattr(self, name)} must be at "
                                  "least 1")
        if self.average_last < 0:
            raise ConfigError(f"average-last={self.average_last} must not be negative")
        if self.max_steps is None and self.time_limit is None:
            raise ConfigError("give max_steps or a time limit")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranslateSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TranslateResult:
    """What a run did: the model (best, or averaged), and its validation figures."""

    model: Translator
    tokenizer: Tokenizer
    out: Path | None
    step: int
    best: dict[str, float] | None
    best_step: int
    final: dict[str, float]
    train_pairs: int
    skipped: dict[str, int]
    wall_s: float
    stopped_by: str | None
    averaged: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def build_translator(s: TranslateSettings, vocab_size: int, pad: int, bos: int,
                     eos: int) -> Translator:
    """A fresh model for the settings, sized to the tokenizer."""
    if s.family == "rnn":
        return RNNTranslator(RNNConfig(
            vocab_size=vocab_size, cell=s.rnn_cell, attention=s.attention, d_embed=s.d_embed,
            d_hidden=s.d_hidden, n_layers=s.n_layers or (1 if s.attention else 2),
            dropout=0.3 if s.dropout is None else s.dropout, max_seq_len=s.context,
            reverse_source=s.reverse_source,
            pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, decoder_start_token_id=bos))
    overrides: dict[str, Any] = {k: v for k, v in (("n_layers", s.n_layers),
                                                    ("d_model", s.d_model),
                                                    ("n_heads", s.n_heads),
                                                    ("norm_placement", s.norm_placement),
                                                    ("dropout", s.dropout)) if v is not None}
    cfg = get_preset(s.preset, **overrides)
    if cfg.family != "encoder-decoder":
        raise ConfigError(f"preset {s.preset!r} is a {cfg.family}; translation needs an "
                          "encoder-decoder preset")
    cfg = cfg.replace(vocab_size=vocab_size, max_seq_len=max(cfg.max_seq_len, s.context),
                      pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                      decoder_start_token_id=bos)
    return Transformer(cfg)


def starting_point(s: TranslateSettings, train: ParallelData, resumed: Path | None,
                   device: torch.device) -> tuple[Translator | None, Tokenizer]:
    """(the translator `s.init` names, or None for a new one; the tokenizer): with --init its
    own, else that of the run being resumed (`resumed`), else a new one learnt from `train`."""
    if s.init is not None:  # fine-tuning: the translator's own weights and vocabulary
        model, tokenizer = load_translator(s.init, device)
        family = "rnn" if isinstance(model, RNNTranslator) else "encoder-decoder"
        if family != s.family:
            raise ConfigError(f"--init {s.init} is a {family} translator, not --family "
                              f"{s.family}")
        return model, tokenizer
    if resumed is not None and (resumed / TOKENIZER).is_file():
        return None, Tokenizer.load(resumed / TOKENIZER)
    return None, joint_tokenizer(train, s.vocab_size)


def read_splits(s: TranslateSettings) -> tuple[ParallelData, ParallelData, str]:
    """(train, validation, where validation came from)."""
    train = read_parallel(s.data, s.src, s.tgt, "train")
    if has_split(s.data, s.src, s.tgt, "val"):
        return train, read_parallel(s.data, s.src, s.tgt, "val"), "val"
    if has_split(s.data, s.src, s.tgt, "dev"):
        return train, read_parallel(s.data, s.src, s.tgt, "dev"), "dev"
    held = min(s.val_pairs, max(1, len(train) // 10))
    rest, val = hash_split(train, held)
    return rest, val, f"{held} pairs held out by hash"


def evaluation(model: Translator, val: Pairs, val_texts: ParallelData, tokenizer: Tokenizer,
               s: TranslateSettings, pad: int, precision: str) -> dict[str, float]:
    """Validation loss (plain cross-entropy per target token) and greedy BLEU on the first
    `bleu_sentences` validation pairs."""
    device = model_device(model)
    total, tokens = 0.0, 0
    lengths = [len(a) + len(b) for a, b in zip(val.src, val.tgt, strict=True)]
    for rows in sorted_batches(lengths, max(1, s.max_tokens // max(lengths, default=1))):
        src, src_mask, tgt, tgt_mask = (t.to(device) for t in collate(val, rows, pad))
        logits = model(src, tgt[:, :-1], src_mask=src_mask, tgt_mask=tgt_mask[:, :-1])
        n = int(tgt_mask[:, 1:].sum())
        total += float(label_smoothed_loss(logits, tgt[:, 1:], pad, 0.0)) * n
        tokens += n
    metrics = {"val_loss": total / max(1, tokens)}
    if s.bleu_sentences:
        n = min(s.bleu_sentences, len(val_texts))
        hyps = translate(model, tokenizer, val_texts.src[:n], beam_size=1,
                         max_length_ratio=s.max_length_ratio, precision=precision)
        metrics["val_bleu"] = bleu_scores(hyps, val_texts.tgt[:n])["bleu"]
    return metrics


def train_translation(s: TranslateSettings, out: str | Path | None = None, resume: bool = False,
                      callback: Callable[[dict[str, Any]], None] | None = None
                      ) -> TranslateResult:
    """Train a translator (see the module docstring); the best (or averaged) model is returned
    and, with `out`, saved there with its tokenizer and decoding defaults."""
    s.check()
    if launched():  # N copies would each train alone and write the same files
        raise InputError(TRANSLATION_ONE_PROCESS)
    t0 = time.perf_counter()
    say = printer(s.progress, "train")
    out = Path(out) if out is not None else None
    device = resolve_device(s.device)
    if device.type == "cpu":
        set_threads(s.threads)
    # "auto": bf16 where the device computes it natively. The recurrent cells gain too: oneDNN
    # runs nn.LSTM / nn.GRU in bf16 under autocast (an LSTM update 1.4x faster on one core).
    precision = resolve_precision(s.precision, device)
    torch.manual_seed(s.seed)

    train_data, val_data, val_from = read_splits(s)
    if s.max_train_pairs is not None and s.max_train_pairs < len(train_data):
        # the same subset whatever the seed, so that runs of different seeds share the data
        # (and the tokenizer learned from it: an ensemble of them is possible)
        chosen = random.Random(0).sample(range(len(train_data)), s.max_train_pairs)
        train_data = train_data.subset(sorted(chosen))
    start, tokenizer = starting_point(s, train_data, out if resume else None, device)
    context = s.context if start is None else min(s.context, start.config.max_seq_len)
    pad, bos, eos = translation_ids(tokenizer)
    train_pairs = encode_pairs(train_data, tokenizer, context)
    val_pairs = encode_pairs(val_data, tokenizer, context, skip_long=False)
    report = ParallelData([], [], skipped=train_pairs.skipped).skipped_report()
    say(f"{len(train_pairs):,} training pairs ({s.src}->{s.tgt}), {len(val_pairs):,} for "
        f"validation ({val_from}); vocabulary {tokenizer.vocab_size:,}"
        + (f"; {report}" if report else ""))

    model = start if start is not None else \
        build_translator(s, tokenizer.vocab_size, pad, bos, eos).to(device)
    say(f"{s.family} model, {model.num_parameters() / 1e6:.1f}M parameters, {precision}"
        + (f", from {s.init}" if s.init is not None else ""))
    if s.lora_rank is not None and isinstance(model, Transformer):  # (check(): not an RNN)
        apply_lora(model, s.lora_rank, s.lora_alpha, s.lora_targets)
        print(f"qkv train: LoRA rank {s.lora_rank} on {s.lora_targets}; "
              f"{describe_trainable(model)}", file=sys.stderr)
    batches = TokenBatches(train_pairs, s.max_tokens, pad, s.seed,
                           _epoch_sampler(s, train_data, tokenizer, context))
    best = [("val_bleu", "max"), ("val_loss", "min")] if s.best == "bleu" else \
        [("val_loss", "min")]
    objective = Objective(
        batches=batches,
        loss=lambda m, batch: translation_loss(m, batch, pad, s.label_smoothing),
        evaluate=lambda m: evaluation(m, val_pairs, val_data, tokenizer, s, pad, precision),
        best=best, unit="tokens", count=lambda batch: int(batch[3].sum()),
        weight=lambda batch: float((batch[2][:, 1:] != pad).sum()),  # the targets the loss means
        progress=lambda: {"epoch": round(batches.progress, 3)})
    optimizer = make_optimizer(model, s.lr, s.weight_decay, betas=(0.9, 0.98),
                               fused=device.type in ("cpu", "cuda"))
    schedule = Schedule(s.lr, s.warmup_steps, s.lr / 10 if s.min_lr is None else s.min_lr,
                        decay=s.decay)
    loop = LoopConfig(max_steps=s.max_steps, schedule=schedule, time_limit=s.time_limit,
                      grad_accum=s.grad_accum, grad_clip=s.grad_clip, eval_every=s.eval_every,
                      log_every=s.log_every, eval_cost=20.0, device=device, precision=precision,
                      compile=s.compile, progress=s.progress, name="train")

    snapshots = Snapshots(s.average_last, out / AVERAGING if out is not None else None)
    if out is not None:
        _prepare_run_directory(out, resume, snapshots, model, tokenizer, s)

    def on_record(record: dict[str, Any]) -> None:
        if s.average_last and "val_loss" in record:
            snapshots.add(record["step"], model)
        if callback is not None:
            callback(record)

    model.train()
    result = fit(model, optimizer, objective, loop, out, resume,
                 {"settings": asdict(s)}, on_record)
    model.eval()
    if out is not None:
        load_weights(model, out / WEIGHTS)  # type: ignore[arg-type]
    elif result.best_state is not None:
        model.load_state_dict(result.best_state)
    averaged = 0
    if s.average_last and snapshots.steps():
        averaged = len(snapshots.steps())
        missing, unexpected = model.load_state_dict(snapshots.average(), strict=False)
        if set(missing) - set(model.tied_weights()) or unexpected:  # cannot happen
            raise RuntimeError(f"averaging: missing {missing}, unexpected {unexpected}")
        if out is not None:
            (out / WEIGHTS).replace(out / "best.safetensors")  # the single best, kept
            save_weights(model, out / WEIGHTS, model.tied_weights())
    if out is not None and s.lora_rank is not None and isinstance(model, Transformer):
        save_adapter(model, out, base=s.init)  # the run directory is an adapter
    with evaluating(model), autocast(device, precision):
        final = evaluation(model, val_pairs, val_data, tokenizer, s, pad, precision)
    return TranslateResult(
        model=model, tokenizer=tokenizer, out=out, step=result.step, best=result.best,
        best_step=result.best_step, final=final, train_pairs=len(train_pairs),
        skipped=dict(train_pairs.skipped), wall_s=round(time.perf_counter() - t0, 1),
        stopped_by=result.stopped_by, averaged=averaged, history=result.history)


def _epoch_sampler(s: TranslateSettings, train: ParallelData, tokenizer: Tokenizer,
                   context: int) -> Callable[[int], Pairs] | None:
    """With BPE-dropout, each epoch's training pairs segmented anew from that epoch's own
    seeded draw (so a resumed run reads what it would have read); None without."""
    if not s.bpe_dropout:
        return None

    def resample(epoch: int) -> Pairs:
        rng = random.Random(f"bpe-dropout {s.seed} {epoch}")
        return encode_pairs(train, tokenizer, context, bpe_dropout=s.bpe_dropout, rng=rng)
    return resample


def _prepare_run_directory(out: Path, resume: bool, snapshots: Snapshots, model: Translator,
                           tokenizer: Tokenizer, s: TranslateSettings) -> None:
    """config.json, tokenizer.json, translation.json; the averaging snapshots of an earlier
    run go (or, on resume, those written after the checkpoint)."""
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        folder = find_training_checkpoint(out)
        if folder is not None:
            snapshots.forget_after(read_state(folder)["step"])
    else:
        snapshots.forget_after(-1)
    if s.lora_rank is None:  # a LoRA run saves an adapter instead (train_translation)
        model.config.to_json(out / CONFIG)
    tokenizer.save(out / TOKENIZER)
    (out / DECODING).write_text(_decoding_json(s))


def _decoding_json(s: TranslateSettings) -> str:
    return json.dumps({"src": s.src, "tgt": s.tgt, "beam_size": s.beam_size,
                       "length_penalty": s.length_penalty,
                       "max_length_ratio": s.max_length_ratio}, indent=2) + "\n"


def bleu_of_files(model: Decoder, tokenizer: Any, src_file: str | Path,
                  ref_file: str | Path, beam_size: int = 5, length_penalty: float = 1.0,
                  max_length_ratio: float | None = 1.5, batch_size: int = 64,
                  precision: str = "fp32") -> tuple[dict[str, Any], list[str]]:
    """(scores, translations) of a source file against its reference file, line by line."""
    data = read_parallel_files(src_file, ref_file)
    hyps = translate(model, tokenizer, data.src, beam_size, length_penalty, max_length_ratio,
                     batch_size, precision=precision)
    return bleu_scores(hyps, data.tgt), hyps


def read_parallel_files(src_file: str | Path, ref_file: str | Path) -> ParallelData:
    """Source and reference lines, which must align; no pair may be skipped for scoring."""
    data = read_aligned(src_file, ref_file)
    if data.skipped:
        raise InputError(f"{src_file} / {ref_file}: {data.skipped_report()}; every line of "
                         "a test set must be scored")
    return data

