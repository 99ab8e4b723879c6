"""The recurrent translators of qkv.baselines: they learn, decode step by step exactly as they
compute in one pass, and their attention is a proper alignment, recorded like a Transformer's."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.baselines import RNNConfig, RNNTranslator
from qkv.seq2seq import _beam_search, _greedy, generate_seq2seq
from qkv.tasks.translate import label_smoothed_loss

FAMILIES = [("lstm", False), ("gru", False), ("lstm", True), ("gru", True)]
PAD, BOS, EOS = 0, 1, 2
SRC = torch.tensor([[5, 6, 7, 8, 2], [9, 3, 2, 0, 0], [4, 2, 0, 0, 0]])
SRC_MASK = (SRC != PAD).long()
TGT = torch.tensor([[1, 8, 7, 6, 5, 2], [1, 3, 9, 2, 0, 0], [1, 4, 4, 4, 2, 0]])
TGT_MASK = (TGT != PAD).long()


def make(cell: str, attention: bool, dropout: float = 0.0, seed: int = 0) -> RNNTranslator:
    torch.manual_seed(seed)
    return RNNTranslator(RNNConfig(vocab_size=12, cell=cell, attention=attention, d_embed=16,
                                   d_hidden=24, n_layers=1 if attention else 2, dropout=dropout,
                                   pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                                   decoder_start_token_id=BOS))


@pytest.mark.parametrize("cell,attention", FAMILIES)
def test_each_family_overfits_a_small_batch(cell, attention):
    model = make(cell, attention)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits = model(SRC, TGT[:, :-1], src_mask=SRC_MASK)
        loss = label_smoothed_loss(logits, TGT[:, 1:], PAD, 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    model.eval()
    found = generate_seq2seq(model, SRC, SRC_MASK, max_new_tokens=8)
    assert found == [[8, 7, 6, 5], [3, 9], [4, 4, 4]]


@pytest.mark.parametrize("cell,attention", FAMILIES)
def test_cached_step_decoding_equals_the_full_forward_pass(cell, attention):
    model = make(cell, attention, seed=1).eval()
    with torch.no_grad():
        full = model(SRC, TGT, src_mask=SRC_MASK)  # (B, T, V)
        memory = model.encode(SRC, SRC_MASK)
        cache = model.new_cache()
        steps = [model.next_token_logits(TGT[:, t:t + 1], cache, memory=memory,
                                         src_mask=SRC_MASK) for t in range(TGT.shape[1])]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)
    assert len(cache) == TGT.shape[1]


@pytest.mark.parametrize("cell,attention", FAMILIES)
def test_padding_a_source_does_not_change_its_translation(cell, attention):
    model = make(cell, attention, seed=2).eval()
    with torch.no_grad():
        alone = model(SRC[1:2, :3], TGT[1:2])
        padded = model(SRC[1:2], TGT[1:2], src_mask=SRC_MASK[1:2])
    assert torch.allclose(alone, padded, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bahdanau_weights_sum_to_one_and_give_padding_nothing(cell):
    model = make(cell, True, seed=3).eval()
    with torch.no_grad(), qkv.record_attention(model) as maps:
        model(SRC, TGT, src_mask=SRC_MASK)
    steps = maps["attention"]
    assert len(steps) == TGT.shape[1]
    weights = torch.cat(steps, dim=2)  # (B, 1, T, S): an alignment matrix per sentence
    assert weights.shape == (3, 1, TGT.shape[1], SRC.shape[1])
    assert torch.allclose(weights.sum(-1), torch.ones(3, 1, TGT.shape[1]))
    pad = ~SRC_MASK.bool()[:, None, None, :].expand_as(weights)
    assert torch.count_nonzero(weights[pad]) == 0
    assert (weights[~pad] > 0).all()
    assert model.attention.recorded is None  # recording ends with the block


def test_transformer_cross_attention_and_bahdanau_come_out_of_one_api():
    cfg = qkv.ModelConfig(family="encoder-decoder", vocab_size=12, d_model=16, n_layers=1,
                          n_heads=2, max_seq_len=16)
    transformer = qkv.Transformer(cfg).eval()
    rnn = make("gru", True).eval()
    shapes = {}
    for name, model, layer in ((" transformer", transformer, "decoder.layers.0.cross_attn"),
                               ("rnn", rnn, "attention")):
        with torch.no_grad(), qkv.record_attention(model) as maps:
            model(SRC[:1], TGT[:1])
        shapes[name] = torch.cat(maps[layer], dim=2).shape[-2:]
    assert shapes[" transformer"] == shapes["rnn"] == (TGT.shape[1], SRC.shape[1])


@pytest.mark.parametrize("cell,attention", FAMILIES)
def test_beam_search_decodes_a_recurrent_translator(cell, attention):
    model = make(cell, attention, seed=4).eval()
    with torch.no_grad():
        model.out.weight.mul_(20)
        memory = model.encode(SRC, SRC_MASK)
        greedy = _greedy(model, memory, SRC_MASK, [8, 8, 8], BOS, EOS)
        assert _beam_search(model, memory, SRC_MASK, [8, 8, 8], 1, 1.0, BOS, EOS) == greedy
    beams = generate_seq2seq(model, SRC, SRC_MASK, max_new_tokens=8, beam_size=4)
    assert len(beams) == 3 and all(len(b) <= 8 and EOS not in b for b in beams)


def test_rnn_config_checks_its_values():
    with pytest.raises(qkv.ConfigError, match="cell"):
        RNNConfig(vocab_size=10, cell="rnn")
    with pytest.raises(qkv.ConfigError, match="d_hidden"):
        RNNConfig(vocab_size=10, d_hidden=0)
    with pytest.raises(qkv.ConfigError, match="unknown RNN config field"):
        RNNConfig.from_dict({"vocab_size": 10, "heads": 3})
    cfg = RNNConfig(vocab_size=10, attention=True)
    assert RNNConfig.from_dict(cfg.to_dict()) == cfg


def test_reversing_the_source_reads_each_sentence_backwards_and_keeps_padding():
    from qkv.baselines.rnn import reverse_rows
    lengths = SRC_MASK.sum(-1)
    assert reverse_rows(SRC, lengths).tolist() == [[2, 8, 7, 6, 5], [2, 3, 9, 0, 0],
                                                   [2, 4, 0, 0, 0]]
    with pytest.raises(qkv.ConfigError, match="reverse_source"):
        RNNConfig(vocab_size=10, attention=True, reverse_source=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_reversed_reader_sees_the_same_sentence_as_reading_its_reverse(cell):
    """reverse_source=True on a sentence equals reverse_source=False on it written backwards,
    padded or not."""
    plain = make(cell, False, seed=3).eval()
    torch.manual_seed(3)
    backwards = RNNTranslator(RNNConfig(**{**plain.config.to_dict(), "reverse_source": True}))
    backwards.load_state_dict(plain.state_dict())
    backwards.eval()
    with torch.no_grad():
        want = plain(SRC[1:2, :3].flip(1), TGT[1:2])
        got = backwards(SRC[1:2], TGT[1:2], src_mask=SRC_MASK[1:2])
    assert torch.allclose(want, got, atol=1e-5)
    assert not torch.allclose(plain(SRC[1:2], TGT[1:2], src_mask=SRC_MASK[1:2]), got, atol=1e-3)
