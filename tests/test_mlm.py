"""Masked-LM pieces: BERT masking statistics, the loss, fill-mask, and `qkv fill-mask`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qkv
from conftest import tiny_encoder
from qkv.cli import main
from qkv.errors import InputError
from qkv.tasks.mlm import (
    IGNORE_INDEX,
    MLMBatches,
    fill_mask,
    mask_fixed_batches,
    mask_tokens,
    mlm_batch,
    mlm_loss,
    mlm_metrics,
    special_token_ids,
)

CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the rug",
    "a bird flew over the house",
    "transformers changed natural language processing",
    "attention is all you need",
] * 4


@pytest.fixture(scope="module")
def tok() -> qkv.Tokenizer:
    return qkv.Tokenizer.train(CORPUS, kind="wordpiece", vocab_size=120)


def test_masking_statistics():
    """15% of the ordinary tokens are chosen; 80% [MASK], 10% random, 10% kept."""
    vocab, mask_id, specials = 1000, 4, [0, 1, 2, 3, 4]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (512, 128), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    lengths = torch.randint(20, 129, (512,), generator=g)
    attention = (torch.arange(128)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(attention == 0, 0)  # padding
    masked, labels = mask_tokens(ids, special_ids=specials, mask_id=mask_id, vocab_size=vocab,
                                 attention_mask=attention, generator=g)
    allowed = (attention == 1) & ~torch.isin(ids, torch.tensor(specials))
    chosen = labels != IGNORE_INDEX
    # never special tokens or padding; labels are the original ids exactly where chosen
    assert not (chosen & ~allowed).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    frac = chosen.sum().item() / allowed.sum().item()
    assert abs(frac - 0.15) < 0.01, frac
    n = chosen.sum().item()
    to_mask = (masked[chosen] == mask_id).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    replaced = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(replaced - 0.1) < 0.015
    # random replacements are ordinary tokens, never a special one
    assert not torch.isin(masked[chosen & (masked != ids) & (masked != mask_id)],
                          torch.tensor(specials)).any()


def test_masking_is_reproducible_and_needs_a_mask_token(tok):
    ids = torch.randint(5, tok.vocab_size, (4, 16))
    a = mask_tokens(ids, tok, generator=torch.Generator().manual_seed(1))
    b = mask_tokens(ids, tok, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(InputError, match="MASK"):
        mask_tokens(ids, special_ids=[0], vocab_size=50)
    with pytest.raises(InputError, match="mlm_probability"):
        mask_tokens(ids, tok, mlm_probability=1.5)


def test_special_ids_of_a_wordpiece_tokenizer(tok):
    assert set(special_token_ids(tok)) == {tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id,
                                           tok.mask_id}


def test_mlm_loss_equals_full_cross_entropy(tok):
    model = tiny_encoder(tok)
    batch = mlm_batch(CORPUS[:8], tok, generator=torch.Generator().manual_seed(0),
                      mlm_probability=0.3)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    loss = mlm_loss(model, batch)
    logits = model(batch["input_ids"], padding_mask=batch["attention_mask"])
    full = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                           ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert model.token_embedding.weight.grad is not None


class Windows:
    """A stand-in for a next-token batch stream: (x, y) windows and a JSON state."""

    def __init__(self, vocab: int):
        self.vocab, self.drawn = vocab, 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.drawn)
        self.drawn += 1
        w = torch.randint(5, self.vocab, (4, 17), generator=g)
        return w[:, :-1], w[:, 1:]

    def state_dict(self):
        return {"drawn": self.drawn}

    def load_state_dict(self, state):
        self.drawn = state["drawn"]


def test_mlm_batches_plug_into_a_next_token_loop(tok):
    """(masked x, labels) through the usual next-token loss is the masked-LM loss."""
    stream = MLMBatches(Windows(tok.vocab_size), tok, seed=3)
    x, labels = next(stream)
    assert x.shape == labels.shape == (4, 16) and (labels != IGNORE_INDEX).any()
    model = tiny_encoder(tok)
    generic = F.cross_entropy(model(x).flatten(0, 1), labels.flatten())  # ignores -100
    torch.testing.assert_close(generic, mlm_loss(model, {"input_ids": x, "labels": labels}))
    state = stream.state_dict()
    assert state == {"seed": 3, "drawn": 1, "batches": {"drawn": 1}}
    after = [next(stream) for _ in range(2)]
    resumed = MLMBatches(Windows(tok.vocab_size), tok)
    resumed.load_state_dict(state)
    for (a, la), (b, lb) in zip(after, [next(resumed) for _ in range(2)], strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    fixed = [next(Windows(tok.vocab_size)) for _ in range(2)]
    once, again = mask_fixed_batches(fixed, tok), mask_fixed_batches(fixed, tok)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(once, again, strict=True))


def test_mlm_training_learns_to_fill_in(tok):
    """A few hundred steps on a tiny corpus: the model predicts the hidden word."""
    torch.manual_seed(0)
    model = tiny_encoder(tok, d_model=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(150):
        loss = mlm_loss(model, mlm_batch(CORPUS, tok, generator=g, mlm_probability=0.25))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 2
    best = fill_mask(model, tok, "attention is all you [MASK]", top_k=3)[0]
    assert best[0]["token_str"] == "need"
    assert mlm_metrics(model, mlm_batch(CORPUS, tok, generator=g))["accuracy"] > 0.5


def test_fill_mask_output_shapes(tok):
    model = tiny_encoder(tok)
    one = fill_mask(model, tok, "the [MASK] sat on the mat", top_k=4)
    assert len(one) == 1 and len(one[0]) == 4
    scores = [c["score"] for c in one[0]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
    for c in one[0]:
        assert set(c) == {"token", "token_str", "score", "sequence"}
        assert c["token"] not in special_token_ids(tok)
        assert c["sequence"].endswith(" sat on the mat") and "[MASK]" not in c["sequence"]
    two = fill_mask(model, tok, "the [MASK] sat on the [MASK]", top_k=2)
    assert len(two) == 2 and all(len(c) == 2 for c in two)
    assert "[MASK]" in two[0][0]["sequence"]  # the other mask stays visible


def test_fill_mask_errors(tok):
    model = tiny_encoder(tok)
    with pytest.raises(InputError, match=r"no \[MASK\]"):
        fill_mask(model, tok, "the cat sat")
    with pytest.raises(InputError, match="at most 32"):
        fill_mask(model, tok, "the [MASK] " + "cat " * 40)
    decoder = qkv.Transformer(qkv.ModelConfig(family="decoder", vocab_size=tok.vocab_size,
                                              d_model=32, n_layers=1, n_heads=4))
    with pytest.raises(InputError, match="encoder"):
        fill_mask(decoder, tok, "the [MASK] sat")


def test_fill_mask_cli(tok, tmp_path, capsys):
    qkv.save(tiny_encoder(tok), tok, tmp_path / "bert")
    assert main(["fill-mask", str(tmp_path / "bert"), "the [MASK] sat on the mat",
                 "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].lstrip().startswith("1.")
    assert main(["fill-mask", str(tmp_path / "bert"), "no mask here"]) == 2
    assert "no [MASK] token" in capsys.readouterr().err
