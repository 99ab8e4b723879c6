"""How fast the explainer page is, measured in headless Chromium (issue 15's targets).

    python benchmarks/bench_explain.py            the targets' sizes (takes a few minutes)
    python benchmarks/bench_explain.py --smoke    tiny sizes: checks that the script runs

What is timed (each the best of --rounds, after one untimed warm-up):
- server ready: `qkv explain DIR` started as a subprocess until its API answers (small model);
- page interactive: from navigation until the page has run its default text and drawn it;
- overview first paint: a --tokens text on a --layers x --heads model, from pressing Run until
  every layer x head thumbnail is drawn (the forward pass included);
- one big head: a --big x --big map (a 2-layer model with that context) fetched and drawn;
- switching layer or head, and hover feedback (the exact value printed under the pointer).

Targets: ready <= 3 s, interactive <= 1.5 s, overview <= 2 s, big head <= 1 s, switch
<= 200 ms, hover <= 50 ms. The models have random weights: speed does not depend on them.
Needs the dev extra (playwright) and a Chromium (see .ci/run).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from fastapi import FastAPI

import qkv
from qkv.explain.app import explain_router

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from explain_util import char_tokenizer, free_port, live  # noqa: E402

TARGETS = {"server ready": 3000, "page interactive": 1500, "overview first paint": 2000,
           "one big head": 1000, "switch layer/head": 200, "hover feedback": 50}


def model(layers: int, heads: int, d_model: int, context: int):
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = qkv.ModelConfig(family="decoder", vocab_size=tok.vocab_size, d_model=d_model,
                          n_layers=layers, n_heads=heads, max_seq_len=context)
    return qkv.Transformer(cfg).eval(), tok


def text_of(n: int) -> str:
    base = "the animal did not cross the street because it was too tired. "
    return (base * (n // len(base) + 1))[:n]


JS_RUN = """async (text) => {
  const old = document.body.dataset.ready;
  document.getElementById('text').value = text;
  const t0 = performance.now();
  document.getElementById('run').click();
  while (document.body.dataset.ready === old) await new Promise(r => setTimeout(r, 2));
  await new Promise(r => requestAnimationFrame(r));
  return performance.now() - t0;
}"""

JS_PICK = """async ([layer, head]) => {
  const t0 = performance.now();
  const l = document.getElementById('layer'), h = document.getElementById('head');
  if (l.value !== String(layer)) { l.value = String(layer); l.dispatchEvent(new Event('change')); }
  h.value = String(head); h.dispatchEvent(new Event('change'));
  const c = document.getElementById('head-canvas');
  while (c.dataset.head !== String(head) || c.dataset.layer !== l.selectedOptions[0].text)
    await new Promise(r => setTimeout(r, 1));
  await new Promise(r => requestAnimationFrame(r));
  return performance.now() - t0;
}"""

JS_HOVER = """async ([fx, fy]) => {
  const c = document.getElementById('head-canvas'), r = c.getBoundingClientRect();
  const t0 = performance.now();
  c.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + fx * r.width,
                                               clientY: r.top + fy * r.height}));
  await new Promise(r => requestAnimationFrame(r));
  return performance.now() - t0;
}"""


def server_ready(tmp: Path, rounds: int) -> float:
    small, tok = model(2, 4, 64, 256)
    qkv.save(small, tok, tmp / "small")
    best = float("inf")
    for _ in range(rounds):
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "qkv.cli", "explain", str(tmp / "small"),
                                 "--port", str(port)], stdout=subprocess.DEVNULL)
        try:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/explain/api/model",
                                           timeout=1)
                    break
                except OSError:
                    if proc.poll() is not None or time.perf_counter() - t0 > 60:
                        raise RuntimeError("qkv explain did not start") from None
                    time.sleep(0.02)
            best = min(best, (time.perf_counter() - t0) * 1000)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--big", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.layers, args.heads, args.d_model, args.big = 64, 2, 4, 64, 128
        args.rounds = 1
    torch.set_num_threads(2)
    from playwright.sync_api import sync_playwright

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["server ready"] = server_ready(Path(tmp), args.rounds)
    app = FastAPI()
    app.include_router(explain_router(model(args.layers, args.heads, args.d_model,
                                            max(args.tokens, 64)), prefix="/explain"))
    app.include_router(explain_router(model(2, 4, 64, args.big), prefix="/big"))
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with live(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        best = float("inf")
        for _ in range(args.rounds + 1):
            t0 = time.perf_counter()
            page.goto(url + "/explain")
            page.wait_for_selector("body[data-ready]")
            best = min(best, (time.perf_counter() - t0) * 1000)
        results["page interactive"] = best
        text = text_of(args.tokens)
        page.evaluate(JS_RUN, text)  # warm-up
        results["overview first paint"] = min(page.evaluate(JS_RUN, text)
                                              for _ in range(args.rounds))
        switches = []
        for r in range(args.rounds):
            for layer, head in ((args.layers - 1, 1 + r % (args.heads - 1)), (0, r % args.heads)):
                switches.append(page.evaluate(JS_PICK, [layer, head]))
        results["switch layer/head"] = min(switches)
        results["hover feedback"] = min(page.evaluate(JS_HOVER, [0.3 + 0.1 * i, 0.8])
                                        for i in range(args.rounds + 2))
        page.goto(url + "/big")
        page.wait_for_selector("body[data-ready]")
        page.evaluate(JS_RUN, text_of(args.big))  # the big capture; its head 0 is drawn
        results["one big head"] = min(page.evaluate(JS_PICK, [1, h % 4])
                                      for h in range(1, args.rounds + 1))
        browser.close()
    sizes = (f"{args.tokens} tokens, {args.layers} layers x {args.heads} heads, d_model "
             f"{args.d_model}; big head {args.big} x {args.big}")
    print(f"qkv explain in headless Chromium ({sizes}; {torch.get_num_threads()} threads)")
    print(f"{'measure':24s} {'ms':>8s} {'target':>8s}")
    for name, ms in results.items():
        ok = "ok" if ms <= TARGETS[name] else "MISSED"
        print(f"{name:24s} {ms:8.0f} {TARGETS[name]:8d}  {ok}")


if __name__ == "__main__":
    main()
