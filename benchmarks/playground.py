"""The playground in a real browser vs the API it calls (issue 12).

Starts `glassbox serve CKPT --playground` as a separate process, then measures:

1. Chat: time to first token and decode tokens/s seen by the page (Chromium driven by
   Playwright; the page times its own fetch stream with performance.now()) vs the same
   request streamed by an httpx client (same messages, same seeded sampling, so the same
   tokens). tokens/s = (completion tokens - 1) / (end of stream - first token), on both
   sides. Runs alternate page/API; medians of --repeats; the ratio page/API is printed.
2. The next-token explorer: latency of one step (POST /v1/glassbox/next_token with a new
   context: one forward pass + the filters), of a slider move (same context: logits
   cached, filters only), and of a Step click in the page (click to table redrawn).
3. Page weight (bytes of every shipped asset, and bytes the browser fetched for one load)
   and load time on loopback (navigation start to load event, and to the first API answer
   drawn: the "Connected" status).

    .venv/bin/python benchmarks/playground.py /work/bench/tiny [--repeats 7 --new 64]
    .venv/bin/python benchmarks/playground.py random:gpt2-124m   # random weights, that shape
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

PROMPT = "Write a short story about a fox and a dog."


def start_server(ckpt: str, port: int, arena: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "glassbox.cli", "serve", f"bench={ckpt}", "--port", str(port),
           "--playground", "--arena-dir", str(arena)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def api_chat(client: httpx.Client, body: dict) -> tuple[float, float, int]:
    """(ttft ms, decode tokens/s, completion tokens) of one streamed chat request, on a
    kept-alive connection (as the page's)."""
    time.sleep(0.3)  # let the page's trailing context-meter request finish
    t0 = time.perf_counter()
    first = end = None
    tokens = 0
    req = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=req) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                if c["delta"].get("content") and first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    tps = (tokens - 1) / (end - first) if tokens > 1 else 0.0
    return (first - t0) * 1000, tps, tokens


def page_chat(page, settings: dict) -> tuple[float, float, int]:
    """The same request sent by the page: New chat, fill the controls, Send."""
    page.click("#tab-chat")
    page.click("#chat-reset")
    page.fill("#chat-max_tokens", str(settings["max_tokens"]))
    page.fill("#chat-seed", str(settings["seed"]))
    page.fill("#chat-temperature", str(settings["temperature"]))
    page.fill("#chat-top_p", str(settings["top_p"]))
    page.evaluate("() => { document.getElementById('chat-speed').textContent = ''; }")
    time.sleep(0.3)  # as before an API run
    page.fill("#chat-input", PROMPT)
    page.click("#chat-send")
    page.locator("#chat-speed", has_text="tokens/s").wait_for(timeout=120_000)
    s = page.locator("#chat-speed")
    return (float(s.get_attribute("data-ttft-ms")), float(s.get_attribute("data-tokens-per-s")),
            int(s.get_attribute("data-tokens")))  # fmt: skip


def explorer(base: str, page, steps: int) -> dict:
    tok = httpx.post(base + "/v1/glassbox/tokenize",
                     json={"model": "bench", "text": PROMPT}).json()  # fmt: skip
    ids = [0, *[t["id"] for t in tok["tokens"]]]
    new, cached = [], []
    with httpx.Client(base_url=base, timeout=60) as c:
        for i in range(steps):
            body = {"model": "bench", "token_ids": ids, "temperature": 0.8, "top_p": 0.9,
                    "top_n": 20, "seed": i}  # fmt: skip
            t0 = time.perf_counter()
            r = c.post("/v1/glassbox/next_token", json=body).json()
            new.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            c.post("/v1/glassbox/next_token", json={**body, "temperature": 1.1}).json()
            cached.append((time.perf_counter() - t0) * 1000)
            ids = [*ids, r["chosen"]["id"]]
    page.click("#tab-explorer")
    page.click("#ex-start")
    clicks, fetches = [], []
    for _ in range(steps // 2):
        before = page.locator("#ex-text .chip.gen").count()
        t0 = time.perf_counter()
        page.click("#ex-step")
        page.locator("#ex-text .chip.gen").nth(before).wait_for(state="attached")
        page.locator("#ex-table tbody tr").first.wait_for()
        clicks.append((time.perf_counter() - t0) * 1000)
        fetches.append(float(page.get_attribute("#ex-table", "data-elapsed-ms")))
    return {"new": new, "cached": cached, "clicks": clicks, "fetches": fetches}


def page_load(browser, url: str, repeats: int) -> dict:
    loads, ready, fetched = [], [], []
    for _ in range(repeats):
        ctx = browser.new_context()
        pg = ctx.new_page()
        sizes: list[int] = []
        pg.on("requestfinished", lambda r, sizes=sizes: sizes.append(r.sizes()["responseBodySize"]))
        pg.goto(url)
        pg.locator("#status", has_text="Connected").wait_for()
        # Both from the page's own clock, navigation start = 0 (no driver latency in them).
        ready.append(
            pg.evaluate("() => performance.getEntriesByName('glassbox:connected')[0].startTime")
        )
        loads.append(
            pg.evaluate("() => performance.getEntriesByType('navigation')[0].loadEventEnd")
        )
        fetched.append(sum(sizes))
        ctx.close()
    return {"load": loads, "ready": ready, "fetched": fetched}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new", type=int, default=64, help="max_tokens of each chat reply")
    ap.add_argument("--steps", type=int, default=30, help="explorer steps")
    args = ap.parse_args()
    print(describe())
    from playwright.sync_api import sync_playwright

    from glassbox.serve.playground_page import STATIC

    tmp = Path(tempfile.mkdtemp())
    ckpt = args.checkpoint
    if ckpt.startswith("random:"):
        from decode_single import build_checkpoint

        ckpt = str(build_checkpoint(tmp / "model", ckpt.split(":", 1)[1]))
    print(f"model: {args.checkpoint}")
    proc = start_server(ckpt, args.port, tmp / "arena")
    base = f"http://127.0.0.1:{args.port}"
    settings = {"max_tokens": args.new, "seed": 1, "temperature": 0.8, "top_p": 0.95}
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}], **settings}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox"])  # fmt: skip
            page = browser.new_page()
            page.goto(base + "/")
            page.locator("#status", has_text="Connected").wait_for()
            client = httpx.Client(base_url=base, timeout=120)
            api_chat(client, body), page_chat(page, settings)  # warm-up, both sides
            api_runs, page_runs = [], []
            for _ in range(args.repeats):
                api_runs.append(api_chat(client, body))
                page_runs.append(page_chat(page, settings))
            client.close()
            ex = explorer(base, page, args.steps)
            load = page_load(browser, base + "/", args.repeats)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    med = statistics.median
    tokens = {r[2] for r in api_runs + page_runs}
    print(f"\nchat: {args.repeats} runs each, {sorted(tokens)} completion tokens per reply")
    print("| client | TTFT ms (median) | decode tokens/s (median) |")
    print("|---|---|---|")
    a_ttft, a_tps = med(r[0] for r in api_runs), med(r[1] for r in api_runs)
    p_ttft, p_tps = med(r[0] for r in page_runs), med(r[1] for r in page_runs)
    print(f"| API (httpx stream) | {a_ttft:.1f} | {a_tps:.1f} |")
    print(f"| page (Chromium) | {p_ttft:.1f} | {p_tps:.1f} |")
    print(f"| page / API | {p_ttft / a_ttft:.2f}x | {p_tps / a_tps:.2f}x |")
    runs = {"API": api_runs, "page": page_runs}
    print(
        "runs (TTFT ms, tokens/s): "
        + "; ".join(
            f"{k} " + ", ".join(f"({r[0]:.0f}, {r[1]:.0f})" for r in v) for k, v in runs.items()
        )
    )
    q = statistics.quantiles
    print(f"\nexplorer ({args.steps} steps): new context median {med(ex['new']):.1f} ms "
          f"(p90 {q(ex['new'], n=10)[-1]:.1f}); slider move (cached logits) median "
          f"{med(ex['cached']):.1f} ms; in the page, a Step's request (page clock) median "
          f"{med(ex['fetches']):.1f} ms, click to table redrawn (driver clock) median "
          f"{med(ex['clicks']):.1f} ms")  # fmt: skip
    assets = sum(f.stat().st_size for f in STATIC.rglob("*") if f.is_file())
    print(
        f"\npage weight: {assets} bytes in {len(list(STATIC.rglob('*.*')))} files shipped; "
        f"{med(load['fetched']):.0f} bytes fetched per load (assets + API answers)"
    )
    print(
        f"load on loopback: load event median {med(load['load']):.0f} ms; 'Connected' "
        f"(first API answer drawn) median {med(load['ready']):.0f} ms"
    )


if __name__ == "__main__":
    main()
