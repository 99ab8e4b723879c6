"""Supervised fine-tuning data: question/answer pairs as token ids with a loss mask.

A JSONL file, one example per line, in any of three shapes:

    {"question": "What is the capital of Brazil?", "answer": "Brasília"}
    {"prompt": "Translate to French: cat ->", "completion": " chat"}
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

A question/answer pair is a two-turn conversation (user asks, assistant answers); conversations
are written as text by the model's chat template (qkv.chat), and the assistant turns are what
the model learns to produce. A prompt/completion pair is plain text: the prompt, then the
completion, then the end-of-text token when the tokenizer has one.

Each example becomes token ids and a mask that is 1 on the tokens the loss is taken on (the
answer, by default) and 0 on the context. Rows that cannot be used (a missing field, an empty
answer) are skipped and counted, with the line of the first one, never silently dropped.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..chat import ChatTemplate, check_messages
from ..errors import InputError
from ..tokenizer import Tokenizer
from .corpus import jsonl_values, read_text_file

#: The chat template of a model that brings none: a question and its answer, each on a line.
#:
#:     Question: What is the capital of Brazil?
#:     Answer: Brasília<eos>
#:
#: A system message is written first, as a line of its own. With add_generation_prompt the text
#: ends with "Answer:", so that the model writes the answer. <eos> is the tokenizer's
#: end-of-text token, where it has one.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}{{ 'Answer: ' + m.content + eos_token + '\n' }}"
    "{% elif m.role == 'user' %}{{ 'Question: ' + m.content + '\n' }}"
    "{% else %}{{ m.content + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"
)


def default_template(tokenizer: Tokenizer | None = None) -> ChatTemplate:
    """DEFAULT_CHAT_TEMPLATE, with the tokenizer's end-of-text token."""
    eos = (tokenizer.special_tokens.get("eos") or "") if tokenizer is not None else ""
    return ChatTemplate(DEFAULT_CHAT_TEMPLATE, eos_token=eos)


@dataclass
class SFTExample:
    """One example: chat messages, or a plain prompt and completion; `line` in its file."""

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    completion: str | None = None
    line: int = 0


@dataclass
class SFTData:
    """The usable examples of a file, and the rows skipped: {reason: count}, {reason: first
    line}."""

    examples: list[SFTExample]
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict[str, int] = field(default_factory=dict)
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.examples)

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] += 1
        self.first_skipped.setdefault(reason, line)

    def report(self) -> str | None:
        """"skipped 3 rows of data.jsonl: 2 with an empty answer (first at line 4), ..." or
        None when nothing was skipped."""
        if not self.skipped:
            return None
        reasons = ", ".join(f"{n} {reason} (first at line {self.first_skipped[reason]})"
                            for reason, n in self.skipped.most_common())
        return f"skipped {sum(self.skipped.values())} row(s) of {self.source}: {reasons}"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse_row(record: Any) -> tuple[SFTExample | None, str | None]:
    """(example, None), or (None, why the row cannot be used)."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if "messages" in record:
        try:
            messages = check_messages(record["messages"])
        except InputError:
            return None, "with malformed messages"
        turns = [m for m in messages if m["role"] == "assistant"]
        if not turns:
            return None, "with no assistant message"
        if any(not m["content"].strip() for m in turns):
            return None, "with an empty answer"
        return SFTExample(messages=messages), None
    for q_key, a_key in (("question", "answer"), ("prompt", "completion")):
        if q_key in record or a_key in record:
            question, answer = _text(record.get(q_key)), _text(record.get(a_key))
            if question is None or answer is None:
                return None, f"without a text {q_key!r} and {a_key!r}"
            if not answer.strip():
                return None, "with an empty answer"
            if q_key == "question":
                return SFTExample(messages=[{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}]), None
            return SFTExample(prompt=question, completion=answer), None
    return None, "without question/answer, prompt/completion or messages"


def read_sft(path: str | Path) -> SFTData:
    """Read a JSONL file of examples. Malformed JSON is an InputError naming the line; rows of
    the wrong shape are skipped and counted (SFTData.report); no usable row is an InputError."""
    path = Path(path)
    text = read_text_file(path)
    data = SFTData([], source=str(path))
    for number, record in jsonl_values(path, text):
        example, why = parse_row(record)
        if example is None:
            data.skip(f"row(s) {why}", number)
        else:
            example.line = number
            data.examples.append(example)
    if not data.examples:
        detail = f"; {data.report()}" if data.skipped else ""
        raise InputError(f"{path} holds no usable example{detail}")
    return data


# ---------------------------------------------------------------------- to token ids

@dataclass
class Encoded:
    """Token ids of examples and their loss masks (1: the loss is taken on this token)."""

    ids: list[list[int]]
    masks: list[list[int]]
    truncated: int = 0
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def encode_example(example: SFTExample, tokenizer: Tokenizer,
                   template: ChatTemplate) -> tuple[list[int], list[int]]:
    """(ids, mask) of one example; mask is 1 on the answer's tokens (and its end marker).

    The text is tokenized piece by piece (context, answer, context, ...) so that every token
    belongs to exactly one piece."""
    if example.messages is not None:
        text, spans = template.render_spans(example.messages)
    else:
        prompt, completion = example.prompt or "", example.completion or ""
        eos = tokenizer.special_tokens.get("eos") or ""
        text, spans = prompt + completion + eos, [(len(prompt), len(prompt + completion + eos))]
    ids: list[int] = []
    mask: list[int] = []
    at = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, flag in ((text[at:start], 0), (text[start:end], 1)):
            if piece:
                piece_ids = tokenizer.encode(piece, add_special_tokens=False)
                ids += piece_ids
                mask += [flag] * len(piece_ids)
        at = end
    return ids, mask


def encode_sft(data: SFTData | Sequence[SFTExample], tokenizer: Tokenizer,
               template: ChatTemplate, max_length: int, overlong: str = "truncate",
               loss_on: str = "completion") -> Encoded:
    """Every example as (ids, mask), at most `max_length` tokens.

    overlong: what happens to a longer example: "truncate" (its end is cut; skipped if no
        answer token is left) or "skip"; both are counted.
    loss_on: "completion" (the answers only) or "all" (every token of the text)."""
    if overlong not in ("truncate", "skip"):
        raise InputError(f"overlong={overlong!r} is not one of truncate, skip")
    if loss_on not in ("completion", "all"):
        raise InputError(f"loss_on={loss_on!r} is not one of completion, all")
    examples = data.examples if isinstance(data, SFTData) else list(data)
    out = Encoded([], [])
    for example in examples:
        ids, mask = encode_example(example, tokenizer, template)
        if len(ids) > max_length:
            if overlong == "skip":
                out.skipped += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask[1:]):  # the first token is never a target
                out.skipped += 1
                continue
            out.truncated += 1
        if loss_on == "all":
            mask = [1] * len(ids)
        if len(ids) < 2 or not any(mask[1:]):
            out.skipped += 1
            continue
        out.ids.append(ids)
        out.masks.append(mask)
    return out


# ---------------------------------------------------------------------- batches

def pack(lengths: Sequence[int], order: Sequence[int], max_length: int) -> list[list[int]]:
    """Greedy packing: examples, in `order`, are put one after another into rows of at most
    `max_length` tokens; a row is closed when the next example does not fit."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        rows.append(current)
    return rows


def make_batch(ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]],
               rows: Sequence[Sequence[int]], pad: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of rows, each the examples `rows[r]` one after another:

    inputs (B, T), targets (B, T) (the next token where the loss is taken, else -100),
    positions (B, T) (restarting at 0 for each example) and segments (B, T) (1, 2, ... for
    the examples of a row, 0 for padding), T the longest row less one."""
    seqs = []
    for row in rows:
        tokens, targets, positions, segments = [], [], [], []
        for n, i in enumerate(row, start=1):
            x, m = ids[i], masks[i]
            tokens += x[:-1]
            targets += [t if keep else -100 for t, keep in zip(x[1:], m[1:], strict=True)]
            positions += range(len(x) - 1)
            segments += [n] * (len(x) - 1)
        seqs.append((tokens, targets, positions, segments))
    T = max(len(s[0]) for s in seqs)
    out = torch.full((4, len(seqs), T), 0, dtype=torch.long)
    out[0].fill_(pad)
    out[1].fill_(-100)
    for b, seq in enumerate(seqs):
        for k in range(4):
            out[k, b, :len(seq[k])] = torch.tensor(seq[k], dtype=torch.long)
    return out[0], out[1], out[2], out[3]  # (B, T) each


class SFTBatches:
    """Training batches (inputs, targets, positions, segments), epoch after epoch, each epoch
    in a new random order. Without packing a batch holds `batch_size` examples; with packing
    `batch_size` rows of up to `max_length` tokens, each as many examples as fit. Resumable:
    the state is the epoch and the position in it (the order comes from seed + epoch)."""

    def __init__(self, encoded: Encoded, batch_size: int, pad: int, seed: int = 0,
                 packing: bool = False, max_length: int | None = None) -> None:
        if len(encoded) == 0:
            raise InputError("no training examples left to train on")
        self.encoded, self.batch_size, self.pad, self.seed = encoded, batch_size, pad, seed
        self.packing = packing
        self.max_length = max_length or max(len(x) for x in encoded.ids)
        self.epoch, self.index = 0, 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        order = list(range(len(self.encoded)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        if self.packing:
            rows = pack([len(x) - 1 for x in self.encoded.ids], order, self.max_length)
        else:
            rows = [[i] for i in order]
        self.batches = [rows[i:i + self.batch_size] for i in range(0, len(rows),
                                                                    self.batch_size)]

    def __iter__(self) -> SFTBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.index == len(self.batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._start_epoch()
        rows = self.batches[self.index]
        self.index += 1
        return make_batch(self.encoded.ids, self.encoded.masks, rows, self.pad)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._start_epoch()

    @property
    def per_epoch(self) -> int:
        return len(self.batches)
