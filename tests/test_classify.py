"""Classification fine-tuning: reading labelled files, the head, learning, errors, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

import qkv
from conftest import same_weights, tiny_encoder
from qkv.batching import bucketed_batches
from qkv.cli import main
from qkv.data import label_order, read_labelled
from qkv.errors import InputError
from qkv.tasks.classify import (
    ClassifySettings,
    accuracy_and_macro_f1,
    finetune_classifier,
    predict_proba,
    with_classifier,
)
from qkv.train import read_log

NOUNS = "film movie plot cast story acting music script ending scene".split()


def reviews(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Texts that contain "good" (label 1) or "bad" (label 0), and otherwise random words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        good = rng.random() < 0.5
        a, b = rng.sample(NOUNS, 2)
        texts.append(f"the {a} was {'good' if good else 'bad'} and so was the {b}")
        labels.append("1" if good else "0")
    return texts, labels


@pytest.fixture(scope="module")
def tok() -> qkv.Tokenizer:
    return qkv.Tokenizer.train(reviews(100)[0], kind="wordpiece", vocab_size=100)


def write_tsv(path, texts, labels, header="sentence\tlabel"):
    rows = "".join(f"{t} \t{y}\n" for t, y in zip(texts, labels, strict=True))
    path.write_text(header + "\n" + rows, encoding="utf-8")
    return path


FAST = dict(epochs=3, batch_size=16, lr=2e-3, progress=False, precision="fp32")


# ---------------------------------------------------------------------------- reading files


def test_read_tsv_csv_jsonl(tmp_path):
    tsv = write_tsv(tmp_path / "a.tsv", ["great \"fun\"", "dull"], ["1", "0"])
    data = read_labelled(tsv)
    assert data.texts == ['great "fun"', "dull"] and data.labels == ["1", "0"]
    assert data.lines == [2, 3]
    (tmp_path / "b.csv").write_text('label,review\npos,"good, really"\nneg,bad\n')
    data = read_labelled(tmp_path / "b.csv", text_column="review")
    assert data.texts == ["good, really", "bad"] and data.labels == ["pos", "neg"]
    (tmp_path / "c.jsonl").write_text('{"text": "nice", "y": 1}\n\n{"text": "meh", "y": 0}\n')
    data = read_labelled(tmp_path / "c.jsonl", text_column="text", label_column="y")
    assert data.texts == ["nice", "meh"] and data.labels == ["1", "0"] and data.lines == [1, 3]


def test_label_order_is_numeric_for_integers():
    assert label_order(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_order(["pos", "neg", "neutral"]) == ["neg", "neutral", "pos"]


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ("sentence\tlabel\n", {}, "has no examples"),
        ("text\tstars\nfine\t1\n", {}, "no 'sentence' column; the columns are: text, stars"),
        ("sentence\tstars\nfine\t1\n", {}, "no 'label' column; the columns are: sentence, stars"),
        ("sentence\tlabel\nfine\n", {}, "line 2 has 1 fields"),
        ("sentence\tlabel\nfine\t\n", {}, "label is empty"),
    ],
)
def test_bad_files(tmp_path, content, kwargs, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_labelled(path, **kwargs)


def test_missing_file_invalid_utf8_unknown_type(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_labelled(tmp_path / "nope.tsv")
    (tmp_path / "latin1.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(InputError, match=r"not valid UTF-8 text \(line 2\)"):
        read_labelled(tmp_path / "latin1.tsv")
    (tmp_path / "data.xml").write_text("<x/>")
    with pytest.raises(InputError, match="unknown file type"):
        read_labelled(tmp_path / "data.xml")
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": "b"}\n')
    with pytest.raises(InputError, match="line 2: no 'label' key; the keys are: sentence"):
        read_labelled(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------------------- the model


def test_with_classifier_keeps_the_body(tok):
    model = tiny_encoder(tok).eval()
    clf = with_classifier(model, ["neg", "pos"]).eval()
    assert clf.config.labels == ["neg", "pos"] and clf.classifier.out_features == 2
    ids = torch.tensor([tok.encode("the film was good")])
    torch.testing.assert_close(clf.encode(ids), model.encode(ids))
    assert model.classifier is None  # the original is untouched
    gpt = qkv.Transformer(qkv.ModelConfig(family="decoder", vocab_size=50, d_model=32,
                                          n_layers=1, n_heads=4))
    assert with_classifier(gpt, ["a", "b", "c"]).config.pooling == "last"
    with pytest.raises(InputError, match="at least two classes"):
        with_classifier(model, ["only"])


def test_metrics():
    acc, f1 = accuracy_and_macro_f1([0, 0, 1, 1], [0, 1, 1, 1])
    assert acc == 0.75
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 2, fp 0, fn 1 -> 4/5
    assert abs(f1 - (2 / 3 + 4 / 5) / 2) < 1e-12


def test_bucketed_batches_cover_everything_once():
    lengths = [random.Random(i).randint(1, 50) for i in range(1000)]
    batches = bucketed_batches(lengths, 32, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread / len(batches) < 5  # rows of a batch have similar lengths


# ---------------------------------------------------------------------------- learning


def test_encoder_learns_a_separable_task(tok):
    train, dev = reviews(256, seed=1), reviews(64, seed=2)
    result = finetune_classifier(tiny_encoder(tok), tok, train, dev,
                                 ClassifySettings(**FAST, label_names=["negative", "positive"]))
    assert result.labels == ["negative", "positive"]
    assert result.best_accuracy >= 0.95, result.history
    assert result.train_examples == 256 and result.steps == 3 * 16 and len(result.history) == 3
    probs = predict_proba(result.model, tok, ["the plot was good", "the cast was bad"])
    assert probs.shape == (2, 2) and probs[0, 1] > 0.5 > probs[1, 1]


def test_decoder_learns_with_last_token_pooling():
    texts, labels = reviews(256, seed=3)
    tok = qkv.Tokenizer.train(texts, kind="bpe", vocab_size=300)
    gpt = qkv.Transformer(qkv.ModelConfig(family="decoder", vocab_size=tok.vocab_size,
                                          d_model=32, n_layers=2, n_heads=4, max_seq_len=48))
    result = finetune_classifier(gpt, tok, (texts, labels), None, ClassifySettings(**FAST))
    assert result.evaluated_on == "train" and result.best_accuracy >= 0.95
    assert result.model.config.pooling == "last"


def test_a_time_limit_and_a_subset(tok):
    settings = ClassifySettings(**{**FAST, "epochs": 5}, max_train_examples=20, time_limit=0.0)
    result = finetune_classifier(tiny_encoder(tok), tok, reviews(64), None, settings)
    assert result.train_examples == 20 and result.stopped_by_time_limit and result.steps == 1
    assert result.stopped_by == "time limit" and len(result.history) == 1  # evaluated once


def test_a_one_step_schedule_does_not_divide_by_zero(tok):
    one_step = finetune_classifier(tiny_encoder(tok), tok, (["good", "bad"], ["1", "0"]), None,
                                   ClassifySettings(**{**FAST, "epochs": 1}))
    assert one_step.steps == 1  # warm-up == total


@pytest.mark.parametrize(("train", "dev", "options", "message"), [
    (reviews(64), (["hm"], ["maybe"]), {}, r"label 'maybe' does not occur .*\(labels: 0, 1\)"),
    (reviews(64), None, {"label_names": ["a", "b", "c"]}, "3 label names given"),
    ((["a", "b"], ["x", "x"]), None, {}, "at least two classes"),
    (([], []), None, {}, "no examples"),
    ((["a"], ["x", "y"]), None, {}, "1 texts but 2 labels"),
    (reviews(8), None, {"epochs": 0}, "epochs=0 must be at least 1"),
    (reviews(8), None, {"max_length": 1}, "max-length=1 must be at least 2"),
    (reviews(8), None, {"lr": 0.0}, "lr=0.0 must be positive"),
    (reviews(8), None, {"warmup": 1.0}, r"warmup=1.0 must be a fraction in \[0, 1\)"),
    (reviews(8), None, {"time_limit": -1.0}, "time-limit=-1.0 must be at least 0"),
    (reviews(8), None, {"precision": "fp8"}, "precision='fp8' is not one of"),
])
def test_bad_labels_and_settings_are_one_clear_error(tok, train, dev, options, message):
    with pytest.raises(InputError, match=message):
        finetune_classifier(tiny_encoder(tok), tok, train, dev,
                            ClassifySettings(**{**FAST, **options}))


def test_an_interrupted_fine_tuning_resumes_exactly(tok, tmp_path, interrupt_then_resume):
    train, dev = reviews(96, seed=6), reviews(32, seed=7)
    base = tiny_encoder(tok, dropout=0.1)  # dropout: the random state must be resumed too
    settings = ClassifySettings(**{**FAST, "epochs": 2}, eval_every=4)  # 6 steps per epoch

    def run(name, callback=None, resume=False):
        return finetune_classifier(base, tok, train, dev, settings, tmp_path / name,
                                   resume=resume, callback=callback)

    def log(name):
        return [(r["step"], r["train_loss"], r["dev_loss"], r["dev_accuracy"])
                for r in read_log(tmp_path / name)]

    full, cut, resumed = interrupt_then_resume(run, step=8)  # in the second epoch
    assert cut.steps == 8 and resumed.steps == full.steps == 12
    assert [r[0] for r in log("full")] == [4, 6, 8, 12]  # every 4 steps and each epoch's end
    assert log("cut") == log("full")
    assert same_weights(resumed.model, full.model)  # the best model, reloaded
    assert resumed.best_step == full.best_step


# ---------------------------------------------------------------------------- the CLI


def test_cli_finetune_then_classify(tok, tmp_path, capsys):
    qkv.save(tiny_encoder(tok), tok, tmp_path / "base")
    write_tsv(tmp_path / "train.tsv", *reviews(256, seed=4))
    write_tsv(tmp_path / "dev.tsv", *reviews(64, seed=5))
    out = tmp_path / "clf"
    code = main(["finetune", "classify", "--model", str(tmp_path / "base"),
                 "--train", str(tmp_path / "train.tsv"), "--dev", str(tmp_path / "dev.tsv"),
                 "--label-names", "negative,positive", "--epochs", "3", "--batch-size", "16",
                 "--lr", "2e-3", "--precision", "fp32", "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["best_accuracy"] >= 0.95
    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == ["negative", "positive"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and {"step", "dev_accuracy", "dev_macro_f1"} <= set(log[0])
    assert [r["epoch"] for r in log] == [1.0, 2.0, 3.0]  # evaluated at each epoch's end

    assert main(["classify", str(out), "the music was good", "the plot was bad"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("positive ") and lines[1].startswith("negative ")


def test_cli_errors(tok, tmp_path, capsys):
    qkv.save(tiny_encoder(tok), tok, tmp_path / "base")
    write_tsv(tmp_path / "train.tsv", *reviews(16))
    write_tsv(tmp_path / "dev.tsv", ["odd"], ["2"])
    args = ["finetune", "classify", "--model", str(tmp_path / "base"), "--out",
            str(tmp_path / "out"), "--no-progress", "--train", str(tmp_path / "train.tsv")]
    assert main(args + ["--label-column", "stars"]) == 2
    assert "no 'stars' column; the columns are: sentence, label" in capsys.readouterr().err
    assert main(args + ["--dev", str(tmp_path / "dev.tsv")]) == 2
    assert "label '2' does not occur in the training data" in capsys.readouterr().err
    assert main(["classify", str(tmp_path / "base"), "text"]) == 2
    assert "no classification head" in capsys.readouterr().err
