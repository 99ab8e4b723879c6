"""Hugging Face checkpoints load into qkv with the same numbers, and qkv models save back.

Every test builds a tiny random model with transformers, saves it as safetensors, loads it with
qkv and compares: logits on padded batches (non-padded positions only), greedy generation, and
the tensors themselves after a qkv -> Hugging Face -> qkv round trip.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

TOL = 1e-5
VOCAB = 96




# ---------------------------------------------------------------------------- helpers


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every trained parameter (and logits-bias buffer), so that no norm is the
    identity and no bias is zero: a mapping that swaps two of them must show up in the outputs.
    Frozen ones (Marian's sinusoidal table) are a formula and stay as they are."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
        for name, b in model.named_buffers():
            if name.endswith("final_logits_bias"):
                b.add_(torch.randn_like(b) * scale)
    return model.eval()


def _hf_save_load(hf_model, tmp_path, **save_kw) -> qkv.Transformer:
    hf_model.save_pretrained(tmp_path, safe_serialization=True, **save_kw)
    model, _ = load_hf(tmp_path)
    return model


def _batch(B: int = 3, T: int = 10, lengths=(10, 7, 4), vocab: int = VOCAB, low: int = 0):
    ids = torch.randint(low, vocab, (B, T))
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


def _greedy_decoder(model: qkv.Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The simplest greedy loop with a KV cache: feed the prompt, then one token at a time."""
    cache = model.new_cache()
    logits = model(prompt, cache=cache)
    out = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        logits = model(nxt, cache=cache)
    return torch.cat([prompt, *out], dim=1)


def _greedy_seq2seq(model: qkv.Transformer, src: torch.Tensor, src_mask: torch.Tensor,
                    n: int) -> torch.Tensor:
    start = model.config.decoder_start_token_id
    memory = model.encode(src, src_mask)
    cache = model.new_cache()
    tgt = torch.full((src.shape[0], 1), start, dtype=torch.long)
    logits = model.decode(tgt, memory, src_mask, cache=cache)
    out = [tgt]
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model.decode(nxt, memory, src_mask, cache=cache)
    return torch.cat(out, dim=1)


def _hf_greedy(hf_model, n: int, **inputs) -> torch.Tensor:
    gen = transformers.GenerationConfig(
        max_new_tokens=n, do_sample=False, num_beams=1,
        eos_token_id=hf_model.config.eos_token_id, pad_token_id=hf_model.config.pad_token_id,
        decoder_start_token_id=getattr(hf_model.config, "decoder_start_token_id", None),
    )
    with torch.no_grad():
        return hf_model.generate(**inputs, generation_config=gen)


def _same_until_eos(hf_out: torch.Tensor, ours: torch.Tensor, eos: int | None,
                    skip: int) -> int:
    """Compare row by row; Hugging Face stops a row at its end token, so compare up to it.
    Returns how many generated tokens were compared (the test wants many)."""
    compared = 0
    for h, o in zip(hf_out.tolist(), ours.tolist(), strict=True):
        gen = h[skip:]
        if eos is not None and eos in gen:
            gen = gen[: gen.index(eos) + 1]
        assert o[skip: skip + len(gen)] == gen
        compared += len(gen)
    return compared


# ---------------------------------------------------------------------------- GPT-2


GPT2_CASES = [
    dict(n_embd=32, n_head=4, tie_word_embeddings=True),
    dict(n_embd=48, n_head=2, tie_word_embeddings=False, activation_function="gelu",
         n_inner=80),
    dict(n_embd=64, n_head=8, activation_function="relu", layer_norm_epsilon=1e-6),
]


@pytest.mark.parametrize("case", GPT2_CASES)
def test_gpt2_logits_and_greedy(case, tmp_path):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_layer=2, n_positions=64, bos_token_id=1,
                                  eos_token_id=2, **case)
    hf = _perturb(transformers.GPT2LMHeadModel(cfg))
    model = _hf_save_load(hf, tmp_path)
    assert model.config.tie_embeddings == case.get("tie_word_embeddings", True)
    ids, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = model(ids, padding_mask=mask)
    assert _max_diff(want, got, mask) <= TOL

    prompt = torch.randint(3, VOCAB, (2, 5))
    hf_out = _hf_greedy(hf, 30, input_ids=prompt, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        ours = _greedy_decoder(model, prompt, 30)
    assert _same_until_eos(hf_out, ours, 2, skip=5) >= 30


def test_gpt2_base_model_without_prefix(tmp_path):
    """GPT2Model is saved without the "transformer." prefix and without an LM head."""
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4,
                                  n_positions=32)
    hf = _perturb(transformers.GPT2Model(cfg))
    model = _hf_save_load(hf, tmp_path)
    ids, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.hidden_states(ids, mask)
    assert _max_diff(want, got, mask) <= TOL


# ---------------------------------------------------------------------------- Llama


LLAMA_CASES = [
    dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2),  # GQA
    dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=6, attention_bias=True,
         mlp_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
]


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_logits_and_greedy(case, tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, intermediate_size=72,
                                   max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                   **case)
    hf = _perturb(transformers.LlamaForCausalLM(cfg))
    model = _hf_save_load(hf, tmp_path)
    assert model.config.n_kv_heads == case["num_key_value_heads"]
    ids, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = model(ids, padding_mask=mask)
    assert _max_diff(want, got, mask) <= TOL

    prompt = torch.randint(3, VOCAB, (2, 6))
    hf_out = _hf_greedy(hf, 30, input_ids=prompt, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        ours = _greedy_decoder(model, prompt, 30)
    assert _same_until_eos(hf_out, ours, 2, skip=6) >= 30


# ---------------------------------------------------------------------------- BERT


def _bert_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=64)
    return transformers.BertConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [dict(), dict(tie_word_embeddings=False, hidden_act="gelu_new",
                                             num_attention_heads=2, type_vocab_size=3)])
def test_bert_masked_lm(kw, tmp_path):
    hf = _perturb(transformers.BertForMaskedLM(_bert_config(**kw)))
    model = _hf_save_load(hf, tmp_path)
    assert model.config.mlm_transform and model.config.lm_head_bias
    assert not model.config.pooler  # BertForMaskedLM has none
    ids, mask = _batch()
    types = torch.randint(0, kw.get("type_vocab_size", 2), ids.shape)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = model.logits(model.encode(ids, mask, token_types=types))
    assert _max_diff(want, got, mask) <= TOL


def test_bert_base_model_and_pooler(tmp_path):
    hf = _perturb(transformers.BertModel(_bert_config(hidden_size=64, num_attention_heads=8)))
    model = _hf_save_load(hf, tmp_path)
    assert model.config.pooler and not model.config.mlm_transform
    ids, mask = _batch()
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask)
        h = model.encode(ids, mask)
        pooled = model.pooler(h)
    assert _max_diff(out.last_hidden_state, h, mask) <= TOL
    assert (out.pooler_output - pooled).abs().max().item() <= TOL


def test_bert_sequence_classification_labels(tmp_path):
    names = {0: "negative", 1: "neutral", 2: "positive"}
    cfg = _bert_config(id2label=names, label2id={v: k for k, v in names.items()})
    hf = _perturb(transformers.BertForSequenceClassification(cfg))
    model = _hf_save_load(hf, tmp_path)
    assert model.config.labels == ["negative", "neutral", "positive"]
    ids, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = model.classify(ids, mask)
    assert (want - got).abs().max().item() <= TOL


# ---------------------------------------------------------------------------- Marian, BART


def _seq2seq_config(cls, **kw):
    base = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=VOCAB - 1,
                eos_token_id=0, decoder_start_token_id=VOCAB - 1, forced_eos_token_id=None)
    return cls(**{**base, **kw})


def _seq2seq_model(cls, config):
    """A random model; when untied, transformers 5 gives each stack its own embedding copy,
    which must hold the same table for qkv (it has one)."""
    hf = _perturb(cls(config))
    with torch.no_grad():
        hf.model.decoder.embed_tokens.weight.copy_(hf.model.encoder.embed_tokens.weight)
    return hf


def _seq2seq_check(hf, model, tmp_path, eos: int):
    src, src_mask = _batch(lengths=(10, 8, 3), low=1)
    tgt, tgt_mask = _batch(T=7, lengths=(7, 5, 2), low=1)
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt,
                  decoder_attention_mask=tgt_mask).logits
        got = model(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask)
    assert _max_diff(want, got, tgt_mask) <= TOL

    src, src_mask = src[:2, :8], src_mask[:2, :8]  # one row with padding
    hf_out = _hf_greedy(hf, 30, input_ids=src, attention_mask=src_mask)
    with torch.no_grad():
        ours = _greedy_seq2seq(model, src, src_mask, 30)
    assert _same_until_eos(hf_out, ours, eos, skip=1) >= 30


MARIAN_CASES = [
    dict(activation_function="swish", scale_embedding=True),
    dict(activation_function="gelu", scale_embedding=False, tie_word_embeddings=False,
         decoder_layers=1),
    dict(activation_function="relu", scale_embedding=True, d_model=48, encoder_attention_heads=3,
         decoder_attention_heads=3),
]


@pytest.mark.parametrize("case", MARIAN_CASES)
def test_marian_logits_and_greedy(case, tmp_path):
    hf = _seq2seq_model(transformers.MarianMTModel,
                        _seq2seq_config(transformers.MarianConfig, **case))
    model = _hf_save_load(hf, tmp_path)
    cfg = model.config
    assert cfg.sinusoidal_layout == "halves" and cfg.lm_head_bias
    assert cfg.activation == {"swish": "silu"}.get(case["activation_function"],
                                                   case["activation_function"])
    _seq2seq_check(hf, model, tmp_path, eos=0)


@pytest.mark.parametrize("case", [dict(), dict(scale_embedding=True, activation_function="relu",
                                               tie_word_embeddings=False)])
def test_bart_logits_and_greedy(case, tmp_path):
    hf = _seq2seq_model(transformers.BartForConditionalGeneration,
                        _seq2seq_config(transformers.BartConfig, **case))
    model = _hf_save_load(hf, tmp_path)
    assert model.config.position_offset == 2 and model.config.embedding_norm
    _seq2seq_check(hf, model, tmp_path, eos=0)


def test_separate_encoder_decoder_embeddings_are_refused(tmp_path):
    config = _seq2seq_config(transformers.MarianConfig, tie_word_embeddings=False)
    hf = _perturb(transformers.MarianMTModel(config))  # the two copies now differ
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(qkv.UnsupportedModelError, match="encoder and the decoder"):
        load_hf(tmp_path)


def test_sharded_checkpoint(tmp_path):
    """Weights split over several files, listed in model.safetensors.index.json."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64)
    hf = _perturb(transformers.LlamaForCausalLM(cfg))
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, _ = qkv.load(tmp_path)
    ids, mask = _batch()
    with torch.no_grad():
        assert _max_diff(hf(input_ids=ids, attention_mask=mask).logits,
                         model(ids, padding_mask=mask), mask) <= TOL


# ---------------------------------------------------------------------------- qkv -> HF -> qkv


ROUND_TRIPS = {
    "gpt2": (dict(family="decoder", position="learned", activation="gelu_tanh",
                  tie_embeddings=False, bos_token_id=1, eos_token_id=2),
             "AutoModelForCausalLM"),
    "llama": (dict(family="decoder", position="rope", norm="rmsnorm", activation="swiglu",
                   bias=False, n_kv_heads=2, tie_embeddings=False, rope_theta=1000.0, d_ff=80),
              "AutoModelForCausalLM"),
    "bert": (dict(family="encoder", norm_placement="post", embedding_norm=True,
                  type_vocab_size=2, mlm_transform=True, pooler=True, lm_head_bias=True,
                  labels=["no", "yes"], pooling="mean", normalize_embeddings=True,
                  norm_eps=1e-12, pad_token_id=0, mask_token_id=4),
             "AutoModelForMaskedLM"),
    "bert-untied": (dict(family="encoder", norm_placement="post", embedding_norm=True,
                         type_vocab_size=1, mlm_transform=True, lm_head_bias=True,
                         tie_embeddings=False, activation="gelu_tanh", pooling="cls"),
                    "AutoModelForMaskedLM"),
    "marian-untied": (dict(family="encoder-decoder", position="sinusoidal",
                           sinusoidal_layout="halves", norm_placement="post", activation="relu",
                           tie_embeddings=False, pad_token_id=49, decoder_start_token_id=49),
                      "AutoModelForSeq2SeqLM"),
    "marian": (dict(family="encoder-decoder", position="sinusoidal", sinusoidal_layout="halves",
                    norm_placement="post", activation="silu", scale_embeddings=True,
                    lm_head_bias=True, n_decoder_layers=1, pad_token_id=49, eos_token_id=0,
                    decoder_start_token_id=49),
               "AutoModelForSeq2SeqLM"),
    "bart": (dict(family="encoder-decoder", position="learned", position_offset=2,
                  embedding_norm=True, norm_placement="post", lm_head_bias=True,
                  pad_token_id=1, eos_token_id=2, decoder_start_token_id=2),
             "AutoModelForSeq2SeqLM"),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip_bit_exact(name, tmp_path):
    fields, auto = ROUND_TRIPS[name]
    cfg = qkv.ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                          **fields)
    model = _perturb(qkv.Transformer(cfg))
    save_hf(model, None, tmp_path)
    back, tokenizer = qkv.load(tmp_path)
    assert tokenizer is None
    assert back.config == cfg  # sizes left out compare equal to the ones they stand for
    state, state_back = model.state_dict(), back.state_dict()
    assert state.keys() == state_back.keys()
    for k in state:
        assert torch.equal(state[k], state_back[k]), k

    # transformers loads what qkv wrote, every weight found, and computes the same outputs.
    hf, info = getattr(transformers, auto).from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"], info
    ids, mask = _batch(vocab=50, low=3)
    with torch.no_grad():
        if cfg.family == "encoder-decoder":
            want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=ids,
                      decoder_attention_mask=mask).logits
            got = model(ids, ids, src_mask=mask, tgt_mask=mask)
        else:
            want = hf(input_ids=ids, attention_mask=mask).logits
            got = model(ids, padding_mask=mask)
    assert _max_diff(want, got, mask) <= TOL
    if cfg.labels:
        classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
        with torch.no_grad():
            want = classifier.eval()(input_ids=ids, attention_mask=mask).logits
            assert (want - model.classify(ids, mask)).abs().max().item() <= TOL
        assert classifier.config.id2label == {0: "no", 1: "yes"}
