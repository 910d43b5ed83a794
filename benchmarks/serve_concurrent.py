"""16 concurrent streaming clients through the HTTP server vs transformers, one request
at a time, on the same GPT-2-124M-shape weights (random).

The server runs as a separate process (`glassbox serve`); the clients are asyncio httpx
streams sending token-id prompts to /v1/completions (greedy, stop tokens suppressed so
every request produces exactly --new tokens). Reported: aggregate generated tokens/s
(all tokens / wall time from the first request to the last [DONE]), time to first
token p50/p99 and time per output token (TPOT: from a client's first token to its
last, per later token) p50/p99 seen by the clients. The baseline is transformers
`generate` on the same prompts, one at a time in-process (no HTTP cost), on
--baseline-requests of them.

Then the same clients again with one more client sending a --long-prompt token prompt
--long-delay seconds in (while the others decode): the engine prefills it in chunks
between decode steps, so the others' TPOT p99 should stay within 2x of the first run.

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
    client: httpx.AsyncClient, url: str, body: dict, delay: float = 0.0
) -> tuple[float, float, int]:
    """(time to first token, time per output token after it, completion tokens)."""
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first - t0, (last - first) / max(1, tokens - 1), tokens


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
    """Returns (wall s, TTFTs, TPOTs, tokens) of the ``prompts`` clients; a ``long``
    prompt client, when given, joins after ``long_delay`` s and is not counted."""
    url = base + "/v1/completions"
    async with httpx.AsyncClient(timeout=600) as client:
        t = time.perf_counter()
        tasks = [one_client(client, url, request_body(p, new, no_stop)) for p in prompts]
        if long is not None:
            tasks.append(one_client(client, url, request_body(long, new, no_stop), long_delay))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t
    results = results[: len(prompts)]
    return wall, [r[0] for r in results], [r[1] for r in results], sum(r[2] for r in results)


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
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--long-prompt", type=int, default=768, help="0 = skip the long run")
    ap.add_argument("--long-delay", type=float, default=3.0)
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
        base = f"http://127.0.0.1:{args.port}"
        cmd = [sys.executable, "-m", "glassbox.cli", "serve", str(run), "--port", str(args.port),
               "--max-seqs", str(args.clients), "--device", "cpu"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(base, proc)
            asyncio.run(run_clients(base, prompts[:2], 4, no_stop))  # warm-up
            wall, ttfts, tpots, tokens = asyncio.run(run_clients(base, prompts, args.new, no_stop))
            if args.long_prompt:
                long = torch.randint(0, tok.vocab_size, (args.long_prompt,), generator=g).tolist()
                long_run = asyncio.run(
                    run_clients(base, prompts, args.new, no_stop, long, args.long_delay)
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    bias = torch.zeros(hf.config.vocab_size)
    bias[sorted(tok.special_ids)] = -100.0
    hf_tokens, hf_time = 0, 0.0
    for p in prompts[: args.baseline_requests]:
        ids = torch.tensor([p])
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        hf_time += time.perf_counter() - t
        hf_tokens += out.shape[1] - ids.shape[1]
    ours, theirs = tokens / wall, hf_tokens / hf_time
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{args.clients} streaming clients, prompt {args.prompt} tokens, {args.new} new greedy "
          f"tokens each, model {args.preset} (random weights)")  # fmt: skip
    print("| system | generated tokens | wall s | tokens/s | TTFT p50 s | TTFT p99 s | "
          "TPOT p50 ms | TPOT p99 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")

    def row(name: str, wall: float, ttfts: list, tpots: list, tokens: int) -> None:
        tpot50, tpot99 = 1e3 * statistics.median(tpots), 1e3 * percentile(tpots, 99)
        print(f"| {name} | {tokens} | {wall:.1f} | {tokens / wall:.1f} | "
              f"{statistics.median(ttfts):.2f} | {percentile(ttfts, 99):.2f} | "
              f"{tpot50:.0f} | {tpot99:.0f} |")  # fmt: skip

    row(f"glassbox server, {args.clients} concurrent", wall, ttfts, tpots, tokens)
    if args.long_prompt:
        row(f"same + one {args.long_prompt}-token prompt at {args.long_delay:.0f} s (the "
            f"{args.clients} counted)", *long_run)  # fmt: skip
    print(f"| transformers generate, one at a time ({args.baseline_requests} requests) | "
          f"{hf_tokens} | {hf_time:.1f} | {theirs:.1f} | - | - | - | - |")  # fmt: skip
    print(f"aggregate speedup vs transformers one at a time: {ours / theirs:.2f}x")
    if args.long_prompt:
        ratio = percentile(long_run[2], 99) / percentile(tpots, 99)
        print(f"TPOT p99 with the long prompt / without: {ratio:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
