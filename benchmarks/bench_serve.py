"""`qkv serve` speed: HTTP against in-process decoding, batching, and a bounded load test.

GPT-2 124M's shape with random weights (speed does not depend on the values), greedy, bf16
weights as `qkv serve` loads them by default (--dtype fp32 or int8 for the server and the
in-process baseline alike; Hugging Face runs fp32, bf16 autocast and bf16 weights, and its best
counts), a character tokenizer (the output layer still has GPT-2's 50257 rows;
a bias forbids the ids the tokenizer lacks, so every generated token is text). The server is a
real `qkv serve` subprocess on a loopback port; the client is this process (httpx).

Measured, with the targets of the issue:
1. single-stream decode over HTTP (tokens/s after the first token) vs in-process
   `qkv.generate` on the same weights: >= 90% (also shown against qkv.generate at its fastest
   for that number format, e.g. FBGEMM's int8, which exact batching cannot use);
2. time to first token for a 32-token prompt, streamed over HTTP: <= 150 ms;
3. 8 concurrent streams, aggregate tokens/s: >= 3x one stream, and >= 2x Hugging Face
   `generate` on a left-padded batch of the same 8 prompts in one process, at its best of fp32,
   bf16 autocast and bf16 weights (what a `transformers` user would do);
4. load test: 100 concurrent clients (streaming, plain, and ones that disconnect after two
   chunks): 0 errors but the expected 429s, 0 hangs, p50/p99 latency, and the server's memory
   (RSS) before, after one round and after a second round.

    python benchmarks/bench_serve.py            # the full run (~10 minutes on a 2-core CPU)
    python benchmarks/bench_serve.py --quick    # a tiny model, a few seconds: a smoke test
    python benchmarks/bench_serve.py --steps-only   # one decoding step: engine vs qkv.generate

Only loopback addresses are used, and every loop is bounded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402

import qkv  # noqa: E402
from qkv.hardware import set_threads  # noqa: E402

TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n0123456789"


# ---------------------------------------------------------------------- the model

def build(quick: bool) -> tuple[qkv.Transformer, qkv.Tokenizer]:
    tok = qkv.Tokenizer.train([TEXT], kind="char")
    if quick:
        cfg = qkv.ModelConfig(family="decoder", vocab_size=512, d_model=64, n_layers=2,
                              n_heads=4, max_seq_len=256, lm_head_bias=True)
    else:
        cfg = qkv.presets.get("gpt2-124m", lm_head_bias=True)
    torch.manual_seed(0)
    model = qkv.Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.bias.zero_()
        forbidden = [tok.pad_id, tok.unk_id, tok.eos_id, *range(tok.vocab_size, cfg.vocab_size)]
        model.lm_head.bias[forbidden] = -1e4  # only text tokens, and no end-of-text
    return model, tok


DEFAULT_DTYPE = "bf16"  # qkv serve's default
FASTEST = {"fp32": "nn.Linear", "bf16": "oneDNN packed weights, qkv.quantize.pack_linears",
           "int8": "FBGEMM, int8 inputs on one range per batch"}


def converted(model: qkv.Transformer, dtype: str, exact: bool,
              fastest: bool = False) -> qkv.Transformer:
    """A copy of `model` in `dtype` as `qkv serve --dtype` loads it (`exact`: exact batching),
    or (`fastest`) as qkv decodes one stream fastest in that format."""
    from qkv.quantize import pack_linears

    if dtype == "fp32":
        return model
    if dtype == "bf16":
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        return pack_linears(bf16) if fastest else bf16
    return qkv.quantize_int8(copy.deepcopy(model),
                             activations="int8-rows" if exact and not fastest else "int8")


def prompts(n: int, length: int) -> list[str]:
    """n different prompts; the first has `length` characters (= tokens), the others a bit
    fewer, so a padded batch really has padding."""
    words = TEXT.replace("\n", " ")
    return [(words[i:] + words)[: length - (i % 5)] for i in range(n)]


# ---------------------------------------------------------------------- the server

def start_server(directory: Path, port: int, threads: int, max_seqs: int,
                 max_queue: int, dtype: str, exact: bool) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkv.cli", "serve", str(directory), "--host", "127.0.0.1",
         "--port", str(port), "--threads", str(threads), "--max-seqs", str(max_seqs),
         "--max-queue", str(max_queue), "--model-name", "bench", "--dtype", dtype,
         "--exact-batching" if exact else "--no-exact-batching"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"qkv serve exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("qkv serve did not become healthy in 300 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stream_once(url: str, prompt: str, max_tokens: int, close_after: int | None = None,
                timeout: float = 600) -> dict:
    """One streamed completion: the time of each text chunk, from sending the request."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    start = time.perf_counter()
    times, text, status = [], "", None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        status = r.status_code
        if status == 200:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                piece = chunk["choices"][0]["text"] if chunk["choices"] else ""
                if piece:
                    times.append(time.perf_counter() - start)
                    text += piece
                if close_after is not None and len(times) >= close_after:
                    break
        else:
            r.read()
    return {"status": status, "times": times, "text": text,
            "latency": time.perf_counter() - start}


def decode_rate(times: list[float], tokens: int) -> float:
    """Tokens per second after the first one (one char token per text chunk here)."""
    return (tokens - 1) / (times[-1] - times[0])


# ---------------------------------------------------------------------- the measurements

def in_process(model, tok, prompt: str, new: int, rounds: int) -> tuple[float, float]:
    """qkv.generate in this process: (decode tokens/s, time to first token), best round."""
    best_rate, best_ttft = 0.0, float("inf")
    for _ in range(rounds):
        times: list[float] = []
        start = time.perf_counter()

        def stamp(piece: str, times=times, start=start) -> None:
            times.append(time.perf_counter() - start)

        qkv.generate(model, tok, prompt, max_new_tokens=new, temperature=0, stream=stamp)
        best_rate = max(best_rate, decode_rate(times, new))
        best_ttft = min(best_ttft, times[0])
    return best_rate, best_ttft


def step_costs(model, tok, max_seqs: int = 8, repeats: int = 6,
               exact: bool = True) -> dict[str, float]:
    """Seconds per decoding step, best of `repeats` x 2, without HTTP: the engine's step for one
    and for `max_seqs` sequences (exact batching: max(live, width_from) rows), and the one-row
    step of `qkv.generate`. They interleave, so a busy machine slows them alike."""
    from qkv.serve import Engine, Sampling, Sequence

    engine = Engine(model, tok, max_seqs=max_seqs, exact=exact)
    engine.close()  # its thread is not needed: the steps are called here
    print(f"engine: exact batching {'verified' if engine.exact_verified else 'NOT verified'}"
          f" from a width of {engine.width_from} rows" if exact else "engine: not exact",
          flush=True)

    def sequences(k: int) -> list:
        seqs = [Sequence(tok.encode(TEXT[:32], add_special_tokens=False),
                         Sampling(max_tokens=10**6, temperature=0), lambda event: None)
                for _ in range(k)]
        for seq in seqs:
            engine._prefill(seq)
        engine.running = []
        return seqs

    one, full = sequences(1), sequences(max_seqs)
    cache = model.new_cache()
    with torch.inference_mode():
        model.next_token_logits(torch.tensor([tok.encode(TEXT[:32], add_special_tokens=False)]),
                                cache)

    def generate_step() -> None:
        with torch.inference_mode():
            model.next_token_logits(torch.tensor([[5]]), cache)

    cases = {"engine, 1 sequence": lambda: engine._step(one),
             f"engine, {max_seqs} sequences": lambda: engine._step(full),
             "qkv.generate, 1 row": generate_step}
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            fn()
            best[name] = min(best[name], (time.perf_counter() - start) / 2)
    return best


def concurrent_streams(url: str, texts: list[str], new: int) -> tuple[float, list[dict]]:
    results: list[dict] = [{} for _ in texts]

    def run(i: int) -> None:
        results[i] = stream_once(url, texts[i], new)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    wall = time.perf_counter() - start
    total = sum(len(r.get("text", "")) for r in results)
    return total / wall, results


def hf_padded_batch(model_cfg, tok, texts: list[str], new: int, setting: str,
                    rounds: int) -> float:
    """Hugging Face `generate` on a left-padded batch of the prompts: aggregate tokens/s.
    setting: "fp32", "bf16 autocast" (fp32 weights) or "bf16 weights" (`model.to(bf16)`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=model_cfg.vocab_size, n_positions=model_cfg.max_seq_len,
                     n_embd=model_cfg.d_model, n_layer=model_cfg.n_layers,
                     n_head=model_cfg.n_heads)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(cfg).eval()
    if setting == "bf16 weights":
        hf = hf.to(torch.bfloat16)
    rows = [tok.encode(t, add_special_tokens=False) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    best = 0.0
    for r in range(rounds + 1):  # the first call warms up
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16,
                                                    enabled=setting == "bf16 autocast"):
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
        if r:
            best = max(best, (out.shape[1] - width) * len(rows) / elapsed)
    return best


def load_test(url: str, clients: int, new: int, prompt_len: int) -> dict:
    """`clients` at once: a third stream, a third wait for the whole answer, a third hang up
    after two chunks. Every request has a deadline; one that passes it is a hang."""
    deadline = 300.0
    outcomes: list[dict] = [{} for _ in range(clients)]
    texts = prompts(clients, prompt_len)

    def run(i: int) -> None:
        kind = ("stream", "plain", "disconnect")[i % 3]
        try:
            if kind == "plain":
                start = time.perf_counter()
                r = httpx.post(url + "/v1/completions", timeout=deadline,
                               json={"model": "bench", "prompt": texts[i], "max_tokens": new,
                                     "temperature": 0})
                outcomes[i] = {"kind": kind, "status": r.status_code,
                               "latency": time.perf_counter() - start}
            else:
                res = stream_once(url, texts[i], new, 2 if kind == "disconnect" else None,
                                  timeout=deadline)
                outcomes[i] = {"kind": kind, "status": res["status"],
                               "latency": res["latency"]}
        except httpx.TimeoutException:
            outcomes[i] = {"kind": kind, "status": "hang"}
        except Exception as e:  # counted as an error
            outcomes[i] = {"kind": kind, "status": f"{type(e).__name__}"}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline + 30)
    wall = time.perf_counter() - start
    statuses = [o.get("status", "hang") for o in outcomes]
    ok = sorted(o["latency"] for o in outcomes if o.get("status") == 200
                and o["kind"] != "disconnect")
    return {
        "wall_s": wall,
        "ok": statuses.count(200), "429": statuses.count(429),
        "hangs": statuses.count("hang"),
        "errors": sum(1 for s in statuses if s not in (200, 429, "hang")),
        "p50_s": statistics.median(ok) if ok else float("nan"),
        "p99_s": ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else float("nan"),
    }


# ---------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model: a smoke test")
    ap.add_argument("--new-tokens", type=int, help="tokens per stream (default 128; quick 16)")
    ap.add_argument("--rounds", type=int, help="repetitions, best counts (default 3; quick 1)")
    ap.add_argument("--clients", type=int, help="load-test clients (default 100; quick 12)")
    ap.add_argument("--threads", type=int, help="PyTorch threads, here and in the server")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    ap.add_argument("--steps-only", action="store_true",
                    help="only the cost of one decoding step, engine vs qkv.generate")
    ap.add_argument("--exact-batching", action=argparse.BooleanOptionalAction, default=True,
                    help="the server's --exact-batching (default) or --no-exact-batching")
    ap.add_argument("--dtype", default=DEFAULT_DTYPE, choices=("fp32", "bf16", "int8"),
                    help="the weights of the server and of the in-process baseline (default "
                    f"{DEFAULT_DTYPE}, as `qkv serve`)")
    args = ap.parse_args()
    new = args.new_tokens or (16 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 3)
    clients = args.clients or (12 if args.quick else 100)
    threads = set_threads(args.threads)
    model, tok = build(args.quick)
    cfg = model.config
    served = converted(model, args.dtype, args.exact_batching)  # what the server runs
    fastest = converted(model, args.dtype, exact=False, fastest=True)  # qkv.generate's best
    prompt_len = 32
    texts = prompts(8, prompt_len)
    print(f"model: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters, {args.dtype}; {threads} threads; "
          f"{new} new tokens; {rounds} round(s)", flush=True)

    costs = step_costs(served, tok, exact=args.exact_batching)
    for name, seconds in costs.items():
        print(f"one decoding step, {name}: {seconds * 1e3:.1f} ms (no HTTP)", flush=True)
    if args.steps_only:
        return 0
    rate_in, ttft_in = in_process(served, tok, texts[0], new, rounds)
    print(f"in-process qkv.generate, the server's weights ({args.dtype}"
          f"{', int8-rows' if served is not fastest and args.dtype == 'int8' else ''}): "
          f"{rate_in:.1f} tok/s, first token {ttft_in * 1e3:.0f} ms", flush=True)
    rate_best = rate_in
    if fastest is not served:
        rate_best = in_process(fastest, tok, texts[0], new, rounds)[0]
        print(f"in-process qkv.generate at its fastest for {args.dtype} "
              f"({FASTEST[args.dtype]}): {rate_best:.1f} tok/s", flush=True)
    del served, fastest
    hf = {}
    if not args.no_hf:
        for setting in ("fp32", "bf16 autocast", "bf16 weights"):
            hf[setting] = hf_padded_batch(cfg, tok, texts, new, setting, rounds)
            print(f"HF generate, padded batch of 8, {setting}: {hf[setting]:.1f} tok/s",
                  flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        qkv.save(model, tok, Path(tmp) / "bench")
        del model
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(Path(tmp) / "bench", port, threads, max_seqs=8, max_queue=64,
                            dtype=args.dtype, exact=args.exact_batching)
        try:
            stream_once(url, texts[0], 4)  # warm up
            singles = [stream_once(url, texts[0], new) for _ in range(rounds)]
            rate_http = max(decode_rate(s["times"], new) for s in singles)
            ttfts = sorted(stream_once(url, texts[0], 2)["times"][0] for _ in range(5))
            ttft = statistics.median(ttfts)
            single_wall = min(s["latency"] for s in singles)
            single_agg = new / single_wall
            print(f"HTTP single stream: {rate_http:.1f} tok/s decode "
                  f"({rate_http / rate_in:.0%} of in-process), {single_agg:.1f} tok/s overall",
                  flush=True)
            print(f"HTTP time to first token, {prompt_len}-token prompt: median "
                  f"{ttft * 1e3:.0f} ms (of 5)", flush=True)
            agg = max(concurrent_streams(url, texts, new)[0] for _ in range(rounds))
            print(f"HTTP 8 concurrent streams: {agg:.1f} tok/s aggregate "
                  f"({agg / single_agg:.2f}x one stream)", flush=True)
            rss0 = rss_mb(proc.pid)
            load1 = load_test(url, clients, max(4, new // 8), prompt_len)
            time.sleep(1)
            rss1 = rss_mb(proc.pid)
            load2 = load_test(url, clients, max(4, new // 8), prompt_len)
            time.sleep(1)
            rss2 = rss_mb(proc.pid)
            for i, load in enumerate((load1, load2), 1):
                print(f"load test {i}: {clients} clients, {load['ok']} ok, {load['429']} x 429, "
                      f"{load['errors']} errors, {load['hangs']} hangs, p50 "
                      f"{load['p50_s']:.2f} s, p99 {load['p99_s']:.2f} s, wall "
                      f"{load['wall_s']:.1f} s", flush=True)
            print(f"server RSS: {rss0:.0f} MB before, {rss1:.0f} MB after round 1, "
                  f"{rss2:.0f} MB after round 2", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    print("\ntargets" + (" (--quick: a tiny model, not the targets' shape)" if args.quick
                         else ""))
    checks = [
        ("single-stream HTTP decode >= 90% of in-process (same weights)",
         rate_http >= 0.9 * rate_in, f"{rate_http / rate_in:.1%}"),
        (f"  (info) vs in-process at its fastest for {args.dtype}",
         rate_http >= 0.9 * rate_best, f"{rate_http / rate_best:.0%}"),
        ("time to first token <= 150 ms", ttft <= 0.150, f"{ttft * 1e3:.0f} ms"),
        ("8 streams >= 3x one stream", agg >= 3 * single_agg, f"{agg / single_agg:.2f}x"),
    ]
    if hf:
        best_hf = max(hf, key=lambda k: hf[k])
        checks.append((f"8 streams >= 2x HF padded batch at its best ({best_hf})",
                       agg >= 2 * hf[best_hf], f"{agg / hf[best_hf]:.2f}x"))
        for name, value in hf.items():
            if name != best_hf:
                checks.append((f"  (info) vs HF {name}", agg >= 2 * value,
                               f"{agg / value:.2f}x"))
    errors = load1["errors"] + load2["errors"]
    hangs = load1["hangs"] + load2["hangs"]
    checks.append(("load test: 0 errors but 429s, 0 hangs", errors == 0 and hangs == 0,
                   f"{errors} errors, {hangs} hangs"))
    checks.append(("server memory flat (round 2 within 5% of round 1)",
                   abs(rss2 - rss1) <= 0.05 * rss1, f"{rss1:.0f} -> {rss2:.0f} MB"))
    for name, ok, value in checks:
        print(f"  [{'PASS' if ok else 'MISS'}] {name}: {value}")
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
