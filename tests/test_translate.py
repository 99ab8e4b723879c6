"""Translation: the objective, decoding, BLEU, averaging, the init scale, and parity with HF."""

from __future__ import annotations

import math
import random

import pytest
import torch

import qkv
from qkv.cli import main
from qkv.data.parallel import encode_pairs, joint_tokenizer, read_tsv
from qkv.errors import InputError
from qkv.presets import get as get_preset
from qkv.seq2seq import LENGTH_SLACK, _beam_search, _greedy, generate_seq2seq
from qkv.tasks.translate import (
    Snapshots,
    TranslateSettings,
    average_state_dicts,
    bleu_scores,
    build_translator,
    label_smoothed_loss,
    load_translator,
    translate,
)
from qkv.train import Schedule, read_log


def sharp_model(seed: int = 0, vocab: int = 20) -> qkv.Transformer:
    torch.manual_seed(seed)
    cfg = qkv.ModelConfig(family="encoder-decoder", vocab_size=vocab, d_model=32, n_layers=2,
                          n_heads=4, max_seq_len=64, decoder_start_token_id=0, eos_token_id=1,
                          tie_embeddings=False, lm_head_bias=True)
    model = qkv.Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # confident predictions: a real choice at every step
    return model


SRC = torch.tensor([[5, 6, 7, 8, 9, 4], [9, 3, 4, 2, 2, 2], [4, 4, 2, 2, 2, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_beam_of_one_is_greedy_token_for_token(seed):
    model = sharp_model(seed)
    memory = model.encode(SRC, MASK)
    limits = [12, 5, 1]
    with torch.no_grad():
        greedy = _greedy(model, memory, MASK, limits, 0, 1)
        beam = _beam_search(model, memory, MASK, limits, 1, 1.0, 0, 1)
    assert beam == greedy
    assert [len(g) <= lim for g, lim in zip(greedy, limits, strict=True)] == [True] * 3
    assert generate_seq2seq(model, SRC, MASK, max_new_tokens=12, beam_size=1) == \
        _greedy(model, memory, MASK, [12] * 3, 0, 1)


def test_the_length_ratio_limits_each_row_by_its_own_source():
    model = sharp_model(0)
    with torch.no_grad():
        model.lm_head.bias[1] = -1e4  # never ends by itself
    for beam in (1, 3):
        out = generate_seq2seq(model, SRC, MASK, max_new_tokens=100, beam_size=beam,
                               max_length_ratio=0.5)
        lengths = [int(n) for n in MASK.sum(-1)]
        assert [len(o) for o in out] == [int(0.5 * n) + LENGTH_SLACK for n in lengths]


def test_label_smoothed_loss_equals_its_formula_and_padding_never_counts():
    torch.manual_seed(0)
    V, pad, eps = 7, 0, 0.1
    logits = torch.randn(2, 4, V)
    target = torch.tensor([[3, 5, 2, pad], [4, pad, pad, pad]])
    loss = label_smoothed_loss(logits, target, pad, eps)
    logp = logits.log_softmax(-1)
    terms = []
    for b in range(2):
        for t in range(4):
            y = int(target[b, t])
            if y == pad:
                continue
            q = torch.full((V,), eps / V)
            q[y] += 1 - eps
            terms.append(-(q * logp[b, t]).sum())
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    # the same as PyTorch's label smoothing with the padding ignored
    expected = torch.nn.functional.cross_entropy(logits.view(-1, V), target.view(-1),
                                                 ignore_index=pad, label_smoothing=eps)
    assert torch.allclose(loss, expected, atol=1e-6)
    # whatever the scores at padded positions, the loss is the same
    changed = logits.clone()
    changed[target == pad] = torch.randn_like(changed[target == pad]) * 100
    assert torch.equal(label_smoothed_loss(changed, target, pad, eps), loss)
    # and its gradient there is exactly zero
    leaf = logits.clone().requires_grad_()
    label_smoothed_loss(leaf, target, pad, eps).backward()
    assert leaf.grad is not None
    assert torch.count_nonzero(leaf.grad[target == pad]) == 0
    assert torch.count_nonzero(leaf.grad[target != pad]) > 0


def test_checkpoint_averaging_equals_the_mean_of_the_saved_weights(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.tied_weights = dict  # type: ignore[attr-defined]
    keep = Snapshots(3, tmp_path / "averaging")
    saved = []
    for step in (10, 20, 30, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        keep.add(step, model)
        saved.append({k: v.clone() for k, v in model.state_dict().items()})
    assert keep.steps() == [20, 30, 40]  # only the last 3 are kept
    averaged = keep.average()
    for k in ("weight", "bias"):
        mean = (saved[1][k] + saved[2][k] + saved[3][k]) / 3
        assert torch.allclose(averaged[k], mean, atol=1e-7)
    keep.forget_after(25)  # a resumed run drops what its killed predecessor wrote later
    assert keep.steps() == [20]
    assert torch.equal(average_state_dicts([saved[0]])["weight"], saved[0]["weight"])
    with pytest.raises(InputError):
        average_state_dicts([saved[0], {"weight": saved[0]["weight"]}])


def test_our_bleu_equals_sacrebleu_corpus_bleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["The cat sat on the mat.", "A dog runs in the park!", "two men are talking"]
    refs = ["The cat is sitting on the mat.", "A dog is running in the park.",
            "Two men are talking."]
    ours = bleu_scores(hyps, refs)
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert ours["bleu_lowercase"] == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score)
    assert ours["bleu_lowercase"] > ours["bleu"]  # "two" matches "Two" only lowercased
    assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert ours["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert bleu_scores(refs, refs)["bleu"] == pytest.approx(100.0)
    with pytest.raises(InputError, match="2 translations but 3 references"):
        bleu_scores(hyps[:2], refs)


def _source_effect(cfg: qkv.ModelConfig) -> tuple[float, float]:
    """(mean |change of the logits|, that change / the logits' spread) when the whole source
    sentence is replaced, at initialisation."""
    torch.manual_seed(0)
    model = qkv.Transformer(cfg).eval()
    tgt = torch.randint(4, cfg.vocab_size, (1, 8))
    a, b = torch.randint(4, cfg.vocab_size, (2, 1, 10))
    with torch.no_grad():
        la, lb = model(a, tgt), model(b, tgt)
    change = (la - lb).abs().mean().item()
    return change, change / la.std().item()


def test_at_initialisation_the_source_visibly_changes_the_decoder_output():
    # The paper scales token vectors by sqrt(d_model) before adding the sinusoidal positions.
    # A scaled table starts at N(0, 1/d) (fairseq), so a token vector is about as large as the
    # positions (RMS ~1 against ~0.71) instead of drowned by them; then a different source
    # moves the decoder's logits about 35x more than in an encoder-decoder whose token vectors
    # are N(0, 0.02) (where replacing the whole source moves them by ~4e-4).
    cfg = get_preset("transformer-mt-small", vocab_size=500, dropout=0.0)
    model = qkv.Transformer(cfg)
    token_rms = (model.token_embedding.weight * cfg.d_model ** 0.5).pow(2).mean().sqrt()
    assert token_rms.item() == pytest.approx(1.0, rel=0.05)
    position_rms = model.encoder.positions.table.pow(2).mean().sqrt()  # type: ignore[union-attr]
    assert 0.5 < token_rms.item() / position_rms.item() < 2
    drowned = cfg.replace(scale_embeddings=False)
    assert qkv.Transformer(drowned).token_embedding.weight.std().item() == pytest.approx(
        0.02, rel=0.05)  # unscaled models keep GPT-2's initialisation
    change, relative = _source_effect(cfg)
    change_drowned, relative_drowned = _source_effect(drowned)
    assert change > 5e-3 and change > 10 * change_drowned
    assert relative > 5 * relative_drowned


def test_inverse_sqrt_schedule():
    s = Schedule(1e-3, warmup=100, decay="inverse_sqrt")
    assert s.at(0, 10) == pytest.approx(1e-5)
    assert s.at(99, 10) == pytest.approx(1e-3)
    assert s.at(399, 10) == pytest.approx(1e-3 * math.sqrt(100 / 400))


# ---------------------------------------------------------------------- parity with HF Marian

def _marian_with_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["ein", "hund", "katze", "läuft", "schnell", "im", "park", "zwei", "männer", "sind"]
    texts = [" ".join(random.Random(i).choices(words, k=6)) for i in range(200)]
    tok = qkv.Tokenizer.train(texts, kind="bpe", vocab_size=300,
                              special_tokens=["</s>", "<unk>"])
    pad = tok.vocab_size  # Marian's pad (also its decoder start) comes after the tokenizer's
    config = transformers.MarianConfig(
        vocab_size=pad + 1, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=pad, eos_token_id=0,
        decoder_start_token_id=pad, forced_eos_token_id=None, scale_embedding=True,
        init_std=0.3)
    torch.manual_seed(0)
    hf = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        hf.model.decoder.embed_tokens.weight.copy_(hf.model.encoder.embed_tokens.weight)
        hf.final_logits_bias.normal_(0, 0.5)
        hf.final_logits_bias[0, pad] = -1e4  # pad is never generated
    hf.save_pretrained(tmp_path / "marian", safe_serialization=True)
    tok.save(tmp_path / "marian" / "tokenizer.json")
    return transformers, hf, tok, texts, pad


def test_a_random_marian_translates_the_same_through_qkv_translate_as_hf_generate(
        tmp_path, capsys):
    transformers, hf, tok, texts, pad = _marian_with_tokenizer(tmp_path)
    sources = [texts[0], texts[1] + " " + texts[2], texts[3][:12]]
    assert main(["translate", str(tmp_path / "marian"), *sources, "--beam", "4",
                 "--max-length-ratio", "1.5"]) == 0
    ours = capsys.readouterr().out.splitlines()
    assert len(ours) == 3
    for text, got in zip(sources, ours, strict=True):
        ids = tok.encode(text) + [0]
        limit = min(64, int(1.5 * len(ids)) + LENGTH_SLACK)
        gen = transformers.GenerationConfig(
            max_new_tokens=limit, num_beams=4, do_sample=False, length_penalty=1.0,
            early_stopping=False, eos_token_id=0, pad_token_id=pad, decoder_start_token_id=pad)
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([ids]), generation_config=gen)[0]
        want = [t for t in out.tolist()[1:] if t not in (0, pad)]
        assert want, "the reference translation is empty: the test would prove little"
        assert got == tok.decode(want).strip()


def test_translate_refuses_a_decoder_only_model(tmp_path, capsys):
    cfg = qkv.ModelConfig(family="decoder", vocab_size=40, d_model=16, n_layers=1, n_heads=2,
                          max_seq_len=16)
    tok = qkv.Tokenizer.train(["some text for a tokenizer"] * 3, kind="char")
    qkv.save(qkv.Transformer(cfg), tok, tmp_path / "gpt")
    assert main(["translate", str(tmp_path / "gpt"), "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder-decoder" in err[0]


def test_the_norm_placement_setting_builds_post_norm_blocks_and_refuses_others(capsys):
    from qkv.errors import ConfigError
    post = build_translator(TranslateSettings(data="x", norm_placement="post"), 100, 0, 1, 2)
    assert post.config.norm_placement == "post" and post.config.d_model == 256
    blocks = [m for m in post.modules() if hasattr(m, "pre_norm")]
    assert len(blocks) == 6 and not any(b.pre_norm for b in blocks)  # 3 + 3 post-norm blocks
    pre = build_translator(TranslateSettings(data="x"), 100, 0, 1, 2)
    assert pre.config.norm_placement == "pre"  # the preset's
    with pytest.raises(ConfigError, match="norm_placement='mid' is not one of pre, post"):
        TranslateSettings(data="x", norm_placement="mid").check()
    with pytest.raises(SystemExit) as exit_:  # argparse: one line on stderr, status 2
        main(["train", "--family", "encoder-decoder", "--data", "x", "--src", "de",
              "--tgt", "en", "--norm-placement", "mid"])
    assert exit_.value.code == 2 and "invalid choice: 'mid'" in capsys.readouterr().err


# ---------------------------------------------------------------------- a tiny run end to end

def _tiny_corpus(tmp_path):
    """300 pairs of five words, translated word by word (the order kept)."""
    words = {"hund": "dog", "katze": "cat", "mann": "man", "frau": "woman", "rot": "red",
             "blau": "blue", "groß": "big", "klein": "small"}
    rng = random.Random(0)
    lines = ["de\ten"]
    for _ in range(300):
        picked = rng.sample(sorted(words), 5)
        lines.append(" ".join(picked) + "\t" + " ".join(words[w] for w in picked))
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _tiny_transformer(data, *flags: str) -> list[str]:
    """`qkv train` of a one-layer d=32 Transformer on the tiny corpus, on one CPU thread."""
    return ["train", "--family", "encoder-decoder", "--data", str(data), "--src", "de",
            "--tgt", "en", "--preset", "transformer-mt-tiny", "--n-layers", "1",
            "--d-model", "32", "--vocab-size", "300", "--max-tokens", "600", "--no-progress",
            "--device", "cpu", "--precision", "fp32", "--threads", "1", *flags]


def test_a_transformer_run_averages_its_last_evaluations_and_resumes_exactly(tmp_path, capsys):
    data = _tiny_corpus(tmp_path)
    common = _tiny_transformer(data, "--lr", "3e-3", "--warmup-steps", "10", "--eval-every",
                               "20", "--bleu-sentences", "10", "--average-last", "2")
    assert main([*common, "--max-steps", "60", "--out", str(tmp_path / "full")]) == 0
    assert "average of the last 2 evaluations" in capsys.readouterr().out
    log = read_log(tmp_path / "full")
    assert [r["step"] for r in log] == [20, 40, 60]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert (tmp_path / "full" / "best.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "full" / "averaging").iterdir()) == [
        "step-40.safetensors", "step-60.safetensors"]

    # stopped after 40 steps, then resumed: the very same losses as the uninterrupted run
    assert main([*common, "--max-steps", "40", "--out", str(tmp_path / "part")]) == 0
    assert main([*common, "--max-steps", "60", "--out", str(tmp_path / "part"),
                 "--resume"]) == 0
    resumed = read_log(tmp_path / "part")
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in log]
    assert [r["val_loss"] for r in resumed] == [r["val_loss"] for r in log]
    capsys.readouterr()
    assert main([*common, "--max-steps", "60", "--out", str(tmp_path / "part")]) == 2
    assert "--resume" in capsys.readouterr().err  # a run is never overwritten by accident


def test_bpe_dropout_training_resumes_exactly(tmp_path, capsys):
    data = _tiny_corpus(tmp_path)
    common = _tiny_transformer(data, "--warmup-steps", "5", "--eval-every", "10",
                               "--bleu-sentences", "0", "--bpe-dropout", "0.3")
    assert main([*common, "--max-steps", "30", "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--max-steps", "10", "--out", str(tmp_path / "part")]) == 0
    assert main([*common, "--max-steps", "30", "--out", str(tmp_path / "part"),
                 "--resume"]) == 0
    full, resumed = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert full[-1]["epoch"] > 1  # the resumed run crossed epochs, each segmented anew
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]
    capsys.readouterr()
    assert main([*common[:-1], "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "bpe_dropout=1.5" in capsys.readouterr().err


def test_a_tiny_recurrent_translator_learns_then_translates_and_scores(tmp_path, capsys):
    data = _tiny_corpus(tmp_path)
    assert main(["train", "--family", "rnn", "--data", str(data), "--src", "de", "--tgt", "en",
                 "--d-hidden", "64", "--vocab-size", "300", "--max-tokens", "800",
                 "--lr", "1e-2", "--warmup-steps", "30", "--dropout", "0", "--eval-every",
                 "50", "--max-steps", "150", "--bleu-sentences", "20", "--no-progress",
                 "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "rnn")]) == 0
    log = read_log(tmp_path / "rnn")
    assert log[-1]["val_bleu"] > 95
    capsys.readouterr()

    model, tok = load_translator(tmp_path / "rnn")
    assert translate(model, tok, ["hund rot klein mann frau"], beam_size=3) == [
        "dog red small man woman"]
    pipe = qkv.pipeline("translation", model=str(tmp_path / "rnn"))
    assert pipe("katze blau mann groß klein") == [{"translation_text": "cat blue man big small"}]

    src, ref = tmp_path / "test.de", tmp_path / "test.en"
    src.write_text("hund rot klein mann frau\nkatze blau mann groß klein\n", encoding="utf-8")
    ref.write_text("dog red small man woman\ncat blue man big small\n", encoding="utf-8")
    assert main(["eval", str(tmp_path / "rnn"), "--src", str(src), "--ref", str(ref)]) == 0
    report = capsys.readouterr().out
    assert "BLEU 100.00" in report and "case:mixed" in report and "chrF" in report
    assert main(["translate", str(tmp_path / "rnn"), "--file", str(src), "--beam", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == ref.read_text().splitlines()


def test_the_joint_tokenizer_and_pair_encoding(tmp_path):
    data = read_tsv(_tiny_corpus(tmp_path), "en", "de")  # the header picks the columns
    assert data.src[0].split()[0] in {"dog", "cat", "man", "woman", "red", "blue", "big",
                                      "small"}
    tok = joint_tokenizer(data, vocab_size=300)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    pairs = encode_pairs(data, tok, max_len=64)
    assert pairs.src[0][-1] == 2 and pairs.tgt[0][0] == 1 and pairs.tgt[0][-1] == 2
    assert tok.decode(pairs.tgt[0]) == data.tgt[0]
    short = encode_pairs(data, tok, max_len=4)
    assert len(short) == 0 and short.skipped["too long"] == len(data)


def test_lora_fine_tunes_a_translator_from_the_cli_and_saves_only_an_adapter(tmp_path, capsys):
    data = _tiny_corpus(tmp_path)
    common = ["train", "--family", "encoder-decoder", "--data", str(data), "--src", "de",
              "--tgt", "en", "--max-tokens", "600", "--lr", "3e-3", "--warmup-steps", "5",
              "--eval-every", "10", "--bleu-sentences", "0", "--no-progress", "--device", "cpu",
              "--precision", "fp32", "--threads", "1", "--max-steps", "10"]
    assert main([*common, "--preset", "transformer-mt-tiny", "--n-layers", "1", "--d-model",
                 "32", "--vocab-size", "300", "--out", str(tmp_path / "base")]) == 0
    capsys.readouterr()
    run = tmp_path / "lora"
    assert main([*common, "--init", str(tmp_path / "base"), "--lora-rank", "4",
                 "--lora-targets", "q,v,o", "--out", str(run)]) == 0
    assert "trainable parameters:" in capsys.readouterr().err  # the count is printed

    # the run directory is an adapter in PEFT's layout, a fraction of the base's size
    assert (run / "adapter_config.json").is_file() and not (run / "config.json").exists()
    adapter_bytes = (run / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (tmp_path / "base" / "model.safetensors").stat().st_size / 3

    # base + adapter in one call: every base weight is the base's, only LoRA's B moved off zero
    base, _ = load_translator(tmp_path / "base")
    tuned, tok = load_translator(run)
    before = dict(base.named_parameters())
    after = dict(tuned.named_parameters())
    lora = [n for n in after if ".lora_" in n]
    assert lora and set(after) - set(lora) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert all(after[n].abs().max() > 0 for n in lora if ".lora_B." in n)
    src = torch.tensor([tok.encode("hund rot klein mann frau")])
    tgt = torch.tensor([[base.config.decoder_start_token_id, 5, 6]])
    with torch.no_grad():
        assert not torch.allclose(base(src, tgt), tuned(src, tgt))
    assert main(["translate", str(run), "hund rot klein mann frau", "--beam", "1"]) == 0

    # LoRA needs a translator to adapt, and that translator fixes the shape
    capsys.readouterr()
    assert main([*common, "--lora-rank", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--init" in capsys.readouterr().err
    assert main([*common, "--init", str(tmp_path / "base"), "--d-model", "64",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--d-model does not apply with --init" in capsys.readouterr().err
    assert main(["train", "--lora-rank", "4", "--out", str(tmp_path / "x")]) == 2
    assert "translation" in capsys.readouterr().err
