"""Ensembles of translators (qkv.ensemble): averaged probabilities, decoding, loading, the CLI."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.cli import main
from qkv.data.parallel import joint_tokenizer, read_tsv, translation_ids
from qkv.ensemble import Ensemble
from qkv.errors import InputError
from qkv.seq2seq import generate_seq2seq
from qkv.tasks.translate import (
    TranslateSettings,
    build_translator,
    load_translators,
    translate,
)

SRC = torch.tensor([[5, 6, 7, 8, 9, 4], [9, 3, 4, 3, 3, 3], [4, 4, 3, 3, 3, 3]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])


def member(seed: int, family: str = "encoder-decoder", vocab: int = 24,
           attention: bool = True) -> torch.nn.Module:
    """A random translator whose predictions are confident (a real choice at every step)."""
    torch.manual_seed(seed)
    s = TranslateSettings(data="unused", family=family, d_model=32, n_layers=1, n_heads=4,
                          d_hidden=24, d_embed=16, attention=attention, context=32)
    model = build_translator(s, vocab, pad=0, bos=1, eos=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)
    return model


@torch.inference_mode()
def sharp(seed: int) -> qkv.Transformer:
    """A random Transformer that decodes varied, confident targets (a choice at every step)."""
    torch.manual_seed(seed)
    cfg = qkv.ModelConfig(family="encoder-decoder", vocab_size=24, d_model=32, n_layers=2,
                          n_heads=4, max_seq_len=64, decoder_start_token_id=1, eos_token_id=2,
                          tie_embeddings=False, lm_head_bias=True)
    model = qkv.Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@torch.inference_mode()
def by_hand(models, tokens_so_far):
    """log(mean_m softmax(logits_m)) of the token after `tokens_so_far` (B, T), each model
    reading the whole target from the start, without a cache."""
    probs = []
    for m in models:
        cache, memory = m.new_cache(), m.encode(SRC, MASK)
        logits = m.next_token_logits(tokens_so_far, cache, memory=memory, src_mask=MASK)
        probs.append(logits.float().softmax(-1))
    return torch.stack(probs).mean(0).log()


@pytest.mark.parametrize("kinds", [("encoder-decoder", "encoder-decoder"),
                                   ("encoder-decoder", "rnn-bahdanau", "rnn-plain")])
def test_each_step_gives_the_log_of_the_averaged_probabilities(kinds):
    family = {"encoder-decoder": ("encoder-decoder", True), "rnn-bahdanau": ("rnn", True),
              "rnn-plain": ("rnn", False)}  # the plain RNN's memory is (B, 1, d): shapes differ
    models = [member(i, family[k][0], attention=family[k][1]) for i, k in enumerate(kinds)]
    ensemble = Ensemble(models).eval()
    with torch.inference_mode():
        cache, memory = ensemble.new_cache(), ensemble.encode(SRC, MASK)
        assert memory.shape[0] == SRC.shape[0] and memory.dim() == 2
        first = torch.full((3, 1), 1)
        step1 = ensemble.next_token_logits(first, cache, memory=memory, src_mask=MASK)
        nxt = step1.argmax(-1, keepdim=True)
        step2 = ensemble.next_token_logits(nxt, cache, memory=memory, src_mask=MASK)
        want1 = by_hand(models, first)
        want2 = by_hand(models, torch.cat([first, nxt], dim=1))
    assert step1.dtype == torch.float32 and step1.shape == (3, 24)
    assert torch.allclose(step1.exp().sum(-1), torch.ones(3), atol=1e-5)  # a distribution
    assert (step1 - want1).abs().max() < 1e-5
    assert (step2 - want2).abs().max() < 1e-5
    # and it is not simply one member's distribution
    alone = by_hand(models[:1], first)
    assert (step1 - alone).abs().max() > 1e-2


@pytest.mark.parametrize("beam", [1, 4])
def test_an_ensemble_of_one_model_or_of_a_model_twice_decodes_as_the_model(beam):
    model = sharp(3)
    alone = generate_seq2seq(model, SRC, MASK, max_new_tokens=12, beam_size=beam)
    assert any(alone)  # something to compare
    for members in ([model], [model, model]):
        assert generate_seq2seq(Ensemble(members), SRC, MASK, max_new_tokens=12,
                                beam_size=beam) == alone


def test_two_different_members_decode_with_beam_search_and_change_the_output():
    a, b = sharp(0), sharp(1)
    outs = [generate_seq2seq(m, SRC, MASK, max_new_tokens=12, beam_size=4)
            for m in (a, b, Ensemble([a, b]))]
    assert all(len(o) == 3 for o in outs)
    assert outs[0] != outs[1]  # the members disagree, so the ensemble has a choice to make
    ensemble = Ensemble([a, b])
    with torch.inference_mode():  # its greedy first token maximises the averaged probability
        memory = ensemble.encode(SRC, MASK)
        logp = ensemble.next_token_logits(torch.full((3, 1), 1), ensemble.new_cache(),
                                          memory=memory, src_mask=MASK)
    greedy = generate_seq2seq(ensemble, SRC, MASK, max_new_tokens=1, beam_size=1)
    assert [g[:1] for g in greedy] == [[t] if t != 2 else [] for t in logp.argmax(-1).tolist()]


def test_members_must_share_a_vocabulary_and_memory_must_come_from_encode():
    with pytest.raises(InputError, match="vocab_size=30, member 1 has 24"):
        Ensemble([member(0), member(1, vocab=30)])
    with pytest.raises(InputError, match="at least one"):
        Ensemble([])
    ensemble = Ensemble([member(0), member(1)])
    with pytest.raises(InputError, match="encode"):
        ensemble.next_token_logits(torch.ones(3, 1, dtype=torch.long), ensemble.new_cache(),
                                   memory=torch.zeros(3, 5), src_mask=MASK)


# ---------------------------------------------------------------------- directories and CLI

def _save_translators(tmp_path, vocab_sizes):
    """Random translators saved with joint tokenizers of the given sizes (same data)."""
    pairs = tmp_path / "pairs.tsv"
    rows = ["de\ten"] + [f"hund {w} katze {i}\tdog {w} cat {i}"
                         for i in range(40) for w in ("rot", "blau", "groß")]
    pairs.write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = read_tsv(pairs, "de", "en")
    dirs = []
    for i, size in enumerate(vocab_sizes):
        tok = joint_tokenizer(data, size)
        pad, bos, eos = translation_ids(tok)
        torch.manual_seed(i)
        s = TranslateSettings(data="unused", d_model=32, n_layers=1, n_heads=4, context=32)
        model = build_translator(s, tok.vocab_size, pad, bos, eos)
        qkv.save(model, tok, tmp_path / f"m{i}")
        dirs.append(tmp_path / f"m{i}")
    return dirs


def test_the_cli_translates_and_scores_with_an_ensemble_as_the_api_does(tmp_path, capsys):
    a, b = _save_translators(tmp_path, [300, 300])
    model, tok = load_translators([a, b])
    assert isinstance(model, Ensemble) and len(model.members) == 2
    sentences = ["hund rot katze 7", "hund blau katze 12"]
    want = translate(model, tok, sentences, beam_size=3)
    pipe = qkv.pipeline("translation", model=(model, tok))
    assert [r["translation_text"] for r in pipe(sentences, beam_size=3)] == want
    assert main(["translate", str(a), *sentences, "--ensemble", str(b), "--beam", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == want

    src, ref = tmp_path / "t.de", tmp_path / "t.en"
    src.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    ref.write_text("dog red cat 7\ndog blue cat 12\n", encoding="utf-8")
    hyp = tmp_path / "t.hyp"
    assert main(["eval", str(a), "--ensemble", str(b), "--src", str(src), "--ref", str(ref),
                 "--beam", "3", "--hyp-out", str(hyp)]) == 0
    assert "BLEU" in capsys.readouterr().out
    assert hyp.read_text(encoding="utf-8").splitlines() == want
    single, _ = load_translators([a])
    assert not isinstance(single, Ensemble)


def test_an_ensemble_of_models_with_different_tokenizers_is_refused_in_one_line(tmp_path,
                                                                                 capsys):
    a, b = _save_translators(tmp_path, [300, 280])
    assert main(["translate", str(a), "hund rot", "--ensemble", str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another tokenizer" in err and str(b) in err
    assert "Traceback" not in err
    assert main(["eval", str(a), "--ensemble", str(b)]) == 2
    assert "--ensemble applies to a translator" in capsys.readouterr().err

