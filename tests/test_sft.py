"""Supervised fine-tuning: data, chat template, completion-only loss, packing, the run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import qkv
from conftest import tiny_config
from qkv.cli import main as cli
from qkv.data.sft import (
    SFTBatches,
    SFTExample,
    default_template,
    encode_example,
    encode_sft,
    make_batch,
    read_sft,
)
from qkv.errors import InputError
from qkv.tasks.sft import SFTSettings, finetune_sft, sft_loss, template_for, token_losses

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ?:.,'\néáíóúãç"


@pytest.fixture(scope="module")
def tok() -> qkv.Tokenizer:
    return qkv.Tokenizer.train([ALPHABET], kind="char")


def _decoder(tok: qkv.Tokenizer, **kw) -> qkv.Transformer:
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=tok.vocab_size, max_seq_len=128, **kw)
    return qkv.Transformer(cfg).eval()


def _qa(q: str, a: str) -> SFTExample:
    return SFTExample(messages=[{"role": "user", "content": q},
                                {"role": "assistant", "content": a}])


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------- the template

def test_the_default_template_renders_the_documented_format(tok):
    template = default_template(tok)
    messages = [{"role": "user", "content": "Qual é a capital do Brasil?"},
                {"role": "assistant", "content": "Brasília"}]
    assert template.render(messages, add_generation_prompt=False) == (
        "Question: Qual é a capital do Brasil?\nAnswer: Brasília<|endoftext|>\n")
    assert template.render(messages[:1]) == "Question: Qual é a capital do Brasil?\nAnswer:"
    text, spans = template.render_spans(messages)
    assert [text[a:b] for a, b in spans] == [" Brasília<|endoftext|>\n"]


def test_a_template_stored_with_the_model_is_used(tok, tmp_path):
    source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": source}))
    template = template_for(tmp_path, tok)
    assert template.render([{"role": "user", "content": "hi"}]) == "<user>hi"
    assert template_for(tmp_path / "none", tok).source == default_template(tok).source


# ---------------------------------------------------------------------- data

def test_rows_of_every_shape_are_read_and_bad_rows_are_counted(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        {"question": "Capital of Brazil?", "answer": "Brasília"},
        {"prompt": "2+2=", "completion": "4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "oi"}]},
        {"question": "no answer"},
        {"question": "empty", "answer": "  "},
        {"text": "what?"},
        {"messages": [{"role": "user", "content": "alone"}]},
    ])
    data = read_sft(path)
    assert len(data) == 3 and [e.line for e in data.examples] == [1, 2, 3]
    assert sum(data.skipped.values()) == 4
    report = data.report()
    assert report is not None and "empty answer (first at line 5)" in report
    assert "line 4" in report and "line 6" in report and "line 7" in report


def test_malformed_json_and_files_without_examples_are_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        read_sft(_write(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}, "{oops"]))
    with pytest.raises(InputError, match="no usable example.*empty answer"):
        read_sft(_write(tmp_path / "b.jsonl", [{"question": "q", "answer": ""}]))
    with pytest.raises(InputError, match="does not exist"):
        read_sft(tmp_path / "missing.jsonl")
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 1 is nested too deeply"):
        read_sft(deep)


def test_overlong_examples_are_truncated_or_skipped_and_counted(tok):
    template = default_template(tok)
    examples = [_qa("short?", "yes"), _qa("a much longer question " * 4, "and its answer")]
    cut = encode_sft(examples, tok, template, max_length=40)
    assert (len(cut), cut.truncated, cut.skipped) == (1, 0, 1)  # no answer token would be left
    cut = encode_sft(examples, tok, template, max_length=115)  # the prompt is 110 tokens
    assert (len(cut), cut.truncated, cut.skipped) == (2, 1, 0)
    assert max(len(x) for x in cut.ids) == 115
    skipped = encode_sft(examples, tok, template, max_length=115, overlong="skip")
    assert (len(skipped), skipped.skipped) == (1, 1)


# ---------------------------------------------------------------------- the loss

def test_the_loss_is_the_cross_entropy_of_the_answer_tokens_only(tok):
    model = _decoder(tok)
    template = default_template(tok)
    ids, mask = encode_example(_qa("Capital of Brazil?", "Brasília"), tok, template)
    n_prompt = mask.index(1)
    assert n_prompt == len(tok.encode("Question: Capital of Brazil?\nAnswer:",
                                      add_special_tokens=False))
    assert all(mask[n_prompt:])
    batch = make_batch([ids], [mask], [[0]], tok.pad_id or 0)
    x, y = batch[0], batch[1]
    assert (y[0, :n_prompt - 1] == -100).all() and (y[0, n_prompt - 1:] != -100).all()
    with torch.no_grad():
        logits = model(x)
        want = F.cross_entropy(logits[0, n_prompt - 1:], torch.tensor(ids[n_prompt:]))
        got = sft_loss(model, batch)
    assert torch.allclose(got, want, atol=1e-6)

    # A different prompt target: the same answer after another question, whose prompt tokens
    # are given their own targets; the answer loss is what it is, whatever the prompt's targets.
    everything = make_batch([ids], [[1] * len(ids)], [[0]], tok.pad_id or 0)
    with torch.no_grad():
        per_token = token_losses(model, everything)[0]
        answer_only = token_losses(model, batch)[0]
    assert torch.allclose(per_token[n_prompt - 1:], answer_only[n_prompt - 1:])
    assert (answer_only[:n_prompt - 1] == 0).all() and (per_token[:n_prompt - 1] > 0).all()


@pytest.mark.parametrize("kw", [dict(position="learned"),
                                dict(position="rope", norm="rmsnorm", activation="swiglu",
                                     n_kv_heads=2)])
def test_a_packed_example_has_the_loss_it_has_alone(tok, kw):
    model = _decoder(tok, **kw)
    template = default_template(tok)
    examples = [_qa("Capital of Brazil?", "Brasília"), _qa("2+2?", "4"),
                _qa("Capital of Portugal?", "Lisboa")]
    enc = encode_sft(examples, tok, template, max_length=128)
    pad = tok.pad_id or 0
    packed = make_batch(enc.ids, enc.masks, [[0, 1, 2]], pad)
    with torch.no_grad():
        together = token_losses(model, packed)[0]
        start = 0
        for i in range(3):
            n = len(enc.ids[i]) - 1
            alone = token_losses(model, make_batch(enc.ids, enc.masks, [[i]], pad))[0]
            assert (together[start:start + n] - alone).abs().max() <= 1e-5
            start += n
    # and the mean over the packed row is the mean over the three answers' tokens
    with torch.no_grad():
        assert torch.allclose(sft_loss(model, packed),
                              together.sum() / (packed[1] != -100).sum())


def test_batches_resume_where_they_stopped(tok):
    template = default_template(tok)
    enc = encode_sft([_qa(f"q{i}?", f"a{i}") for i in range(10)], tok, template, 64)
    a = SFTBatches(enc, 3, 0, seed=1, packing=True, max_length=40)
    for _ in range(5):
        next(a)
    b = SFTBatches(enc, 3, 0, seed=1, packing=True, max_length=40)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(4):
        assert all(torch.equal(s, t) for s, t in zip(next(a), next(b), strict=True))


# ---------------------------------------------------------------------- the run

FACTS = [("Capital of Brazil?", "Brasília"), ("Capital of Portugal?", "Lisboa"),
         ("Capital of France?", "Paris"), ("Capital of Peru?", "Lima"),
         ("Capital of Chile?", "Santiago"), ("Capital of Spain?", "Madrid")]


def test_sft_trains_a_decoder_and_saves_it_with_its_template(tok, tmp_path):
    model = _decoder(tok)
    examples = [_qa(q, a) for q, a in FACTS * 4]
    settings = SFTSettings(max_steps=30, batch_size=4, lr=3e-3, packing=True, progress=False,
                           precision="fp32")
    result = finetune_sft(model, tok, examples, examples[:6], settings, out=tmp_path / "run")
    losses = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert losses[-1] < losses[0]
    assert (tmp_path / "run" / "chat_template.jinja").is_file()
    loaded, _ = qkv.load(tmp_path / "run")
    assert loaded.config == model.config


def test_sft_with_lora_writes_an_adapter(tok, tmp_path):
    base = _decoder(tok)
    qkv.save(base, tok, tmp_path / "base")
    examples = [_qa(q, a) for q, a in FACTS * 2]
    settings = SFTSettings(max_steps=6, batch_size=4, lr=1e-2, lora_rank=4, progress=False,
                           precision="fp32")
    model = _decoder(tok)
    result = finetune_sft(model, tok, examples, examples[:4], settings, out=tmp_path / "lora",
                          base=str(tmp_path / "base"))
    assert 0 < result.trainable < model.num_parameters() / 5
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    again, _ = qkv.load(tmp_path / "lora")
    ids = torch.tensor([tok.encode("Question: Capital of Peru?\nAnswer:",
                                   add_special_tokens=False)])
    with torch.no_grad():
        assert (again(ids) - result.model(ids)).abs().max() <= 1e-5


def test_lora_in_bf16_holds_the_frozen_weights_in_bf16_and_saves_them_as_they_were(tok,
                                                                                   tmp_path):
    """The frozen base is cast to bf16 once for the run (autocast would cast it at every
    forward pass); checkpoints and the model after training keep the exact fp32 weights."""
    from qkv.checkpoint import WEIGHTS
    from qkv.io import read_safetensors

    model = _decoder(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[tuple[torch.dtype, torch.dtype]] = []

    assert model.lm_head.weight is model.token_embedding.weight  # tied

    def look(record):  # during training: a frozen linear, the embedding, the output layer
        seen.append((model.decoder.layers[0].ffn.up.weight.dtype,
                     model.token_embedding.weight.dtype, model.lm_head.weight.dtype))

    examples = [_qa(q, a) for q, a in FACTS * 2]
    settings = SFTSettings(max_steps=3, batch_size=4, lr=1e-2, lora_rank=4, progress=False,
                           precision="bf16", eval_every=2)
    finetune_sft(model, tok, examples, examples[:4], settings, out=tmp_path / "run",
                 callback=look)
    # the tied output layer reads its own bf16 copy while the embedding stays fp32 ...
    assert seen and all(s == (torch.bfloat16, torch.float32, torch.bfloat16) for s in seen)
    assert model.lm_head.weight is model.token_embedding.weight  # ... and is tied again after
    saved = read_safetensors(tmp_path / "run" / "training" / WEIGHTS)
    after = model.state_dict()
    for k, v in before.items():
        if "lora" not in k:
            assert after[k].dtype == torch.float32 and torch.equal(after[k], v), k
            if k in saved:
                assert saved[k].dtype == torch.float32 and torch.equal(saved[k], v), k


def test_held_frozen_weights_change_no_logit_and_the_tie_comes_back(tok):
    """Holding LoRA's frozen base in bf16 (the tied output layer on its own bf16 copy) gives
    the very logits autocast gives without it; restore_weights puts fp32 and the tie back."""
    from qkv.hardware import autocast, hold_frozen_weights, restore_weights
    from qkv.lora import apply_lora

    model = _decoder(tok)
    apply_lora(model, rank=4, targets="q,v")
    with torch.no_grad():  # a LoRA update that is not zero, so that it counts too
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.1)
    ids = torch.tensor([tok.encode("Question: Capital of Peru?", add_special_tokens=False)])
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast(cpu, "bf16"):
        want = model(ids)
    held = hold_frozen_weights(model, "bf16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.token_embedding.weight.dtype == torch.float32
    assert model.lm_head.weight is not model.token_embedding.weight
    with torch.no_grad(), autocast(cpu, "bf16"):
        assert torch.equal(model(ids), want)
    restore_weights(model, held)
    assert model.lm_head.weight is model.token_embedding.weight
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad(), autocast(cpu, "bf16"):
        assert torch.equal(model(ids), want)


def test_sft_on_an_encoder_is_refused(tok, tmp_path, capsys):
    encoder = qkv.Transformer(tiny_config("encoder", vocab_size=tok.vocab_size))
    with pytest.raises(InputError, match="decoder"):
        finetune_sft(encoder, tok, [_qa("q?", "a")] * 4, settings=SFTSettings(progress=False))
    qkv.save(encoder, tok, tmp_path / "enc")
    data = _write(tmp_path / "d.jsonl", [{"question": "q?", "answer": "a"}] * 4)
    code = cli(["finetune", "sft", "--model", str(tmp_path / "enc"), "--data", data,
                "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "encoder" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_sft_runs_on_a_hugging_face_directory_and_uses_its_template(tok, tmp_path, capsys):
    model = _decoder(tok, position="learned", activation="gelu_tanh")
    qkv.save(model, tok, tmp_path / "hf", format="hf")  # a GPT-2 directory
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m.role[0] + ':' + m.content + '\n' }}"
                               "{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    data = _write(tmp_path / "d.jsonl", [{"question": q, "answer": a} for q, a in FACTS])
    code = cli(["finetune", "sft", "--model", str(tmp_path / "hf"), "--data", data, "--out",
                str(tmp_path / "out"), "--max-steps", "3", "--batch-size", "2", "--lora-rank",
                "2", "--no-progress", "--precision", "fp32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "trainable parameters:" in captured.err
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == config["chat_template"]
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["trainable"] > 0
    adapter = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    again = cli(["finetune", "sft", "--model", str(tmp_path / "hf"), "--data", data, "--out",
                 str(tmp_path / "out"), "--max-steps", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert again == 2 and "already holds a model" in err and "--overwrite" in err
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == adapter  # untouched


def test_losses_split_over_ranks_weighted_by_the_objective_add_up_to_the_whole(tok):
    """Under several processes each rank takes some rows; its mean loss is weighted by
    objective.weight, which must count the answer tokens that sft_loss averages over."""
    from qkv.data.sft import Encoded
    from qkv.tasks.sft import sft_objective
    from qkv.train.distributed import shard

    model = _decoder(tok)
    pairs = [_qa("Capital of Brazil?", "Brasília"), _qa("Capital of Peru, the country?", "Lima")]
    encoded = [encode_example(p, tok, default_template(tok)) for p in pairs]
    data = Encoded([e[0] for e in encoded], [e[1] for e in encoded])
    settings = SFTSettings(batch_size=2, packing=False, progress=False)
    objective = sft_objective(data, data, tok.pad_id or 0, settings, 64, torch.device("cpu"),
                              "fp32")
    batch = make_batch(data.ids, data.masks, [[0], [1]], tok.pad_id or 0)
    with torch.no_grad():
        whole = sft_loss(model, batch)
        parts = []
        for rank in range(2):
            rows, scale = shard(batch, objective.weight, rank, 2)
            parts.append(sft_loss(model, rows) * scale)
    assert torch.allclose(sum(parts) / 2, whole, atol=1e-6)


@pytest.mark.parametrize("rows", [[[0], [1], [2]], [[0, 1], [2]]])  # padded; packed and padded
def test_token_losses_equal_the_full_logits_recipe_values_and_gradients(tok, rows):
    """Only the answer positions reach the output layer and an unpacked batch runs without a
    mask: the losses and the gradients are those of every position's logits, masked."""
    from qkv.tasks.sft import segment_mask

    model = _decoder(tok).train()
    examples = [_qa("Capital of Brazil?", "Brasília"), _qa("2+2?", "4"),
                _qa("Capital of Portugal, please?", "Lisboa")]
    enc = encode_sft(examples, tok, default_template(tok), max_length=128)
    batch = make_batch(enc.ids, enc.masks, rows, tok.pad_id or 0)
    x, y, positions, segments = batch
    assert (segments == 0).any()  # the rows are padded
    logits = model.decode(x, tgt_mask=segment_mask(segments), positions=positions)
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    got = token_losses(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters()]
    g_got = torch.autograd.grad(got.sum(), params)
    g_want = torch.autograd.grad(want.sum(), params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
