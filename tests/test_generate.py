"""qkv.generate: sampling filters, KV-cache decoding, batches, stop strings, context limits."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import qkv
from qkv import InputError, Tokenizer
from qkv.generate import (
    decode_tokens,
    filter_logits,
    generate_seq2seq,
    sample_next,
    stream_generate,
)
from qkv.quantize import PackedLinear, pack_linears

TEXT = "the quick brown fox jumps over the lazy dog.\nTHE FIVE BOXING WIZARDS JUMP QUICKLY!\n"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT], kind="char")


def make_model(tokenizer, position="learned", max_seq_len=128, **kw) -> qkv.Transformer:
    """A random 2-layer GPT whose logits are spread out (so that greedy choices are clear)."""
    torch.manual_seed(0)
    cfg = qkv.ModelConfig(family="decoder", vocab_size=tokenizer.vocab_size, d_model=32,
                          n_layers=2, n_heads=4, max_seq_len=max_seq_len, position=position,
                          tie_embeddings=False, **kw)
    model = qkv.Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def naive_greedy(model, ids: list[int], n: int) -> list[int]:
    """The definition: run the whole sequence again for every new token."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[-n:]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_cached_greedy_equals_uncached_for_100_tokens(tokenizer, position):
    model = make_model(tokenizer, position)
    prompt = tokenizer.encode("the quick")
    cached = [int(t) for t in decode_tokens(model, [prompt], 100, temperature=0)]
    assert cached == naive_greedy(model, prompt, 100)
    assert len(set(cached)) > 1


def test_filters_keep_exactly_the_top_k_and_nucleus_sets():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.2, 0.1]])
    logits = probs.log()
    allowed = lambda out: set(torch.isfinite(out[0]).nonzero().flatten().tolist())  # noqa: E731
    assert allowed(filter_logits(logits, top_k=2)) == {1, 3}
    assert allowed(filter_logits(logits, top_p=0.6)) == {1, 3}  # 0.5 < 0.6, 0.5 + 0.2 >= 0.6
    assert allowed(filter_logits(logits, top_p=0.5)) == {1}  # the best token is always kept
    assert allowed(filter_logits(logits, top_p=0.71)) == {1, 3, 2}
    assert allowed(filter_logits(logits, top_k=3, top_p=0.6)) == {1, 3}
    assert allowed(filter_logits(logits)) == {0, 1, 2, 3, 4}

    generator = torch.Generator().manual_seed(0)
    many = logits.expand(5000, -1)
    drawn = set(sample_next(many, 1.0, top_k=3, generator=generator).tolist())
    assert drawn == {1, 2, 3}  # all three allowed tokens show up; nothing else ever does
    drawn = set(sample_next(many, 1.5, top_p=0.6, generator=generator).tolist())
    assert drawn == {1, 3}
    assert sample_next(logits, temperature=0).tolist() == [1]


def test_sampling_with_a_seed_is_reproducible(tokenizer):
    model = make_model(tokenizer)
    a = qkv.generate(model, tokenizer, "the", max_new_tokens=40, seed=5)
    b = qkv.generate(model, tokenizer, "the", max_new_tokens=40, seed=5)
    c = qkv.generate(model, tokenizer, "the", max_new_tokens=40, seed=6)
    assert a == b and a != c and len(a) == 40


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_a_left_padded_batch_equals_one_prompt_at_a_time(tokenizer, position):
    model = make_model(tokenizer, position)
    prompts = ["fox", "the lazy dog jumps", "WIZARDS", "q"]
    batch = qkv.generate(model, tokenizer, prompts, max_new_tokens=30, temperature=0)
    alone = [qkv.generate(model, tokenizer, p, max_new_tokens=30, temperature=0)
             for p in prompts]
    assert batch == alone
    assert alone[0] == tokenizer.decode(naive_greedy(model, tokenizer.encode("fox"), 30))


def test_stop_strings_end_the_text_and_never_stream(tokenizer):
    model = make_model(tokenizer)
    full = qkv.generate(model, tokenizer, "the", max_new_tokens=60, temperature=0)
    stop = full[25:28]
    pieces: list[str] = []
    text = qkv.generate(model, tokenizer, "the", max_new_tokens=60, temperature=0, stop=[stop],
                        stream=pieces.append)
    assert text == full[:full.find(stop)]
    assert "".join(pieces) == text and all(stop not in p for p in pieces)
    rows = dict.fromkeys(range(2), "")
    for i, piece in stream_generate(model, tokenizer, ["the", "the"], 60, temperature=0,
                                    stop=stop):
        rows[i] += piece
    assert rows == {0: text, 1: text}


def test_a_prompt_longer_than_the_context_is_an_error_unless_truncated(tokenizer):
    model = make_model(tokenizer, max_seq_len=16)
    long_prompt = "the quick brown fox jumps"
    with pytest.raises(InputError, match="context is 16"):
        qkv.generate(model, tokenizer, long_prompt, max_new_tokens=5)
    kept_end = qkv.generate(model, tokenizer, long_prompt, max_new_tokens=5, temperature=0,
                            truncate_left=True)
    assert kept_end == qkv.generate(model, tokenizer, long_prompt[-16:], max_new_tokens=5,
                                    temperature=0)


def test_decoding_sizes_each_cache_once_for_the_prompt_and_the_new_tokens(tokenizer,
                                                                          monkeypatch):
    model = make_model(tokenizer, max_seq_len=128)
    made = []
    new_cache = model.new_cache

    def spy(capacity=None):
        made.append(new_cache(capacity))
        return made[-1]
    monkeypatch.setattr(model, "new_cache", spy)
    prompt = tokenizer.encode("the quick")  # 9 tokens
    tokens = [int(t) for t in decode_tokens(model, [prompt], 90, temperature=0)]
    assert tokens == naive_greedy(model, prompt, 90)
    (cache,) = made
    for self_cache, _ in cache.layers:  # room for 9 + 90: never reallocated past 64
        assert self_cache._k is not None and self_cache._k.shape[-2] == 9 + 90
        assert len(self_cache) == 9 + 89  # the last token is never fed back
    made.clear()
    list(decode_tokens(model, [prompt], 500, temperature=0))  # more than the context holds
    assert made[0].layers[0][0]._k.shape[-2] == 128


def test_a_full_context_stops_or_slides(tokenizer):
    model = make_model(tokenizer, max_seq_len=16)
    prompt = tokenizer.encode("the quick ")  # 10 tokens
    stopped = list(decode_tokens(model, [prompt], 30, temperature=0, on_full="stop"))
    assert len(stopped) == 16 - 10 + 1  # the last token is predicted from 16 positions
    slid = [int(t) for t in decode_tokens(model, [prompt], 30, temperature=0)]
    assert len(slid) == 30 and slid[:7] == [int(t) for t in stopped]
    # After the slide the window restarts at position 0, so the next token is the one the
    # model predicts from the newest 12 tokens alone.
    sequence = prompt + slid
    assert slid[7] == naive_greedy(model, sequence[:17][-12:], 1)[0]


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-1), "temperature=-1 must be >= 0"),
    (dict(top_p=0), "top_p=0 must be in"),
    (dict(top_k=0), "top_k=0 must be a whole number"),
    (dict(max_new_tokens=-2), "max_new_tokens=-2 must be"),
    (dict(on_full="wrap"), "on_full='wrap' must be"),
])
def test_generate_checks_its_arguments(tokenizer, options, message):
    with pytest.raises(InputError, match=message):
        qkv.generate(make_model(tokenizer), tokenizer, "a", **options)


def test_an_empty_prompt_starts_from_the_start_token(tokenizer):
    model = make_model(tokenizer)
    assert len(qkv.generate(model, tokenizer, "", max_new_tokens=3, temperature=0)) == 3
    assert model.training is False


def test_seq2seq_greedy_and_beam_search():
    torch.manual_seed(0)
    cfg = qkv.ModelConfig(family="encoder-decoder", vocab_size=20, d_model=32, n_layers=2,
                          n_heads=4, max_seq_len=32, decoder_start_token_id=0, eos_token_id=1,
                          tie_embeddings=False)
    model = qkv.Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    src = torch.tensor([[5, 6, 7, 8, 9], [9, 3, 4, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    greedy = generate_seq2seq(model, src, mask, max_new_tokens=12)
    for row in range(2):
        tgt = [0]
        with torch.no_grad():
            for _ in range(12):
                logits = model(src[row:row + 1, :int(mask[row].sum())], torch.tensor([tgt]))
                tgt.append(int(logits[0, -1].argmax()))
                if tgt[-1] == 1:
                    break
        expected = tgt[1:-1] if tgt[-1] == 1 else tgt[1:]
        assert greedy[row] == expected
    beams = generate_seq2seq(model, src, mask, max_new_tokens=12, beam_size=3)
    assert len(beams) == 2 and all(all(2 <= t < 20 or t == 0 for t in b) for b in beams)


def test_packed_bf16_linears_give_nn_linears_numbers_and_decode_the_same(tokenizer):
    model = make_model(tokenizer).to(torch.bfloat16)
    prompt = tokenizer.encode("the quick")
    expected = naive_greedy(model, prompt, 40)  # full-sequence matmuls
    head = model.lm_head.weight
    assert pack_linears(model) is model
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(type(m) is PackedLinear for m in layers)
    assert model.lm_head.weight is head  # the same parameters, not copies
    layer = layers[0]
    with torch.inference_mode():
        for shape in [(1, 1), (3, 2), (8, 1), (2, 37)]:  # one row, a few, a prompt
            x = torch.randn(*shape, layer.in_features, dtype=torch.bfloat16)
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    if layer._packed is not None:  # where oneDNN's bf16 kernel exists, the packed path ran
        assert layer._packed.is_mkldnn
    cached = [int(t) for t in decode_tokens(model, [prompt], 40, temperature=0)]
    assert cached == expected


def test_a_packed_linear_follows_its_weight_and_trains_like_a_plain_one():
    """The packed copy is remade when the weight changes in place, and with gradients on the
    layer is an ordinary nn.Linear (gradients reach the weight)."""
    torch.manual_seed(0)
    layer = PackedLinear(torch.nn.Linear(16, 24).to(torch.bfloat16))
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)
        after = layer(x)
    assert torch.equal(after, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert not torch.equal(before, after)
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    twin = copy.deepcopy(layer)  # a used layer copies (its packed copy is left behind)
    with torch.no_grad():
        assert torch.equal(twin(x), layer(x))


def test_fp32_packing_is_for_its_row_count_only():
    torch.manual_seed(0)
    plain = torch.nn.Linear(16, 24)
    layer = pack_linears(torch.nn.Sequential(plain), rows=4)[0]
    assert type(layer) is PackedLinear and layer.rows == 4
    with torch.inference_mode():
        for rows in (1, 4, 5):
            x = torch.randn(rows, 16)
            y = layer(x)
            assert torch.allclose(y, plain(x), atol=1e-5)
            if rows != 4:  # other row counts take nn.Linear's own path: the same bits
                assert torch.equal(y, torch.nn.functional.linear(x, plain.weight, plain.bias))


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_a_wide_beam_finds_the_best_translation_by_exhaustive_search(length_penalty):
    # Vocabulary of 5 (0 = start, 1 = end) and at most 3 new tokens: 156 possible outputs. A beam
    # wider than that keeps every one of them, so it must return the exact optimum of its
    # objective: summed log-probabilities (the end token included), divided by
    # length ** length_penalty.
    torch.manual_seed(3)
    cfg = qkv.ModelConfig(family="encoder-decoder", vocab_size=5, d_model=16, n_layers=1,
                          n_heads=2, max_seq_len=8, decoder_start_token_id=0, eos_token_id=1)
    model = qkv.Transformer(cfg).eval()
    src = torch.tensor([[2, 3, 4, 2]])

    def log_prob(target: list[int]) -> float:
        with torch.no_grad():
            logp = model(src, torch.tensor([[0] + target[:-1]]))[0].log_softmax(-1)
        return sum(float(logp[i, t]) for i, t in enumerate(target))

    candidates = []
    for n in range(4):
        for seq in itertools.product(range(5), repeat=n):
            seq = list(seq)
            if 1 in seq:
                continue
            if n < 3:  # ended by the end token
                candidates.append((log_prob(seq + [1]) / (n + 1) ** length_penalty, seq))
            else:  # cut at max_new_tokens
                candidates.append((log_prob(seq) / n ** length_penalty, seq))
    best = max(candidates)[1]
    found = generate_seq2seq(model, src, max_new_tokens=3, beam_size=200,
                             length_penalty=length_penalty)
    assert found == [best]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_logit_anywhere(bad):
    from qkv.generate import all_finite

    logits = torch.randn(8, 1000)
    assert all_finite(logits)
    for row, col in ((0, 0), (7, 999), (3, 500)):
        broken = logits.clone()
        broken[row, col] = bad
        assert not all_finite(broken)
        with pytest.raises(qkv.InputError, match="NaN/inf"):
            sample_next(broken, temperature=0)
