"""16 concurrent streaming clients through the HTTP server vs transformers, one request
at a time, on the same GPT-2-124M-shape weights (random).

The server runs as a separate process (`glassbox serve`); the clients are asyncio httpx
streams sending token-id prompts to /v1/completions (greedy, stop tokens suppressed so
every request produces exactly --new tokens). Reported: aggregate generated tokens/s
(all tokens / wall time from the first request to the last [DONE]), time to first
token p50/p99 and time per output token (TPOT: every gap between two consecutive
tokens of a client once all clients have their first token, all clients pooled)
p50/p99 seen by the clients. The baseline is transformers
`generate` on the same prompts, one at a time in-process (no HTTP cost), on
--baseline-requests of them.

Then the same clients again with one more client sending a --long-prompt token prompt
--long-delay seconds after they all have their first token (so they are decoding): the
engine prefills it in chunks between decode steps, so the others' TPOT p99 should stay
within 2x of the first run.
Both runs are repeated for each --max-batched-tokens (the engine's per-step token
budget: decode tokens + prompt chunks), each with its own server.

    nice -n 10 .venv/bin/python benchmarks/serve_concurrent.py [--clients 16 --new 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_single import build_checkpoint  # noqa: E402
from machine import describe  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def one_client(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    started: list[int],
    wait_for: int = 0,
    delay: float = 0.0,
) -> tuple[float, list[float], int]:
    """(time to first token, the arrival time of each token, completion tokens).
    Counts itself in ``started`` at its first token; waits until ``wait_for`` clients
    have, then ``delay`` seconds, before sending."""
    while started[0] < wait_for:
        await asyncio.sleep(0.01)
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                stamps.append(time.perf_counter())
                started[0] += len(stamps) == 1
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return stamps[0] - t0, stamps, tokens


def request_body(prompt: list[int], new: int, no_stop: dict) -> dict:
    return {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": new,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": no_stop,
        "logprobs": 0,  # a chunk per token, even one ending mid-UTF-8 character
    }


async def run_clients(
    base: str,
    prompts: list[list[int]],
    new: int,
    no_stop: dict,
    long: list[int] | None = None,
    long_delay: float = 0.0,
) -> tuple:
    """Returns (wall s, TTFTs, steady-state inter-token gaps (all clients pooled), tokens) of the
    ``prompts`` clients; a ``long`` prompt client, when given, joins ``long_delay`` s
    after all of them have their first token, and is not counted."""
    url = base + "/v1/completions"
    async with httpx.AsyncClient(timeout=600) as client:
        t = time.perf_counter()
        started = [0]  # clients that have their first token
        tasks = [one_client(client, url, request_body(p, new, no_stop), started) for p in prompts]
        if long is not None:  # joins once every other client decodes
            body = request_body(long, new, no_stop)
            tasks.append(one_client(client, url, body, started, len(prompts), long_delay))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t
    results = results[: len(prompts)]
    # steady state: the gaps after every client has its first token (the burst of
    # prompts is prefilled by then), so the long prompt is the only newcomer
    steady = max(r[1][0] for r in results)
    gaps = [b - a for r in results for a, b in zip(r[1], r[1][1:], strict=False) if a >= steady]
    return wall, [r[0] for r in results], gaps, sum(r[2] for r in results)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--baseline-requests", type=int, default=3)
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--long-prompt", type=int, default=768, help="0 = skip the long run")
    ap.add_argument("--long-delay", type=float, default=0.5, help="s after all first tokens")
    ap.add_argument("--dtype", default="fp32", help="the server's --dtype (fp32: as before)")
    ap.add_argument("--max-batched-tokens", default="64,256", help="comma-separated budgets")
    args = ap.parse_args()
    print(describe(), flush=True)
    from transformers import AutoModelForCausalLM

    from glassbox.interop.hf import export_hf
    from glassbox.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        run = build_checkpoint(Path(tmp) / "bench", args.preset)
        export_hf(run, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
        tok = Tokenizer.load(run)
        g = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(0, tok.vocab_size, (args.prompt,), generator=g).tolist()
            for _ in range(args.clients)
        ]
        no_stop = {str(i): -100 for i in sorted(tok.special_ids)}
        long = torch.randint(0, tok.vocab_size, (args.long_prompt,), generator=g).tolist()
        # transformers before and after the server runs (the machine may be shared)
        before = hf_baseline(hf, tok, prompts[: args.baseline_requests], args.new)
        runs = {}  # budget -> (plain run, run with the long prompt or None)
        for budget in [int(b) for b in args.max_batched_tokens.split(",")]:
            runs[budget] = serve_and_measure(args, run, budget, prompts, no_stop, long)
    after = hf_baseline(hf, tok, prompts[: args.baseline_requests], args.new)
    hf_tokens, hf_time = before[0] + after[0], before[1] + after[1]
    print(f"transformers one at a time: {before[0] / before[1]:.1f} tok/s before the server "
          f"runs, {after[0] / after[1]:.1f} after; their mean is the baseline")  # fmt: skip
    theirs = hf_tokens / hf_time
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{args.clients} streaming clients, prompt {args.prompt} tokens, {args.new} new greedy "
          f"tokens each, model {args.preset} (random weights)")  # fmt: skip
    print("| system | generated tokens | wall s | tokens/s | TTFT p50 s | TTFT p99 s | "
          "TPOT p50 ms | TPOT p99 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")

    def row(name: str, wall: float, ttfts: list, gaps: list, tokens: int) -> None:
        tpot50, tpot99 = 1e3 * statistics.median(gaps), 1e3 * percentile(gaps, 99)
        print(f"| {name} | {tokens} | {wall:.1f} | {tokens / wall:.1f} | "
              f"{statistics.median(ttfts):.2f} | {percentile(ttfts, 99):.2f} | "
              f"{tpot50:.0f} | {tpot99:.0f} |")  # fmt: skip

    for budget, (plain, with_long) in runs.items():
        row(f"glassbox server, {args.clients} concurrent, budget {budget}", *plain)
        if with_long is not None:
            row(f"same + one {args.long_prompt}-token prompt arriving mid-decode (the "
                f"{args.clients} counted)", *with_long)  # fmt: skip
    print(f"| transformers generate, one at a time ({args.baseline_requests} requests x 2) | "
          f"{hf_tokens} | {hf_time:.1f} | {theirs:.1f} | - | - | - | - |")  # fmt: skip
    for budget, (plain, with_long) in runs.items():
        line = f"budget {budget}: {plain[3] / plain[0] / theirs:.2f}x transformers one at a time"
        if with_long is not None:
            ratio = percentile(with_long[2], 99) / percentile(plain[2], 99)
            line += f"; TPOT p99 with the long prompt / without: {ratio:.2f}x (target <= 2x)"
        print(line)


def hf_baseline(hf, tok, prompts: list[list[int]], new: int) -> tuple[int, float]:
    """transformers generate, one prompt at a time, greedy, stop tokens suppressed:
    (generated tokens, seconds)."""
    tokens, secs = 0, 0.0
    for p in prompts:
        ids = torch.tensor([p])
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        secs += time.perf_counter() - t
        tokens += out.shape[1] - ids.shape[1]
    return tokens, secs


def serve_and_measure(args, run: Path, budget: int, prompts, no_stop, long) -> tuple:
    """Start a server with per-step token budget ``budget``; run the clients without
    and (when --long-prompt) with the long-prompt client."""
    base = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "glassbox.cli", "serve", str(run), "--port", str(args.port),
           "--max-seqs", str(args.clients + 1), "--device", "cpu", "--dtype", args.dtype,
           "--max-batched-tokens", str(budget)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(base, proc)
        asyncio.run(run_clients(base, prompts[:2], 4, no_stop))  # warm-up
        plain = asyncio.run(run_clients(base, prompts, args.new, no_stop))
        with_long = None
        if args.long_prompt:
            with_long = asyncio.run(
                run_clients(base, prompts, args.new, no_stop, long, args.long_delay)
            )
        return plain, with_long
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
