"""Soak and isolation: many clients, faults and bad input against one `glassbox serve`.

Soak: after a --warmup at full concurrency, --clients concurrent clients on 127.0.0.1
for --seconds against a random-weight
model of the --preset shape. Each client loops over a seeded mix: streaming and
non-streaming chat and completions, streams it abandons after a few chunks (client
disconnects), and bad requests (4xx expected). Reported: requests sent, completed,
4xx by error code, 5xx (must be 0), lost (no answer, or a stream without [DONE]: must
be 0), p50/p99 latency and time to first token, server RSS before and after (growth
must stay under 5%), and the engine idle with every slot free at the end (/health).

Isolation: --light streaming clients measure their time per output token (TPOT) for
--iso-seconds alone, then again while one more client loops a heavy request (n=16,
logprobs=5); their p99 TPOT must stay within 2x.

    nice -n 10 .venv/bin/python benchmarks/soak.py [--clients 64 --seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from decode_single import build_checkpoint  # noqa: E402
from machine import describe  # noqa: E402
from serve_concurrent import wait_ready  # noqa: E402

MSG = [{"role": "user", "content": "hello there, tell me about the glassbox server"}]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Tally:
    """What the clients saw."""

    def __init__(self) -> None:
        self.sent = 0
        self.completed = 0
        self.disconnected = 0
        self.lost = 0
        self.client_4xx: Counter = Counter()
        self.server_5xx: Counter = Counter()
        self.latency: list[float] = []
        self.ttft: list[float] = []


def reason(r: httpx.Response) -> str:
    """A 4xx's error code, else the parameter it names."""
    err = r.json()["error"]
    return err["code"] or (f"param:{err['param']}" if err["param"] else f"http_{r.status_code}")


def bad_requests(no_stop: dict) -> list[tuple[str, dict | bytes]]:
    """(path, body) pairs the server must refuse with a 4xx."""
    return [
        ("/v1/completions", {"model": "bench", "prompt": "hi", "n": 99}),
        ("/v1/completions", {"model": "bench", "prompt": "hi", "logprobs": 6}),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}),
        ("/v1/completions", {"model": "bench", "prompt": ["hi"] * 16, "n": 16}),
        ("/v1/completions", b'{"model": "bench", "prompt": "\xff\xfe'),
        ("/v1/chat/completions", {"model": "bench", "messages": MSG, "temperature": "hot"}),
        ("/v1/chat/completions", {"model": "bench", "messages": MSG, "stop": ["x"] * 9}),
        ("/v1/chat/completions", {"model": "bench", "messages": MSG,
                                  "guided_json": {"type": "nonsense"}}),
        ("/v1/completions", {"model": "bench", "prompt": "x", "max_tokens": 10_000}),
    ]  # fmt: skip


async def one_request(
    client: httpx.AsyncClient, rng: random.Random, tally: Tally, bads: list, no_stop: dict
) -> None:
    kind = rng.choices(
        ["chat_stream", "chat", "comp_stream", "comp", "disconnect", "bad"],
        weights=[30, 20, 15, 15, 10, 10],
    )[0]
    tally.sent += 1
    if kind == "bad":
        path, body = rng.choice(bads)
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(
            body, bytes) else {"json": body}  # fmt: skip
        try:
            r = await client.post(path, **kw)
        except httpx.HTTPError:
            tally.lost += 1
            return
        if 400 <= r.status_code < 500:
            tally.client_4xx[reason(r)] += 1
        elif r.status_code >= 500:
            tally.server_5xx[r.status_code] += 1
        else:
            tally.lost += 1  # a bad request that was served: count it as a failure
        return
    chat = kind.startswith("chat") or (kind == "disconnect" and rng.random() < 0.5)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "bench", "max_tokens": rng.randint(8, 48), "temperature": 1.0,
            "seed": rng.randrange(1 << 30), "logit_bias": no_stop}  # fmt: skip
    body.update({"messages": MSG} if chat else {"prompt": "the server said"})
    stream = kind.endswith("stream") or kind == "disconnect"
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post(path, json=body)
            if r.status_code == 200 and r.json()["choices"]:
                tally.completed += 1
                tally.latency.append(time.perf_counter() - t0)
            elif r.status_code >= 500:
                tally.server_5xx[r.status_code] += 1
            else:
                tally.client_4xx[reason(r)] += 1
            return
        leave_after = rng.randint(1, 5) if kind == "disconnect" else None
        chunks, done, ttft = 0, False, None
        async with client.stream("POST", path, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                if r.status_code >= 500:
                    tally.server_5xx[r.status_code] += 1
                else:
                    tally.client_4xx[reason(r)] += 1
                return
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    if '"error"' in line[:12]:
                        tally.server_5xx["stream_error"] += 1
                        return
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    chunks += 1
                    if leave_after is not None and chunks >= leave_after:
                        break  # leave mid-stream: the server must free the slots
        if leave_after is not None:
            tally.disconnected += 1
        elif done:
            tally.completed += 1
            tally.latency.append(time.perf_counter() - t0)
            tally.ttft.append(ttft)
        else:
            tally.lost += 1
    except httpx.HTTPError:
        tally.lost += 1


async def soak(base: str, clients: int, seconds: float, no_stop: dict, seed: int) -> Tally:
    tally, bads = Tally(), bad_requests(no_stop)
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < deadline:
            await one_request(client, rng, tally, bads, no_stop)

    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    return tally


async def light_tpot(base: str, light: int, seconds: float, heavy: bool, no_stop: dict) -> tuple:
    """p50/p99 TPOT of ``light`` streaming clients, with or without one heavy client."""
    tpots: list[float] = []
    heavy_done = 0
    deadline = time.perf_counter() + seconds

    async def light_loop(i: int, client: httpx.AsyncClient) -> None:
        body = {"model": "bench", "prompt": "the server said", "max_tokens": 32,
                "temperature": 1.0, "seed": i, "logit_bias": no_stop, "stream": True,
                "logprobs": 0}  # one chunk per token  # fmt: skip
        while time.perf_counter() < deadline:
            times = []
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())
            if len(times) > 2:
                tpots.append((times[-1] - times[0]) / (len(times) - 1))

    async def heavy_loop(client: httpx.AsyncClient) -> None:
        nonlocal heavy_done
        body = {"model": "bench", "prompt": "the server said", "max_tokens": 32, "n": 16,
                "logprobs": 5, "temperature": 1.0, "logit_bias": no_stop}  # fmt: skip
        while time.perf_counter() < deadline:
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text[:200]
            heavy_done += 1

    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        jobs = [light_loop(i, client) for i in range(light)]
        if heavy:
            jobs.append(heavy_loop(client))
        await asyncio.gather(*jobs)
    return percentile(tpots, 50), percentile(tpots, 99), len(tpots), heavy_done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--light", type=int, default=8)
    ap.add_argument("--iso-seconds", type=float, default=20)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--max-seqs", type=int, default=32)
    ap.add_argument("--port", type=int, default=8767)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from glassbox.tokenizer import Tokenizer

    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        run = build_checkpoint(Path(tmp) / "bench", args.preset)
        no_stop = {str(i): -100 for i in sorted(Tokenizer.load(run).special_ids)}
        base = f"http://127.0.0.1:{args.port}"
        cmd = [sys.executable, "-m", "glassbox.cli", "serve", str(run), "--port",
               str(args.port), "--max-seqs", str(args.max_seqs), "--device", "cpu"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(base, proc)
            rss_cold = rss_mb(proc.pid)
            # Warm-up at full concurrency, so the RSS growth measured below is what the
            # soak leaks, not the first touch of allocator pools and thread stacks.
            asyncio.run(soak(base, args.clients, args.warmup, no_stop, seed=99))
            time.sleep(1.0)
            rss0 = rss_mb(proc.pid)
            t = time.perf_counter()
            tally = asyncio.run(soak(base, args.clients, args.seconds, no_stop, args.seed))
            wall = time.perf_counter() - t
            time.sleep(1.0)  # let the last aborts reach the engine thread
            rss1 = rss_mb(proc.pid)
            health = httpx.get(base + "/health").json()["engines"]["bench"]
            iso = [asyncio.run(light_tpot(base, args.light, args.iso_seconds, heavy, no_stop))
                   for heavy in (False, True)]  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    idle = (health["free_slots"] == health["max_seqs"] and health["num_running"] == 0
            and health["queue_depth"] == 0)  # fmt: skip
    growth = (rss1 - rss0) / rss0 * 100
    print(f"soak: {args.clients} clients, {wall:.0f} s, preset {args.preset}, "
          f"max_seqs {args.max_seqs}")  # fmt: skip
    print(f"  sent {tally.sent}, completed {tally.completed}, disconnected on purpose "
          f"{tally.disconnected}, 4xx {sum(tally.client_4xx.values())} "
          f"{dict(sorted(tally.client_4xx.items()))}")  # fmt: skip
    print(f"  5xx {sum(tally.server_5xx.values())} {dict(tally.server_5xx)}, lost {tally.lost}")
    print(f"  latency p50 {percentile(tally.latency, 50):.2f} s p99 "
          f"{percentile(tally.latency, 99):.2f} s; TTFT (streams) p50 "
          f"{percentile(tally.ttft, 50):.2f} s p99 {percentile(tally.ttft, 99):.2f} s")  # fmt: skip
    print(f"  server RSS {rss0:.0f} MB -> {rss1:.0f} MB ({growth:+.1f}%); {rss_cold:.0f} MB "
          f"before the {args.warmup:.0f} s warm-up")  # fmt: skip
    print(f"  engine at the end: {json.dumps(health)} -> idle with every slot free: {idle}")
    (p50a, p99a, na, _), (p50b, p99b, nb, heavy) = iso
    print(f"isolation: {args.light} light streaming clients, {args.iso_seconds:.0f} s each run")
    print(f"  alone:      TPOT p50 {p50a * 1000:.1f} ms p99 {p99a * 1000:.1f} ms ({na} requests)")
    print(f"  with heavy: TPOT p50 {p50b * 1000:.1f} ms p99 {p99b * 1000:.1f} ms ({nb} requests; "
          f"{heavy} heavy n=16 logprobs=5 requests done)")  # fmt: skip
    print(f"  p99 ratio {p99b / p99a:.2f}x (must be <= 2)")
    ok = (not tally.server_5xx and tally.lost == 0 and growth < 5 and idle
          and p99b / p99a <= 2)  # fmt: skip
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
