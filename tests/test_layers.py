import math

import pytest
import torch

from qkv.layers import (
    LayerNorm,
    RMSNorm,
    RotaryEmbedding,
    SelfAttention,
    attention,
    sinusoidal_table,
)
from qkv.layers.feedforward import ACTIVATIONS, GatedFeedForward, gelu_reference
from qkv.layers.position import apply_rotary


def _qkv(B=2, H=4, Tq=7, Tk=7, D=8, Hkv=None):
    q = torch.randn(B, H, Tq, D)
    k = torch.randn(B, Hkv or H, Tk, D)
    v = torch.randn(B, Hkv or H, Tk, D)
    return q, k, v


def _padding(B, Tk):
    mask = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    mask[1, ..., Tk - 3:] = False  # the second sequence ends with 3 padding tokens
    return mask


@pytest.mark.parametrize("case", ["none", "causal", "padding", "causal+padding", "cache"])
def test_fast_and_explicit_attention_agree(case):
    Tq = 3 if case == "cache" else 7
    q, k, v = _qkv(Tq=Tq, Tk=7)
    mask = _padding(2, 7) if "padding" in case else None
    causal = case in ("causal", "causal+padding", "cache")
    fast, none = attention(q, k, v, mask, causal)
    slow, weights = attention(q, k, v, mask, causal, return_weights=True)
    assert none is None
    assert (fast - slow).abs().max() < 1e-6
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, Tq))
    if mask is not None:
        assert weights[1, ..., 4:].abs().max() == 0  # padding gets no attention
    if causal:  # query i (the last Tq positions) never sees a later key
        offset = 7 - Tq
        for i in range(Tq - 1):
            assert weights[..., i, offset + i + 1:].abs().max() == 0


def test_explicit_attention_is_the_formula():
    q, k, v = _qkv()
    _, weights = attention(q, k, v, return_weights=True)
    expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    assert torch.allclose(weights, expected, atol=1e-6)


def test_gqa_shares_each_kv_head_with_a_group_of_query_heads():
    q, k, v = _qkv(H=8, Hkv=2)
    out, _ = attention(q, k, v, causal=True)
    ref, _ = attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), causal=True)
    assert torch.allclose(out, ref, atol=1e-6)


def test_self_attention_with_all_kv_heads_equals_pytorch_multihead_attention():
    d, H = 32, 4
    ours = SelfAttention(d, H, n_kv_heads=H).eval()
    ref = torch.nn.MultiheadAttention(d, H, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.out.weight)
        ref.out_proj.bias.copy_(ours.out.bias)
    x = torch.randn(2, 9, d)
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)  # PyTorch: True = blocked
    expected, _ = ref(x, x, x, attn_mask=causal, need_weights=False)
    assert (ours(x, causal=True) - expected).abs().max() < 1e-5


def test_sinusoidal_table_is_the_papers_formula():
    d, P = 16, 50
    table = sinusoidal_table(P, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    halves = sinusoidal_table(P, d, "halves")
    assert torch.equal(halves[:, : d // 2], table[:, 0::2])
    assert torch.equal(halves[:, d // 2:], table[:, 1::2])


def test_rope_makes_scores_depend_only_on_relative_position():
    D = 16
    rope = RotaryEmbedding(D)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m, n):
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert score(3, 1) == pytest.approx(score(40, 38), abs=1e-4)
    assert score(10, 10) == pytest.approx((q * k).sum().item(), abs=1e-4)
    assert score(5, 1) != pytest.approx(score(5, 4), abs=1e-3)
    cos, sin = rope(torch.arange(5)[None])  # a rotation keeps the vector's length
    x = torch.randn(1, 2, 5, D)
    assert torch.allclose(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_norms_are_their_formulas():
    x = torch.randn(3, 5, 16)
    ln = LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ln.weight.uniform_()
        ln.bias.uniform_()
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    assert torch.allclose(ln(x), (x - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias,
                          atol=1e-5)
    rms = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        rms.weight.uniform_(-2, 2)  # a gain that is not all ones, so that it must be applied
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight
    assert torch.allclose(rms(x), expected, atol=1e-5)


def test_activations():
    x = torch.linspace(-4, 4, 101)
    assert torch.allclose(ACTIVATIONS["gelu"](x), gelu_reference(x), atol=1e-6)
    assert torch.allclose(ACTIVATIONS["relu"](x), x.clamp(min=0))
    tanh_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert torch.allclose(ACTIVATIONS["gelu_tanh"](x), tanh_gelu, atol=1e-6)


@pytest.mark.parametrize("activation, expected", [
    ("swiglu", [1.4621172, 0.9536234]),  # silu(x) * 2x
    ("geglu", [1.6823840, 0.1816092]),  # gelu_tanh(x) * 2x
])
def test_gated_feedforward_puts_the_activation_on_the_gate(activation, expected):
    ffn = GatedFeedForward(2, 2, activation)
    with torch.no_grad():  # gate = identity, up = 2 * identity, down = identity
        ffn.gate.weight.copy_(torch.eye(2))
        ffn.up.weight.copy_(2 * torch.eye(2))
        ffn.down.weight.copy_(torch.eye(2))
    out = ffn(torch.tensor([[1.0, -2.0]]))
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_kv_cache_reorder_keeps_the_chosen_rows_in_place_or_in_new_buffers():
    from qkv.layers.attention import KVCache
    cache = KVCache()
    k = torch.arange(3 * 2 * 4 * 5, dtype=torch.float32).view(3, 2, 4, 5)
    cache.append(k, -k)
    buffer = cache._k
    cache.reorder(torch.tensor([2, 2, 0]))  # beam search: as many rows, written in place
    assert cache._k is buffer and len(cache) == 4
    assert torch.equal(cache.k, k[[2, 2, 0]]) and torch.equal(cache.v, -k[[2, 2, 0]])
    cache.append(k[:, :, :1], k[:, :, :1])  # still grows after a reorder
    assert torch.equal(cache.k[:, :, 4], k[:, :, 0]) and len(cache) == 5
    cache.reorder(torch.tensor([1]))  # fewer rows: new buffers
    assert cache.k.shape == (1, 2, 5, 5) and torch.equal(cache.k[0, :, :4], k[2])


def test_a_kv_cache_made_with_its_capacity_fills_one_buffer_and_one_without_grows():
    from qkv.layers.attention import KVCache
    k = torch.randn(2, 3, 80, 4)
    sized, grown = KVCache(capacity=90), KVCache()
    for cache in (sized, grown):
        cache.append(k[:, :, :30], -k[:, :, :30])  # a prompt, then one position at a time
    buffer = sized._k
    assert buffer is not None and buffer.shape[-2] == 90
    for t in range(30, 80):
        for cache in (sized, grown):
            keys, values = cache.append(k[:, :, t:t + 1], -k[:, :, t:t + 1])
            assert torch.equal(keys, k[:, :, :t + 1]) and torch.equal(values, -k[:, :, :t + 1])
    assert sized._k is buffer  # never reallocated
    assert grown._k is not None and grown._k.shape[-2] == 130  # 64, then twice 65
    small = KVCache(capacity=4)  # a capacity below the first input still holds all of it
    assert torch.equal(small.append(k, k)[0], k) and small._k is not None
    assert small._k.shape[-2] == 80


def test_dropout_zeroes_a_fraction_p_scales_the_rest_and_does_nothing_in_eval():
    from qkv.layers import Dropout

    torch.manual_seed(0)
    x = torch.rand(200, 500) + 0.5  # no zeros of its own
    drop = Dropout(0.3).train()
    y = drop(x.requires_grad_())
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.01  # 100,000 draws: sd 0.0015
    torch.testing.assert_close(y[kept], (x / 0.7)[kept])
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, kept.float() / 0.7)
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.01  # the expected size is kept
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x) and not Dropout(1.0).train()(x).any()
    assert isinstance(drop, torch.nn.Dropout)
    y16 = Dropout(0.5).train()(x.detach().bfloat16())
    assert y16.dtype == torch.bfloat16
