"""qkv.explain: capture every stage, static maps, .npz, `qkv attention`, the explainer's API.

The page itself is tested in a real browser in test_explain_browser.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

import qkv
from explain_util import decoder, encoder, rnn, save_rnn, seq2seq
from qkv.baselines import RNNTranslator
from qkv.cli import main
from qkv.explain import alignment, capture, draw_next, plots
from qkv.explain.app import create_app, explain_router
from qkv.explain.capture import replay_steps
from qkv.generate import decode_tokens, generate_seq2seq, sample_next

TEXT = "the cat sat on it"


# ---------------------------------------------------------------------- capture: attention

@pytest.mark.parametrize("variant", [dict(position="learned"), dict(position="sinusoidal"),
                                     dict(position="rope", n_kv_heads=2)])
def test_stages_of_a_decoder_follow_the_formula(variant):
    model, tok = decoder(**variant)
    cap = capture(model, tok, TEXT)
    T = len(TEXT)
    assert cap.ids == tok.encode(TEXT, add_special_tokens=False)
    assert cap.layers() == ["decoder.layers.0.self_attn", "decoder.layers.1.self_attn"]
    for name in cap.layers():
        s = cap.stages(name)
        assert s["scores"].shape == (4, T, T) and s["output"].shape == (4, T, 8)
        assert torch.allclose(s["scaled"], s["scores"] / 8 ** 0.5)
        above = torch.ones(T, T, dtype=torch.bool).triu(1)  # later tokens: hidden
        assert torch.isinf(s["masked"][:, above]).all() and (s["masked"][:, above] < 0).all()
        assert torch.equal(s["masked"][:, ~above], s["scaled"][:, ~above])
        assert torch.equal(s["weights"][:, above], torch.zeros_like(s["weights"][:, above]))
        assert torch.allclose(s["weights"].sum(-1), torch.ones(4, T), atol=1e-6)
        assert torch.allclose(s["weights"], cap.attention[name], atol=1e-7)
        one = cap.stages(name, head=3)
        assert all(torch.allclose(one[k], s[k][3]) for k in ("scores", "weights", "output"))
        assert torch.equal(cap.mask(name), ~above)


def test_scores_and_output_match_the_attention_module():
    """Q.K from the block's own projections; .V through the output projection gives exactly
    what the attention layer handed to the residual stream."""
    model, tok = decoder()
    attn = model.decoder.layers[0].self_attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, a, out: seen.setdefault("out", out[0]))
    cap = capture(model, tok, TEXT)
    handle.remove()
    h = model.decoder.layers[0].self_attn_norm(cap.residual["decoder.embed"])  # (T, d)
    q, k, _ = attn.qkv(h).split(32, dim=-1)
    q, k = q.view(-1, 4, 8).transpose(0, 1), k.view(-1, 4, 8).transpose(0, 1)  # (H, T, 8)
    s = cap.stages("decoder.layers.0.self_attn")
    assert torch.allclose(s["scores"], q @ k.transpose(-1, -2), atol=1e-5)
    concat = s["output"].transpose(0, 1).reshape(len(TEXT), 32)  # (T, H * d_head)
    assert torch.allclose(attn.out(concat), seen["out"], atol=1e-6)


def test_capture_leaves_the_model_on_its_fast_path():
    model, tok = decoder()
    ids = torch.tensor([tok.encode(TEXT, add_special_tokens=False)])
    before = model(ids)
    cap = capture(model, tok, TEXT)
    assert torch.allclose(cap.logits, before[0], atol=1e-5)
    for m in model.modules():
        assert getattr(m, "recorded", None) is None and getattr(m, "recorded_inputs", None) is None
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert torch.equal(model(ids), before)


def test_residual_stream_lens_norms_and_ffn():
    model, tok = decoder(activation="relu")
    cap = capture(model, tok, TEXT)
    assert list(cap.residual) == ["decoder.embed", "decoder.0", "decoder.1"]
    last = model.logits(model.decoder.norm(cap.residual["decoder.1"]))
    assert torch.allclose(last, cap.logits, atol=1e-5)
    assert torch.equal(cap.lens("decoder.1"), last.float())
    assert cap.lens("decoder.embed").shape == cap.logits.shape
    embed = cap.token_embedding["decoder"] + cap.position["decoder"]
    assert torch.allclose(cap.residual["decoder.embed"], embed, atol=1e-6)
    stats = cap.norms["decoder.layers.0.self_attn_norm"]  # (T, 2): its input is the embedding
    assert torch.allclose(stats[:, 0], embed.mean(-1), atol=1e-6)
    assert torch.allclose(stats[:, 1], embed.std(-1, correction=0), atol=1e-6)
    ffn = cap.ffn["decoder.0"]
    assert ffn.shape == (len(TEXT), model.config.d_ff) and (ffn >= 0).all() and (ffn == 0).any()


def test_rope_positions_are_angles():
    model, tok = decoder(position="rope")
    cap = capture(model, tok, TEXT)
    angles = cap.position["decoder"]  # (T, d_head)
    assert angles.shape == (len(TEXT), 8) and torch.equal(angles[0], torch.zeros(8))
    assert cap.position_kind == "rope"


def test_text_longer_than_the_context_is_one_clear_error():
    model, tok = decoder(max_seq_len=8)
    with pytest.raises(qkv.InputError, match="context is 8"):
        capture(model, tok, "a much longer text")
    with pytest.raises(qkv.InputError, match="head 9"):
        capture(model, tok, "abc").stages("decoder.layers.0.self_attn", 9)


# ---------------------------------------------------------------------- the output layer

@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                     dict(temperature=1.3, top_p=0.6),
                                     dict(temperature=0.9, top_k=10, top_p=0.9)])
def test_probs_are_what_generate_draws_from(options):
    model, tok = decoder()
    cap = capture(model, tok, TEXT)
    p = cap.probs(**options)
    assert p.shape == (model.config.vocab_size,)
    assert abs(float(p.sum()) - 1) < 1e-5
    if "top_k" in options:
        assert int((p > 0).sum()) <= options["top_k"]
    # the same distribution the sampler uses: draws with the same generator agree
    logits = cap.logits[-1:]
    for seed in range(5):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        drawn = sample_next(logits, generator=g1, **options)
        assert int(torch.multinomial(p[None], 1, generator=g2)[0, 0]) == int(drawn[0])


@pytest.mark.parametrize("options", [dict(temperature=0.8), dict(temperature=1.0, top_k=3),
                                     dict(temperature=0), dict(temperature=1.2, top_p=0.5)])
def test_drawn_token_equals_generate_with_the_same_seed(options):
    model, tok = decoder()
    ids = tok.encode(TEXT, add_special_tokens=False)
    for seed in (0, 1, 7):
        token = draw_next(model, ids, seed=seed, **options)
        text = qkv.generate(model, tok, TEXT, max_new_tokens=1, seed=seed, **options)
        assert tok.decode([token]) == text


def test_step_by_step_generation_grows_the_cache():
    model, tok = decoder()
    ids = tok.encode(TEXT, add_special_tokens=False)
    steps = replay_steps(model, ids, 5, temperature=0.9, seed=3)
    g = torch.Generator().manual_seed(3)
    expected = [int(t[0]) for t in decode_tokens(model, [ids], 5, 0.9, generator=g)]
    assert [s["id"] for s in steps] == expected
    assert [s["cache"] for s in steps] == [len(ids) + i for i in range(5)]
    for i, s in enumerate(steps):
        row = s["attention"]["decoder.layers.1.self_attn"]  # (H, cache)
        assert row.shape == (4, len(ids) + i)
        assert torch.allclose(row.sum(-1), torch.ones(4), atol=1e-6)


# ---------------------------------------------------------------------- encoders, seq2seq

def test_encoder_sees_both_ways_fills_masks_and_classifies():
    model, tok = encoder()
    cap = capture(model, tok, "the cat [MASK] on the mat")
    assert cap.tokens[0] == "[CLS]" and cap.tokens[-1] == "[SEP]"
    for name in cap.layers():
        assert torch.isfinite(cap.stages(name)["masked"]).all()  # nothing hidden
    ids = torch.tensor([cap.ids])
    assert torch.allclose(cap.logits, model(ids)[0], atol=1e-5)
    probs = model.classify(ids).softmax(-1)[0]
    labels = ["negative", "positive"]
    assert cap.classes == pytest.approx(dict(zip(labels, probs.tolist(), strict=True)))


def test_encoder_decoder_cross_attention_is_the_alignment():
    model, tok = seq2seq()
    cap = capture(model, tok, "hello world")
    src = torch.tensor([cap.ids])
    assert cap.target_ids == [tok.bos_id] + generate_seq2seq(model, src, max_new_tokens=48)[0]
    cross = cap.attention["decoder.layers.0.cross_attn"]
    assert cross.shape == (4, len(cap.target_ids), len(cap.ids))
    assert torch.allclose(cross.sum(-1), torch.ones(4, len(cap.target_ids)), atol=1e-6)
    given = capture(model, tok, "hello", target="salut")
    assert given.target_tokens == [tok.id_to_token(tok.bos_id)] + list("salut")
    assert plots.axes_tokens(given, "decoder.layers.1.cross_attn") == (given.target_tokens,
                                                                       given.tokens)


def test_rnn_bahdanau_alignment_is_the_recorded_attention():
    model, tok = rnn()
    cap = capture(model, tok, "hello world")
    assert cap.family == "rnn" and cap.layers() == ["attention"]
    assert cap.ids == tok.encode("hello world", add_special_tokens=False) + [tok.eos_id]
    src = torch.tensor([cap.ids])
    assert cap.target_ids == [tok.bos_id] + generate_seq2seq(model, src, max_new_tokens=48)[0]
    w = cap.attention["attention"]  # (1, T, S)
    assert w.shape == (1, len(cap.target_ids), len(cap.ids))
    assert torch.allclose(w.sum(-1), torch.ones(1, len(cap.target_ids)), atol=1e-6)
    assert cap.logits is not None and cap.logits.shape == (len(cap.target_ids), tok.vocab_size)
    # the same weights as record_attention gives, here in a padded batch with a longer source:
    # real source positions equal, padding exactly 0
    given = capture(model, tok, "hi", target="salut")
    assert given.target_tokens == [tok.id_to_token(tok.bos_id)] + list("salut")
    longer = tok.encode("a much longer sentence", add_special_tokens=False) + [tok.eos_id]
    S = len(longer)
    src = torch.tensor([given.ids + [tok.pad_id] * (S - len(given.ids)), longer])  # (2, S)
    mask = (torch.arange(S)[None] < torch.tensor([[len(given.ids)], [S]])).long()  # (2, S)
    tgt = torch.tensor([given.target_ids] * 2)
    with qkv.record_attention(model) as maps:
        model(src, tgt, src_mask=mask)
    batch = torch.cat(maps["attention"], dim=2)  # (2, 1, T, S)
    n = len(given.ids)
    assert torch.allclose(batch[0, :, :, :n], given.attention["attention"], atol=1e-6)
    assert torch.all(batch[0, :, :, n:] == 0)
    assert torch.equal(given.stages("attention", 0)["weights"], given.attention["attention"][0])
    assert plots.axes_tokens(given, "attention") == (given.target_tokens, given.tokens)
    model.config.attention = False  # a model without attention has nothing to align
    try:
        with pytest.raises(qkv.InputError, match="no attention"):
            capture(model, tok, "hi")
    finally:
        model.config.attention = True


def test_rnn_directory_through_the_commands(tmp_path, capsys):
    model, tok = rnn()
    save_rnn(model, tok, tmp_path / "rnn")
    loaded, _ = qkv.explain.load_model(tmp_path / "rnn")
    assert torch.equal(capture(loaded, tok, "hi").attention["attention"],
                       capture(model, tok, "hi").attention["attention"])
    out = tmp_path / "align.png"
    assert main(["attention", str(tmp_path / "rnn"), "hello", "--out", str(out), "--list",
                 "--target", "salut"]) == 0
    printed = capsys.readouterr().out
    assert "attention  (1, 6, 6)" in printed and out.read_bytes()[:4] == b"\x89PNG"
    assert main(["attention", str(tmp_path / "rnn"), "hello", "--out", str(tmp_path / "h.svg"),
                 "--layer", "attention", "--head", "0"]) == 0
    client = TestClient(create_app((loaded, tok)))
    info = client.get("/explain/api/model").json()
    assert info["family"] == "rnn" and info["cell"] == "gru" and info["attention"] is True
    cap = client.post("/explain/api/capture", json={"text": "hello", "target": "salut"}).json()
    assert cap["family"] == "rnn" and cap["layers"][0]["cross"] is True
    w = _floats(client.get(f"/explain/api/{cap['id']}/attention",
                           params={"layer": "attention", "head": "0"}))
    assert w.shape == (6, 6) and np.allclose(w.sum(-1), 1, atol=1e-6)
    assert client.get(f"/explain/api/{cap['id']}/export.html").status_code == 200
    plain = RNNTranslator(dataclasses.replace(model.config, attention=False))
    save_rnn(plain, tok, tmp_path / "plain")  # without attention: one line, exit status 2
    capsys.readouterr()
    assert main(["explain", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.strip()
    assert "without attention" in err and len(err.splitlines()) == 1


def test_alignment_of_any_model(tmp_path):
    m = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]])
    cap = alignment(m, ["a", "b", "c"], ["x", "y"], name="bahdanau")
    assert cap.layers() == ["bahdanau"]
    assert torch.equal(cap.stages("bahdanau", 0)["weights"], m)
    assert plots.head(cap, tmp_path / "a.png", "bahdanau", 0).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(qkv.InputError, match="shape"):
        alignment(m, ["a", "b"], ["x", "y"])


# ---------------------------------------------------------------------- maps, npz, CLI

def test_maps_and_npz(tmp_path):
    model, tok = decoder()
    cap = capture(model, tok, TEXT)
    assert plots.grid(cap, tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in plots.head(cap, tmp_path / "h.svg", 1, 2).read_bytes()[:400]
    with pytest.raises(qkv.InputError, match="PNG or SVG"):
        plots.grid(cap, tmp_path / "g.jpg")
    with pytest.raises(qkv.InputError, match="layer 5"):
        plots.grid(cap, tmp_path / "g.png", layer=5)
    data = np.load(cap.save_npz(tmp_path / "c.npz"))
    for stage in ("scores", "scaled", "masked", "weights", "output"):
        key = f"attention/decoder.layers.1.self_attn/{stage}"
        assert np.array_equal(data[key], cap.stages("decoder.layers.1.self_attn")[stage].numpy())
    assert list(data["tokens"]) == cap.tokens and np.array_equal(data["logits"], cap.logits)
    assert "residual/decoder.1" in data and "ffn/decoder.0" in data


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, (model, tok) in {"gpt": decoder(), "s2s": seq2seq()}.items():
        qkv.save(model, tok, root / name)
    return root


def test_cli_writes_maps(saved_models, tmp_path, capsys):
    out = tmp_path / "maps.png"
    assert main(["attention", str(saved_models / "gpt"), TEXT, "--out", str(out),
                 "--npz", str(tmp_path / "m.npz")]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "m.npz").is_file()
    assert main(["attention", str(saved_models / "s2s"), "hi there", "--out",
                 str(tmp_path / "x.svg"), "--layer", "decoder.layers.0.cross_attn",
                 "--head", "1"]) == 0
    assert (tmp_path / "x.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("args, message", [
    (["--out", "m.png", "--head", "1"], "--head needs --layer"),
    (["--out", "m.gif"], "PNG or SVG"),
    (["--out", "m.png", "--layer", "7"], "layer 7 is outside"),
    (["--out", "m.png", "--layer", "1", "--head", "4"], "head 4 is outside"),
])
def test_cli_mistakes_are_one_line(saved_models, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["attention", str(saved_models / "gpt"), TEXT, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------- the explainer's API

@pytest.fixture(scope="module")
def api():
    app = FastAPI()
    model, tok = decoder()
    app.include_router(explain_router((model, tok)))  # the one line that adds it to an app
    app.include_router(explain_router(seq2seq(), prefix="/s2s"))
    return TestClient(app), model, tok


def _floats(response) -> np.ndarray:
    shape = tuple(int(s) for s in response.headers["X-Shape"].split(","))
    return np.frombuffer(response.content, dtype="<f4").reshape(shape)


def test_api_serves_the_models_own_tensors(api):
    client, model, tok = api
    page = client.get("/explain")
    assert page.status_code == 200 and "/explain/static/explain.js" in page.text
    assert "http" not in page.text.split("<body")[1]  # nothing fetched from elsewhere
    assert client.get("/explain/static/explain.js").status_code == 200
    cap = client.post("/explain/api/capture", json={"text": TEXT}).json()
    assert cap["ids"] == tok.encode(TEXT, add_special_tokens=False)
    ref = capture(model, tok, TEXT)
    r = client.get(f"/explain/api/{cap['id']}/attention",
                   params={"layer": "decoder.layers.1.self_attn", "stage": "scores", "head": 2})
    assert np.array_equal(_floats(r), ref.stages("decoder.layers.1.self_attn", 2)["scores"])
    r = client.get(f"/explain/api/{cap['id']}/probs", params={"temperature": 0.7, "top_k": 4})
    assert np.allclose(_floats(r), ref.probs(temperature=0.7, top_k=4), atol=1e-7)
    thumbs = _floats(client.get(f"/explain/api/{cap['id']}/thumbs"))
    assert thumbs.shape == (2, 4, len(TEXT), len(TEXT))  # no pooling below 64 tokens
    assert np.allclose(thumbs[1], ref.attention["decoder.layers.1.self_attn"], atol=1e-7)
    drawn = client.post("/explain/api/sample", json={"id": cap["id"], "seed": 4,
                                                     "temperature": 0.9}).json()
    assert tok.decode([drawn["id"]]) == qkv.generate(model, tok, TEXT, 1, 0.9, seed=4)
    lens = client.get(f"/explain/api/{cap['id']}/lens").json()
    assert [row["layer"] for row in lens] == ["decoder.embed", "decoder.0", "decoder.1"]


def test_api_mistakes(api):
    client = api[0]
    cid = client.post("/explain/api/capture", json={"text": "ab"}).json()["id"]
    assert client.get("/explain/api/nope/thumbs").status_code == 404
    bad = client.get(f"/explain/api/{cid}/attention",
                     params={"layer": "decoder.layers.0.self_attn", "head": "x"})
    assert bad.status_code == 400 and "head" in bad.json()["detail"]
    long = client.post("/explain/api/capture", json={"text": "a" * 500})
    assert long.status_code == 400 and "context" in long.json()["detail"]
    assert client.get("/explain/static/../app.py").status_code == 404
    seq = client.post("/s2s/api/capture", json={"text": "hi"}).json()["id"]
    assert client.post("/s2s/api/sample", json={"id": seq}).status_code == 400


def test_export_is_one_self_contained_file(api):
    client = api[0]
    cid = client.post("/explain/api/capture", json={"text": TEXT}).json()["id"]
    html = client.get(f"/explain/api/{cid}/export.html").text
    assert "window.QKV_INLINE" in html and "<style>" in html
    assert 'src="' not in html and 'href="/' not in html


def test_the_real_all_minilm_l6_v2():
    """A real model, loaded from Hugging Face files: its capture agrees with its ordinary
    forward pass, and its heads are the 6 x 12 of the checkpoint."""
    from qkv.hub import packaged_minilm_path

    model, tok = qkv.load(packaged_minilm_path())
    cap = capture(model, tok, "The animal didn't cross the street because it was too tired")
    assert len(cap.layers()) == 6 and cap.attention[cap.layers()[0]].shape[0] == 12
    ids = torch.tensor([cap.ids])
    final = cap.residual["encoder.5"]  # the last block's output: what encode() returns
    assert torch.allclose(final, model.encode(ids)[0], atol=1e-4)
    weights = cap.stages(cap.layers()[3])["weights"]
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:2]), atol=1e-5)


def test_lens_at_one_position():
    model, tok = decoder()
    cap = capture(model, tok, TEXT)
    assert torch.allclose(cap.lens("decoder.0", -1), cap.lens("decoder.0")[-1], atol=1e-6)
    with pytest.raises(qkv.InputError, match="position 99"):
        cap.lens("decoder.0", 99)


@pytest.mark.slow
def test_qkv_explain_serves_the_page_on_loopback(saved_models):
    """`qkv explain DIR` as a user starts it: the page and its API answer on 127.0.0.1."""
    import subprocess
    import sys
    import time
    import urllib.request

    from explain_util import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qkv.cli", "explain",
                             str(saved_models / "gpt"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/explain", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.1)
        assert "explain.js" in page.read().decode()
        info = urllib.request.urlopen(f"http://127.0.0.1:{port}/explain/api/model", timeout=5)
        assert b'"family":"decoder"' in info.read()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_qkv_explain_mistakes_are_one_line(saved_models, tmp_path, capsys):
    assert main(["explain", str(saved_models / "gpt"), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    model, _ = decoder()
    qkv.save(model, None, tmp_path / "bare")
    assert main(["explain", str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no tokenizer.json" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------- Hugging Face directories

def _hf_model(kind: str, vocab: int, tok):
    """A tiny random transformers model of `kind`, eager attention so it can return its maps;
    a large init spread so that the maps are far from uniform."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    common = dict(vocab_size=vocab, attn_implementation="eager")
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64,
                                      initializer_range=0.4, bos_token_id=tok.bos_id,
                                      eos_token_id=tok.eos_id, **common)
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48,
                                       max_position_embeddings=64, initializer_range=0.4,
                                       bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                       **common)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "bert":
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64,
                                      initializer_range=0.4, **common)
        return transformers.BertForMaskedLM(cfg)
    cfg = transformers.MarianConfig(d_model=32, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4,
                                    encoder_ffn_dim=48, decoder_ffn_dim=48,
                                    max_position_embeddings=64, init_std=0.4,
                                    pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
                                    decoder_start_token_id=tok.pad_id, forced_eos_token_id=None,
                                    **common)
    hf = transformers.MarianMTModel(cfg)
    with torch.no_grad():  # one table for both stacks, as qkv (and a saved Marian) has
        hf.model.decoder.embed_tokens.weight.copy_(hf.model.encoder.embed_tokens.weight)
    return hf


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "marian"])
def test_hugging_face_directories(kind, tmp_path):
    """A random GPT-2, Llama, BERT and Marian saved by transformers (safetensors) with a
    tokenizer.json: qkv.load reads the directory and every captured map is transformers' own
    (output_attentions), each row summing to 1."""
    from explain_util import char_tokenizer

    tok = char_tokenizer()
    hf = _hf_model(kind, tok.vocab_size, tok).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tok.save(tmp_path / "tokenizer.json")
    model, loaded_tok = qkv.load(tmp_path)
    assert loaded_tok is not None
    cap = capture(model, loaded_tok, "the cat sat", target="le chat" if kind == "marian" else None)
    ids = torch.tensor([cap.ids])
    with torch.no_grad():
        if kind == "marian":  # in the order the model runs them: encoder, then self, cross
            out = hf(input_ids=ids, decoder_input_ids=torch.tensor([cap.target_ids]),
                     output_attentions=True)
            want = [*out.encoder_attentions,
                    *(m for pair in zip(out.decoder_attentions, out.cross_attentions,
                                        strict=True) for m in pair)]
        else:
            want = list(hf(input_ids=ids, output_attentions=True).attentions)
    assert len(cap.layers()) == len(want) == (6 if kind == "marian" else 2)
    for (name, w), hf_w in zip(cap.attention.items(), want, strict=True):
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[:2]), atol=1e-5), name
        assert torch.allclose(w, hf_w[0].float(), atol=1e-5), name
        assert w.std() > 0.01  # the spread-out init: maps far from uniform
