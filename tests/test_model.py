import pytest
import torch
import torch.nn.functional as F

import qkv
from conftest import tiny_config
from qkv import InputError, Transformer

# Every value of every option appears at least once (not their 108 combinations).
OPTIONS = [
    dict(position="learned", norm="layernorm", norm_placement="pre", activation="gelu_tanh"),
    dict(position="sinusoidal", norm="layernorm", norm_placement="post", activation="relu"),
    dict(position="rope", norm="rmsnorm", norm_placement="pre", activation="swiglu"),
    dict(position="none", norm="rmsnorm", norm_placement="post", activation="geglu"),
]


def _run(model, x, tgt):
    return model(x, tgt) if model.config.family == "encoder-decoder" else model(x)


@pytest.mark.parametrize("family", ["encoder", "decoder", "encoder-decoder"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: o["position"])
def test_every_family_and_option_sees_what_it_should(family, options):
    """Changing the last input token changes the outputs a family lets it reach, and only them:
    every position of an encoder, only the last position of a (causal) decoder."""
    model = Transformer(tiny_config(family, n_kv_heads=2, **options)).eval()
    x, tgt = torch.randint(0, 50, (2, 10)), torch.randint(0, 50, (2, 6))
    changed = (x.clone(), tgt.clone())
    changed[family == "encoder-decoder"][:, -1] += 1  # the decoder input when there is one
    out, out2 = _run(model, x, tgt), _run(model, *changed)
    assert out.shape == (2, 6 if family == "encoder-decoder" else 10, 50)
    moved = (out - out2).abs().amax(dim=(0, 2)) > 1e-5  # (T,): which positions changed
    if family == "encoder":
        assert moved.all()
    else:
        assert moved[-1] and not moved[:-1].any()


def test_heads_and_pooling():
    cfg = tiny_config("encoder", labels=["neg", "pos", "neutral"], pooler=True, type_vocab_size=2,
                      embedding_norm=True, mlm_transform=True, lm_head_bias=True,
                      normalize_embeddings=True)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 50, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0
    assert model.classify(x, mask).shape == (3, 3)
    emb = model.sentence_embedding(x, mask)
    assert emb.shape == (3, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    x[0, 5:] = (x[0, 5:] + 1) % 50  # padding never changes the sentence vector
    assert torch.allclose(model.sentence_embedding(x, mask)[0], emb[0], atol=1e-6)
    assert model.encode(x, mask).shape == (3, 8, 32)
    decoder = Transformer(tiny_config("decoder", pooling="last", labels=["a", "b"])).eval()
    assert decoder.classify(x, mask).shape == (3, 2)
    with pytest.raises(InputError, match="no classification head"):
        Transformer(tiny_config("encoder")).classify(x)


def test_last_pooling_finds_the_last_real_token_on_either_side():
    h = torch.arange(2 * 4).float().view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    from qkv.model import pool

    assert pool(h, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(h, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(h, right, "mean").flatten().tolist() == [0.5, 5.5]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_a_future_token_never_changes_a_past_logit(position):
    model = Transformer(tiny_config("decoder", position=position)).eval()
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 7) % 50
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_padding_never_changes_real_outputs(family):
    model = Transformer(tiny_config(family)).eval()
    x = torch.randint(0, 50, (1, 7))
    padded = torch.cat([x, torch.randint(0, 50, (1, 4))], dim=1)
    mask = torch.tensor([[1] * 7 + [0] * 4])
    full = model(x)
    with_pad = model(padded, padding_mask=mask)
    assert (full - with_pad[:, :7]).abs().max() < 1e-5


def test_source_padding_never_changes_the_translation():
    model = Transformer(tiny_config("encoder-decoder", position="sinusoidal")).eval()
    src, tgt = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 5))
    padded = torch.cat([src, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    assert (model(src, tgt) - model(padded, tgt, src_mask=mask)).abs().max() < 1e-5


def _greedy(model, prompt, steps, use_cache, memory=None, src_mask=None):
    seq = prompt
    cache = model.new_cache() if use_cache else None
    step_input = seq
    logits_seen = []
    for _ in range(steps):
        if memory is None:
            logits = model(step_input, cache=cache)
        else:
            logits = model.decode(step_input, memory, src_mask, cache=cache)
        last = logits[:, -1]
        logits_seen.append(last)
        nxt = last.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        step_input = nxt if use_cache else seq
    return seq, torch.stack(logits_seen, 1)


@pytest.mark.parametrize("position", ["learned", "rope", "sinusoidal"])
def test_cached_decoding_equals_full_forward_decoder(position):
    cfg = tiny_config("decoder", position=position, n_kv_heads=2, max_seq_len=80)
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        seq_a, logits_a = _greedy(model, prompt, 64, use_cache=False)
        seq_b, logits_b = _greedy(model, prompt, 64, use_cache=True)
    assert torch.equal(seq_a, seq_b)
    assert (logits_a - logits_b).abs().max() < 1e-4


def test_cached_decoding_equals_full_forward_encoder_decoder():
    cfg = tiny_config("encoder-decoder", position="sinusoidal", norm_placement="post",
                      scale_embeddings=True, max_seq_len=80)
    model = Transformer(cfg).eval()
    src = torch.randint(0, 50, (2, 9))
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    src_mask[1, 6:] = False
    start = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        seq_a, logits_a = _greedy(model, start, 64, False, memory, src_mask)
        seq_b, logits_b = _greedy(model, start, 64, True, memory, src_mask)
    assert torch.equal(seq_a, seq_b)
    assert (logits_a - logits_b).abs().max() < 1e-4


def test_recording_attention_returns_maps_and_keeps_outputs():
    model = Transformer(tiny_config("encoder-decoder")).eval()
    src, tgt = torch.randint(0, 50, (1, 6)), torch.randint(0, 50, (1, 4))
    plain = model(src, tgt)
    with qkv.record_attention(model) as maps:
        recorded = model(src, tgt)
    assert (plain - recorded).abs().max() < 1e-5
    assert maps["encoder.layers.0.attn"][0].shape == (1, 4, 6, 6)
    assert maps["decoder.layers.1.self_attn"][0].shape == (1, 4, 4, 4)
    assert maps["decoder.layers.1.cross_attn"][0].shape == (1, 4, 4, 6)
    assert all(m.recorded is None for m in model.modules() if hasattr(m, "recorded"))


@pytest.mark.parametrize("family", ["encoder", "decoder", "encoder-decoder"])
def test_overfitting_one_batch_drives_the_loss_near_zero(family):
    torch.manual_seed(0)
    model = Transformer(tiny_config(family, d_model=64, vocab_size=20))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 20, (4, 12))
    y = torch.randint(0, 20, (4, 12))
    for _ in range(80):
        if family == "encoder-decoder":
            logits = model(x, y[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), y[:, 1:].flatten())
        elif family == "encoder":  # predict a fixed target at every position (like MLM)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        else:
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def _long(*shape):
    return torch.zeros(*shape, dtype=torch.long)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.tensor([[1, 2, 50]])), "token id 50 is outside the table of size 50"),
    (lambda m: m(_long(1, 17)), "longer than max_seq_len=16"),
    (lambda m: m(_long(5)), "shape \\(batch, length\\)"),
    (lambda m: m(_long(2, 5), padding_mask=torch.ones(2, 4)), "padding mask has shape"),
    (lambda m: m(torch.zeros(1, 5)), "integer tensor"),
    (lambda m: m(_long(1, 5), _long(1, 5)), "padding_mask=mask"),
    (lambda m: m.encode(_long(1, 5)), "has no encoder"),
    (lambda m: m.next_token_logits(_long(1, 2), m.new_cache(), torch.ones(1, 3)),
     "expected \\(1, 2\\) \\(batch, length\\)"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    model = Transformer(tiny_config("decoder", max_seq_len=16)).eval()
    with pytest.raises(InputError, match=message):
        call(model)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(_long(1, 5)), "needs target tokens"),
    (lambda m: m.decode(_long(1, 2)), "pass memory=model.encode"),
    (lambda m: m.decode(_long(1, 2), m.encode(_long(1, 4)), torch.ones(1, 3)),
     "src_mask has shape"),
])
def test_bad_encoder_decoder_inputs_raise_clear_errors(call, message):
    with pytest.raises(InputError, match=message):
        call(Transformer(tiny_config("encoder-decoder")).eval())


def test_tied_output_layer_shares_the_embedding():
    model = Transformer(tiny_config("decoder"))
    assert model.lm_head.weight is model.token_embedding.weight
    untied = Transformer(tiny_config("decoder", tie_embeddings=False))
    assert untied.num_parameters() == model.num_parameters() + 50 * 32


@pytest.mark.parametrize("family", ["decoder", "encoder-decoder"])
def test_next_token_logits_continue_a_cache_like_the_full_forward(family):
    model = Transformer(tiny_config(family)).eval()
    src, tgt = torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 9))
    memory = model.encode(src) if family == "encoder-decoder" else None
    full = model(src, tgt) if memory is not None else model(tgt)  # (2, 9, 50)
    cache = model.new_cache()
    first = model.next_token_logits(tgt[:, :5], cache, memory=memory)  # a prompt, then tokens
    rest = [model.next_token_logits(tgt[:, t:t + 1], cache, memory=memory) for t in range(5, 9)]
    assert first.shape == (2, 50) and first.dtype == torch.float32 and len(cache) == 9
    torch.testing.assert_close(torch.stack([first, *rest], 1), full[:, 4:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_a_cache_per_row_continues_rows_of_different_lengths_without_padding(position):
    """Rows that continue sequences of different lengths, each from its own cache, get the
    logits each would get alone; the filler rows after the live ones do not disturb them."""
    model = Transformer(tiny_config("decoder", position=position, n_kv_heads=2)).eval()
    prompts = [torch.randint(0, 50, (1, n)) for n in (3, 7)]
    alone, caches = [], []
    with torch.no_grad():
        for p in prompts:
            own = model.new_cache()
            model.next_token_logits(p, own)
            alone.append(model.next_token_logits(torch.tensor([[9]]), own))  # (1, V)
            caches.append(model.new_cache())
            model.next_token_logits(p, caches[-1])
        filler = torch.tensor([[9], [9], [0], [0]])  # two live rows, two filler rows
        rows = model.next_token_logits(filler, caches)  # (4, V)
    assert [len(c) for c in caches] == [4, 8]
    torch.testing.assert_close(rows[:2], torch.cat(alone), atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="cache per row"):
        model.next_token_logits(filler, caches, padding_mask=torch.ones(4, 1))


def test_checkpoints_with_earlier_parameter_names_still_load(tmp_path):
    from safetensors.torch import save_file

    model = Transformer(tiny_config("decoder", tie_embeddings=False))
    old = {("tokens.weight" if k == "token_embedding.weight" else k): v.clone()
           for k, v in model.state_dict().items()}  # as qkv 0.1 named them
    fresh = Transformer(tiny_config("decoder", tie_embeddings=False))
    fresh.load_state_dict(old)
    assert torch.equal(fresh.token_embedding.weight, model.token_embedding.weight)
    model.config.to_json(tmp_path / "config.json")  # a model directory written by qkv 0.1
    save_file(old, str(tmp_path / "model.safetensors"))
    loaded, _ = qkv.load(tmp_path)
    assert torch.equal(loaded.token_embedding.weight, model.token_embedding.weight)
