"""`qkv.pipeline`: text in, answers out, in one line (the Hugging Face `pipeline` idea).

    clf = qkv.pipeline("sentiment-analysis", model="runs/sst2")
    clf("a gripping, beautifully acted film")     # [{"label": "positive", "score": 0.98}]
    clf(["great", "dull"])                        # one dict per text

    fill = qkv.pipeline("fill-mask", model="runs/bert")
    fill("Paris is the [MASK] of France.")        # [{"token_str": "capital", "score": ...}, ...]

    emb = qkv.pipeline("feature-extraction", model="all-MiniLM-L6-v2")
    emb(["a sentence", "another"])                # tensor (2, 384): one pooled vector per text

    gen = qkv.pipeline("text-generation", model="runs/gpt")
    gen("ROMEO:", max_new_tokens=50)              # [{"generated_text": "ROMEO: ..."}]

    mt = qkv.pipeline("translation", model="runs/de-en")
    mt("Ein Hund rennt.", beam_size=5)            # [{"translation_text": "A dog is running."}]

A pipeline owns a model and its tokenizer, and does the rest: tokenizing, truncating to the
model's max_seq_len, batching (by similar length), switching dropout off, and turning scores
into labels. Outputs follow Hugging Face's shapes: a single string gives the result for that
string, a list gives a list of results.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .embeddings import encode_sentences
from .errors import InputError
from .generate import generate
from .hardware import resolve_precision
from .tasks.classify import predict_proba
from .tasks.common import load_model
from .tasks.mlm import fill_mask_batch
from .tasks.translate import decoding_defaults, load_translator, translate

if TYPE_CHECKING:
    from .model import Transformer
    from .tokenizer import Tokenizer

TASK_ALIASES = {
    "sentiment-analysis": "text-classification",
    "text-classification": "text-classification",
    "fill-mask": "fill-mask",
    "feature-extraction": "feature-extraction",
    "embeddings": "feature-extraction",
    "text-generation": "text-generation",
    "translation": "translation",
}
#: The packaged sentiment model: a LoRA adapter + head for all-MiniLM-L6-v2, trained on SST-2
#: (benchmarks/make_sentiment_adapter.py; its model card is the README.md beside it).
SENTIMENT_ADAPTER = Path(__file__).resolve().parent / "data" / "adapters" / "sst2-minilm"
DEFAULT_MODELS: dict[str, str | Path] = {"feature-extraction": "all-MiniLM-L6-v2",
                                         "text-classification": SENTIMENT_ADAPTER}


def pipeline(task: str, model: str | Path | tuple | Transformer | None = None,
             tokenizer: Tokenizer | None = None, device: str | torch.device = "cpu",
             batch_size: int = 32, precision: str = "fp32") -> Pipeline:
    """A ready-to-call pipeline for `task`.

    task: "sentiment-analysis" / "text-classification", "fill-mask", "feature-extraction",
        "text-generation", or "translation" (an encoder-decoder, or an RNN of qkv.baselines).
    model: a model directory, a name ("all-MiniLM-L6-v2"), a (model, tokenizer) pair, or a
        Transformer (then pass `tokenizer`). feature-extraction defaults to all-MiniLM-L6-v2;
        sentiment-analysis to all-MiniLM-L6-v2 with the packaged SST-2 adapter (offline).
    precision: "fp32" (exact), "bf16" (faster on CPUs with AMX), or "auto".
    """
    if task not in TASK_ALIASES:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASK_ALIASES)}")
    kind = TASK_ALIASES[task]
    if model is None:
        model = DEFAULT_MODELS.get(kind)
        if model is None:
            raise InputError(f"pipeline({task!r}) needs a model: pass model=DIRECTORY")
        if model == SENTIMENT_ADAPTER and not SENTIMENT_ADAPTER.is_dir():
            raise InputError(f"the packaged sentiment model is missing ({SENTIMENT_ADAPTER}); "
                             "reinstall qkv, or pass model=DIRECTORY")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size} must be at least 1")
    if kind == "translation":
        return TranslationPipeline.create(model, tokenizer, device, batch_size,
                                          resolve_precision(precision, device))
    net, tok = load_model(model, tokenizer, device)
    net.eval()
    cls = {"text-classification": TextClassificationPipeline, "fill-mask": FillMaskPipeline,
           "feature-extraction": FeatureExtractionPipeline,
           "text-generation": TextGenerationPipeline}[kind]
    return cls(net, tok, task, batch_size, resolve_precision(precision, device))


class Pipeline:
    """A model, its tokenizer and one task; call it on a string or a list of strings."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, task: str, batch_size: int,
                 precision: str) -> None:
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.batch_size, self.precision = batch_size, precision
        self.check()

    def check(self) -> None:
        """Raise InputError if the model cannot do this task."""

    def __call__(self, inputs: Any, **options: Any) -> Any:
        """Run the task on a string or a list of strings (each subclass does its task)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(task={self.task!r}, family={self.model.config.family}, "
                f"precision={self.precision})")


def _texts(inputs: str | Sequence[str], what: str = "text") -> tuple[list[str], bool]:
    """(list of texts, whether a single string was given)."""
    if isinstance(inputs, str):
        return [inputs], True
    if not isinstance(inputs, (list, tuple)):
        raise InputError(f"expected a {what} or a list of them, got {type(inputs).__name__}")
    if len(inputs) == 0:
        raise InputError(f"got an empty list; pass at least one {what}")
    for x in inputs:
        if not isinstance(x, str):
            raise InputError(f"every {what} must be a str, got {type(x).__name__}")
    return list(inputs), False


class TextClassificationPipeline(Pipeline):
    """Label + probability per text, from a model fine-tuned with `qkv finetune classify`."""

    def check(self) -> None:
        if not self.model.config.labels:
            raise InputError("this model has no classification head (its config has no labels);"
                             " fine-tune one with `qkv finetune classify`")

    def __call__(self, inputs: str | Sequence[str], top_k: int | None = 1) -> list[Any]:
        """top_k=1: one {"label", "score"} per text; top_k=k or None (all): a ranked list.

        A single string gives [result]; a list gives one result per text (with top_k=1 the
        result is a dict, otherwise a list of dicts).
        """

        texts, single = _texts(inputs)
        labels = self.model.config.labels
        k = len(labels) if top_k is None else top_k
        if k < 1:
            raise InputError(f"top_k={top_k} must be at least 1")
        probs = predict_proba(self.model, self.tokenizer, texts, self.batch_size,
                              precision=self.precision)  # (N, num_labels)
        scores, order = probs.topk(min(k, len(labels)), dim=-1)
        ranked = [[{"label": labels[i], "score": s} for s, i in
                   zip(srow.tolist(), irow.tolist(), strict=True)]
                  for srow, irow in zip(scores, order, strict=True)]
        if single:
            return ranked[0]
        return [r[0] for r in ranked] if top_k == 1 else ranked


class FillMaskPipeline(Pipeline):
    """The most likely tokens for each [MASK] of a text (an encoder with a masked-LM head)."""

    def check(self) -> None:
        if self.model.config.family != "encoder":
            raise InputError(f"fill-mask needs an encoder, not a {self.model.config.family} "
                             "model")
        if self.tokenizer.mask_id is None:
            raise InputError("fill-mask needs a tokenizer with a [MASK] token")

    def __call__(self, inputs: str | Sequence[str], top_k: int = 5) -> list[Any]:
        """For one text with one [MASK]: a list of top_k {"token", "token_str", "score",
        "sequence"}; with several [MASK]s: one such list per [MASK]. A list of texts gives one
        such result per text."""

        texts, single = _texts(inputs)
        results = fill_mask_batch(self.model, self.tokenizer, texts, top_k, self.batch_size)
        shaped = [r[0] if len(r) == 1 else r for r in results]
        return shaped[0] if single else shaped


class FeatureExtractionPipeline(Pipeline):
    """One pooled vector per text (config.pooling; unit length if the model normalises)."""

    def __call__(self, inputs: str | Sequence[str],
                 normalize: bool | None = None) -> torch.Tensor:
        """A (d_model,) tensor for a string, (N, d_model) for a list of strings."""

        texts, single = _texts(inputs)
        vectors = encode_sentences(self.model, self.tokenizer, texts,
                                   batch_size=self.batch_size, precision=self.precision,
                                   normalize=normalize)
        return vectors[0] if single else vectors


class TextGenerationPipeline(Pipeline):
    """Continue a prompt with `qkv.generate` (a decoder: GPT, Llama)."""

    def check(self) -> None:
        if self.model.config.family != "decoder":
            raise InputError(f"text-generation needs a decoder model, not an "
                             f"{self.model.config.family} one")

    def __call__(self, inputs: str | Sequence[str], max_new_tokens: int = 50,
                 temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, stop: str | Sequence[str] | None = None,
                 seed: int | None = None, return_full_text: bool = True) -> list[Any]:
        """[{"generated_text": ...}] for a prompt; one such list per prompt for a list.

        return_full_text: the prompt followed by its continuation (True), or the continuation.
        """

        prompts, single = _texts(inputs, "prompt")
        new = generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, stop=stop, seed=seed)
        results = [[{"generated_text": prompt + text if return_full_text else text}]
                   for prompt, text in zip(prompts, new, strict=True)]
        return results[0] if single else results


class TranslationPipeline(Pipeline):
    """Translate with an encoder-decoder (qkv.tasks.translate): beam search, in batches."""

    @classmethod
    def create(cls, model: Any, tokenizer: Tokenizer | None, device: str | torch.device,
               batch_size: int, precision: str) -> TranslationPipeline:
        defaults: dict[str, Any] = {}
        if isinstance(model, (str, Path)):
            defaults = decoding_defaults(model)
            net, tok = load_translator(model, device)
            tok = tokenizer if tokenizer is not None else tok
        else:
            net, tok = (model if isinstance(model, tuple) else (model, tokenizer))
            if tok is None:
                raise InputError("a tokenizer is needed to turn text into token ids")
        pipe = cls(net.to(device).eval(), tok, "translation",  # type: ignore[arg-type]
                   batch_size, precision)
        pipe.defaults = defaults
        return pipe

    def check(self) -> None:
        if self.model.config.family not in ("encoder-decoder", "rnn"):
            raise InputError(f"translation needs an encoder-decoder model, not a "
                             f"{self.model.config.family} one")
        self.defaults: dict[str, Any] = {}

    def __call__(self, inputs: str | Sequence[str], beam_size: int | None = None,
                 length_penalty: float | None = None,
                 max_length_ratio: float | None = None) -> list[Any]:
        """[{"translation_text": ...}] for a text; one such dict per text for a list."""
        texts, single = _texts(inputs)
        d = self.defaults
        out = translate(self.model, self.tokenizer, texts,
                        beam_size=beam_size or d.get("beam_size", 5),
                        length_penalty=(length_penalty if length_penalty is not None
                                        else d.get("length_penalty", 1.0)),
                        max_length_ratio=max_length_ratio or d.get("max_length_ratio", 1.5),
                        batch_size=self.batch_size, precision=self.precision)
        results = [{"translation_text": t} for t in out]
        return [results[0]] if single else results
