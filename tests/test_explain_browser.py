"""The explainer page in a real browser: headless Chromium driven by Playwright.

Chromium comes from Debian (`apt-get install chromium`, see .ci/run); Playwright is pinned to
the release made for that Chromium's major version. One browser serves the whole module; every
test opens its own page, on which every request to a host other than 127.0.0.1 is aborted and
every console error fails the test. The numbers the page prints are compared with the PyTorch
tensors. Each view leaves a screenshot in $QKV_SCREENSHOTS (default: a temporary folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from fastapi import FastAPI

import qkv
from explain_util import decoder, encoder, live, rnn, seq2seq
from qkv.explain import alignment, capture
from qkv.explain.app import Explainer, explain_router
from qkv.generate import decode_tokens

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the dev extra (playwright)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TEXT = "the cat sat on it"


def hf_llama(folder: Path):
    """A random Llama saved by transformers (safetensors) with a tokenizer.json, loaded by qkv;
    and the transformers model, to compare its output_attentions with."""
    transformers = pytest.importorskip("transformers")
    from explain_util import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, num_hidden_layers=2, hidden_size=32,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, max_position_embeddings=64,
                                   initializer_range=0.4, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(folder, safe_serialization=True)
    tok.save(folder / "tokenizer.json")
    return qkv.load(folder), hf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from qkv.hub import packaged_minilm_path

    (llama, llama_tok), hf = hf_llama(tmp_path_factory.mktemp("hf-llama"))
    return {"/explain": decoder(), "/enc": encoder(), "/s2s": seq2seq(), "/rnn": rnn(),
            "/minilm": qkv.load(packaged_minilm_path()), "/llama": (llama, llama_tok),
            "hf-llama": hf}


SOURCE, TARGET = ["the", "cat", "sat", "</s>"], ["le", "chat", "assis", "</s>"]
ALIGNMENT = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.1, 0.8, 0.05, 0.05],
                          [0.05, 0.1, 0.8, 0.05], [0.0, 0.0, 0.1, 0.9]])


@pytest.fixture(scope="module")
def server(models):
    app = FastAPI()
    for prefix, pair in models.items():
        if not prefix.startswith("/"):
            continue  # a reference model, not served
        app.include_router(explain_router(pair, prefix=prefix))
    aligned = Explainer(None, prefix="/align")  # no model: ready-made captures only
    assert aligned.add(alignment(ALIGNMENT, SOURCE, TARGET, name="bahdanau")) == "c1"
    app.include_router(aligned.router())
    with live(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("QKV_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser):
    """A page that may only talk to 127.0.0.1 (file:// has no host) and logs no errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors, blocked = [], []

    def route(r):
        host = urlparse(r.request.url).hostname
        if host in (None, "", "127.0.0.1"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    pg.route("**/*", route)
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert errors == [], errors
    assert blocked == [], blocked


def open_page(page, server, prefix="/explain"):
    page.goto(server + prefix)
    page.wait_for_selector("body[data-ready]")  # the default text has been run
    return page


def rerun(page, text, target=None):
    old = page.get_attribute("body", "data-ready")
    page.fill("#text", text)
    if target is not None:
        page.fill("#target", target)
    page.click("#run")
    page.wait_for_function(f"document.body.dataset.ready && document.body.dataset.ready !== "
                           f"'{old}'")


def shoot(page, shots: Path, view: str, name: str | None = None) -> None:
    page.locator(f"#{view}").screenshot(path=str(shots / f"{name or view}.png"))


def row_values(page) -> list[float]:
    return [float(v) for v in page.eval_on_selector_all(
        "#pinned-row td", "cells => cells.map(c => c.dataset.value)")]


# ---------------------------------------------------------------------- decoder views

def test_tokens_embeddings_and_overview(page, server, models, shots):
    model, tok = models["/explain"]
    rerun(open_page(page, server), TEXT)
    chips = page.locator("#tokens .tok")
    assert chips.count() == len(TEXT)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert [int(x) for x in page.eval_on_selector_all(
        "#tokens .tok sub", "s => s.map(e => e.textContent)")] == ids
    assert page.get_attribute("#overview", "data-drawn") == "8"  # 2 layers x 4 heads
    assert page.eval_on_selector("#embed-canvas", "c => c.width") > 10
    # hovering a map names it and reads the cell under the pointer (17 tokens: not pooled)
    box = page.locator("#overview").bounding_box()
    assert box is not None
    scale = box["width"] / page.eval_on_selector("#overview", "c => c.width")
    x, y = (2 * 76 + 30) * scale, (1 * 76 + 50) * scale  # layer 1, head 2: tile pixel (30, 50)
    page.locator("#overview").hover(position={"x": x, "y": y})
    ro = page.locator("#overview-readout")
    assert ro.get_attribute("data-layer") == "decoder.layers.1.self_attn"
    assert ro.get_attribute("data-head") == "2" and ro.get_attribute("data-pooled") == "false"
    i, j = int(ro.get_attribute("data-i") or -1), int(ro.get_attribute("data-j") or -1)
    assert (i, j) == (50 * len(TEXT) // 72, 30 * len(TEXT) // 72)
    want = capture(model, tok, TEXT).attention["decoder.layers.1.self_attn"][2, i, j].item()
    assert abs(float(ro.get_attribute("data-value") or "nan") - want) <= 1e-6
    shoot(page, shots, "view-overview")
    page.locator("#overview").click(position={"x": x, "y": y})
    page.wait_for_function("document.getElementById('head-canvas').dataset.head === '2' && "
                           "document.getElementById('head-canvas').dataset.layer === "
                           "'decoder.layers.1.self_attn'")
    page.mouse.move(0, 0)
    assert ro.text_content() == "hover a map"
    shoot(page, shots, "view-tokens")
    shoot(page, shots, "view-embeddings")


def pick(page, layer: int, head: str, stage: str) -> None:
    page.select_option("#layer", str(layer))
    page.select_option("#head", head)
    page.select_option("#stage", stage)
    page.wait_for_function(
        "([stage, head]) => { const c = document.getElementById('head-canvas');"
        " return c.dataset.stage === stage && c.dataset.head === head &&"
        " c.dataset.layer === document.getElementById('layer').selectedOptions[0].text; }",
        arg=[stage, head])


def test_every_stage_of_a_head_equals_pytorch(page, server, models, shots):
    model, tok = models["/explain"]
    rerun(open_page(page, server), TEXT)
    ref = capture(model, tok, TEXT)
    name = "decoder.layers.1.self_attn"
    page.click("#tokens .tok[data-index='5']")  # pin query 5
    for stage in ("scores", "scaled", "masked", "weights", "output"):
        pick(page, 1, "2", stage)
        shown = torch.tensor(row_values(page))
        expected = ref.stages(name, 2)[stage][5]
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(shown), finite)
        assert torch.allclose(shown[finite], expected[finite], atol=1e-6, rtol=0)
        if stage == "weights":
            assert abs(float(shown.sum()) - 1) < 1e-6
            assert (shown[6:] == 0).all()  # later tokens: exactly 0
        if stage == "masked":
            assert torch.isinf(shown[6:]).all()
    pick(page, 0, "mean", "weights")
    expected = ref.stages("decoder.layers.0.self_attn")["weights"].mean(0)[5]
    assert torch.allclose(torch.tensor(row_values(page)), expected, atol=1e-6, rtol=0)
    # hover prints the exact value of the cell under the pointer
    pick(page, 1, "3", "weights")
    page.locator("#head-canvas").scroll_into_view_if_needed()
    box = page.locator("#head-canvas").bounding_box()
    T = len(TEXT)
    page.mouse.move(box["x"] + box["width"] * 2.5 / T, box["y"] + box["height"] * 7.5 / T)
    assert page.get_attribute("#readout", "data-i") == "7"
    assert page.get_attribute("#readout", "data-j") == "2"
    value = float(page.get_attribute("#readout", "data-value"))
    assert abs(value - float(ref.stages(name, 3)["weights"][7, 2])) <= 1e-6
    shoot(page, shots, "view-head")


def test_pin_and_hide_special_sinks(page, server, models):
    model, tok = models["/enc"]
    open_page(page, server, "/enc")
    rerun(page, "the cat sat")  # [CLS] the cat sat [SEP]: two special tokens
    page.click("#tokens .tok[data-index='1']")
    assert page.locator("#tokens .tok.pinned").count() == 1
    pick(page, 0, "1", "weights")
    assert page.get_attribute("#pinned-row", "data-row") == "1"
    ids = page.eval_on_selector_all("#tokens .tok sub", "s => s.map(e => +e.textContent)")
    specials = [j for j, i in enumerate(ids) if i in (tok.cls_id, tok.sep_id)]
    assert specials == [0, len(ids) - 1]
    page.check("#hide-special")
    hidden = page.eval_on_selector_all("#pinned-row td.hidden", "c => c.map(e => +e.dataset.j)")
    assert hidden == specials
    assert "2 special column(s) hidden" in page.text_content("#head-note")
    page.click("#tokens .tok[data-index='1']")  # click again: unpinned
    assert page.locator("#tokens .tok.pinned").count() == 0
    assert page.locator("#pinned-row").count() == 0


def test_full_vocabulary_softmax_and_seeded_draw(page, server, models, shots):
    model, tok = models["/explain"]
    rerun(open_page(page, server), TEXT)
    ref = capture(model, tok, TEXT)
    V = model.config.vocab_size
    for options in (dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                    dict(temperature=1.4, top_p=0.5)):
        page.fill("#temperature", str(options["temperature"]))
        page.fill("#top-k", str(options.get("top_k", "")))
        page.fill("#top-p", str(options.get("top_p", "")))
        page.dispatch_event("#top-p", "change")
        page.dispatch_event("#top-k", "change")
        page.dispatch_event("#temperature", "change")
        expected = ref.probs(**options)
        nonzero = int((expected > 0).sum())
        page.wait_for_function(f"document.getElementById('nonzero').dataset.value === "
                               f"'{nonzero}'")
        assert page.text_content("#nonzero").endswith(f"of {V} tokens can be drawn")
        assert abs(float(page.get_attribute("#prob-sum", "data-value")) - 1) < 1e-6
        shown = page.eval_on_selector_all(".prob", "p => p.map(e => [+e.dataset.id, "
                                          "+e.dataset.value])")
        assert len(shown) == min(20, V)
        for token_id, prob in shown:
            assert abs(prob - float(expected[token_id])) <= 1e-6
        for seed in (0, 5):
            page.fill("#seed", str(seed))
            page.click("#draw")
            page.wait_for_function("document.getElementById('drawn').dataset.id !== undefined")
            drawn = int(page.get_attribute("#drawn", "data-id"))
            page.evaluate("delete document.getElementById('drawn').dataset.id")
            text = qkv.generate(model, tok, TEXT, max_new_tokens=1, seed=seed, **options)
            assert tok.decode([drawn]) == text
            g = torch.Generator().manual_seed(seed)
            assert drawn == int(next(iter(decode_tokens(model, [ref.ids], 1, generator=g,
                                                        **options)))[0])
    shoot(page, shots, "view-output")


def test_ffn_residual_lens_and_steps(page, server, models, shots):
    model, tok = models["/explain"]
    rerun(open_page(page, server), TEXT)
    ref = capture(model, tok, TEXT)
    page.wait_for_function("document.getElementById('ffn-canvas').dataset.name")
    assert page.eval_on_selector("#ffn-canvas", "c => c.width") >= model.config.d_ff
    norms = page.eval_on_selector_all("#residual tr", "r => r.slice(1).map(x => "
                                      "[...x.cells].slice(1).map(c => +c.textContent))")
    for row, key in zip(norms, ["decoder.embed", "decoder.0", "decoder.1"], strict=True):
        assert torch.allclose(torch.tensor(row), ref.residual[key].norm(dim=-1), atol=1e-4)
    page.wait_for_selector("#lens table")
    top = page.eval_on_selector_all("#lens tr", "r => r.slice(1).map(x => x.cells[1]"
                                    ".textContent)")
    best = ref.lens("decoder.1")[-1].argmax()
    assert top[-1].startswith(tok.id_to_token(int(best)))
    shoot(page, shots, "view-ffn")
    shoot(page, shots, "view-residual")
    shoot(page, shots, "view-lens")
    page.fill("#n-steps", "5")
    page.fill("#seed", "2")
    page.fill("#temperature", "0.8")
    page.click("#run-steps")
    page.wait_for_selector("#steps table")
    caches = page.eval_on_selector_all(".cache", "c => c.map(e => +e.dataset.value)")
    assert caches == [len(TEXT) + i for i in range(5)]
    ids = page.eval_on_selector_all("#steps tr", "r => r.slice(1).map(x => +x.cells[2]"
                                    ".textContent)")
    g = torch.Generator().manual_seed(2)
    assert ids == [int(t[0]) for t in decode_tokens(model, [ref.ids], 5, 0.8, generator=g)]
    shoot(page, shots, "view-steps")


# ---------------------------------------------------------------------- encoders, seq2seq

def test_encoder_fill_mask_and_classes(page, server, models, shots):
    model, tok = models["/enc"]
    open_page(page, server, "/enc")
    text = "the cat [MASK] on the mat"
    rerun(page, text)
    ref = capture(model, tok, text)
    pos = ref.ids.index(tok.mask_id)
    expected = ref.logits[pos].softmax(-1).topk(5)
    shown = page.eval_on_selector_all("#fill-mask tr", "r => r.slice(1).map(x => "
                                      "[+x.cells[1].textContent, +x.cells[2].textContent])")
    assert [i for i, _ in shown] == expected.indices.tolist()
    assert torch.allclose(torch.tensor([p for _, p in shown]), expected.values, atol=1e-6)
    classes = page.eval_on_selector_all(".class-prob", "c => c.map(e => [e.dataset.label, "
                                        "+e.dataset.value])")
    assert dict(classes) == pytest.approx(ref.classes, abs=1e-6)
    pick(page, 1, "0", "masked")
    page.click(f"#tokens .tok[data-index='{pos}']")
    assert all(v != float("-inf") for v in row_values(page))  # an encoder hides nothing
    shoot(page, shots, "view-encoder")


def test_encoder_decoder_cross_attention(page, server, models, shots):
    model, tok = models["/s2s"]
    open_page(page, server, "/s2s")
    rerun(page, "hello", target="salut")
    ref = capture(model, tok, "hello", target="salut")
    names = page.eval_on_selector_all("#layer option", "o => o.map(e => e.textContent)")
    assert names == ref.layers()
    cross = names.index("decoder.layers.1.cross_attn")
    assert page.locator("#target-tokens .tok").count() == len(ref.target_tokens)
    page.click("#target-tokens .tok[data-index='3']")
    pick(page, cross, "1", "weights")
    shown = torch.tensor(row_values(page))
    expected = ref.stages("decoder.layers.1.cross_attn", 1)["weights"][3]
    assert shown.shape == (len(ref.tokens),)
    assert torch.allclose(shown, expected, atol=1e-6, rtol=0)
    shoot(page, shots, "view-head", "view-head-cross")


def test_recurrent_translator_bahdanau_alignment(page, server, models, shots):
    """An LSTM/GRU translator's page: run a source and a target, and its additive attention is
    the cross-attention view; the pinned target token's row is the recorded weights."""
    model, tok = models["/rnn"]
    open_page(page, server, "/rnn")
    assert page.locator("#model-info").text_content().startswith("rnn · GRU")
    rerun(page, "hello", target="salut")
    ref = capture(model, tok, "hello", target="salut")
    assert page.eval_on_selector_all("#layer option", "o => o.map(e => e.textContent)") == [
        "attention"]
    assert page.locator("#tokens .tok").count() == len(ref.tokens)
    page.click("#target-tokens .tok[data-index='2']")
    pick(page, 0, "0", "weights")
    shown = torch.tensor(row_values(page))
    assert torch.allclose(shown, ref.attention["attention"][0, 2], atol=1e-6, rtol=0)
    assert page.locator("#view-embeddings").is_hidden() and page.locator("#run-form").is_visible()
    shoot(page, shots, "view-head", "view-head-rnn")


def test_hugging_face_llama_directory(page, server, models):
    """A Llama directory written by transformers: the page's numbers are transformers' own."""
    hf = models["hf-llama"]
    open_page(page, server, "/llama")
    rerun(page, "the cat")
    ids = models["/llama"][1].encode("the cat", add_special_tokens=False)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids]), output_attentions=True).attentions[1][0, 3]
    page.click("#tokens .tok[data-index='5']")
    pick(page, 1, "3", "weights")
    shown = torch.tensor(row_values(page))
    assert torch.allclose(shown, want[5], atol=1e-5, rtol=0)
    assert abs(float(shown.sum()) - 1) < 1e-5


# ---------------------------------------------------------------------- exports

def test_png_and_self_contained_html_exports(page, server, models, browser, tmp_path):
    model, tok = models["/explain"]
    rerun(open_page(page, server), TEXT)
    with page.expect_download() as download:
        page.click("#view-head button.png")
    png = tmp_path / "head.png"
    download.value.save_as(png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    href = page.get_attribute("#export-html", "href")
    html = page.evaluate("url => fetch(url).then(r => r.text())", href)
    exported = tmp_path / "capture.html"
    exported.write_text(html, encoding="utf-8")
    ref = capture(model, tok, TEXT)
    offline = browser.new_context()
    pg = offline.new_page()
    errors, requests = [], []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(exported.as_uri())
    pg.wait_for_selector("body[data-ready]")
    pg.click("#tokens .tok[data-index='4']")
    pick(pg, 1, "0", "weights")
    shown = torch.tensor(row_values(pg))
    assert torch.allclose(shown, ref.stages("decoder.layers.1.self_attn", 0)["weights"][4],
                          atol=1e-6, rtol=0)
    offline.close()
    assert errors == [] and [u for u in requests if not u.startswith(("file:", "data:"))] == []


def test_the_real_all_minilm_l6_v2(page, server, models, shots):
    """The packaged all-MiniLM-L6-v2 (Hugging Face weights): 6 layers x 12 heads on the page,
    and the weights it prints are the model's."""
    model, tok = models["/minilm"]
    text = "The animal didn't cross the street because it was too tired"
    open_page(page, server, "/minilm")
    rerun(page, text)
    ref = capture(model, tok, text)
    assert page.get_attribute("#overview", "data-drawn") == "72"
    it = ref.tokens.index("it")
    page.click(f"#tokens .tok[data-index='{it}']")
    pick(page, 4, "11", "weights")
    shown = torch.tensor(row_values(page))
    expected = ref.stages("encoder.layers.4.attn", 11)["weights"][it]
    assert torch.allclose(shown, expected, atol=1e-6, rtol=0)
    shoot(page, shots, "view-overview", "minilm-overview")
    shoot(page, shots, "view-head", "minilm-head")
    page.check("#hide-special")  # [CLS] and [SEP] soak up attention: leave them out
    hidden = page.eval_on_selector_all("#pinned-row td.hidden", "c => c.map(e => +e.dataset.j)")
    assert hidden == [0, len(ref.ids) - 1]
    shoot(page, shots, "view-head", "minilm-head-no-sinks")


def test_an_alignment_from_any_model(page, server, shots):
    """A bare (target x source) matrix, e.g. a recurrent model's Bahdanau attention, added to
    an explainer and opened at ?capture=ID: the same head view, the same pinning."""
    page.goto(server + "/align?capture=c1")
    page.wait_for_selector("body[data-ready]")
    assert page.eval_on_selector_all("#layer option", "o => o.map(e => e.textContent)") == [
        "bahdanau"]
    assert page.eval_on_selector_all("#stage option", "o => o.map(e => e.value)") == ["weights"]
    page.click("#target-tokens .tok[data-index='2']")
    assert torch.allclose(torch.tensor(row_values(page)), ALIGNMENT[2], atol=1e-7, rtol=0)
    assert page.locator("#run-form").is_hidden() and page.locator("#view-output").is_hidden()
    shoot(page, shots, "view-head", "alignment")
