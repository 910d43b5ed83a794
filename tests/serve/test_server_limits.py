"""Back-pressure and lifecycle: 429 when the queue is full, cancellation when the client
goes away, CORS only when asked, the CLI commands."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest


def test_full_queue_answers_429(make_server, slower, wait_until):
    srv = make_server(max_seqs=1, max_queue=1)
    slower(srv, 0.05)
    ae = srv.app.state.models["tiny"].engine
    client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
    body = dict(model="tiny", prompt="hello", max_tokens=40)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(client.completions.create(**body)))
        for _ in range(2)
    ]
    threads[0].start()
    assert wait_until(lambda: ae.num_running == 1)  # first request holds the only slot
    threads[1].start()
    assert wait_until(lambda: ae.queue_depth == 1)  # second one waits
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(**body)
    assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
    assert "queue_depth" in httpx.get(srv.url + "/metrics").text
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 2  # the queued request still completes
    client.completions.create(model="tiny", prompt="hello", max_tokens=2)  # room again


def test_client_disconnect_frees_slots_and_stops_decoding(make_server, no_stop, slower, wait_until):
    srv = make_server(max_seqs=4)
    slower(srv, 0.02)
    ae = srv.app.state.models["tiny"].engine
    eng = ae.engine
    # Seeded, stop tokens suppressed, 4 x 100 tokens: without cancellation the engine
    # would run ~100 more steps after the client leaves.
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 100, "n": 4, "seed": 3,
            "logit_bias": no_stop, "stream": True}  # fmt: skip
    with httpx.stream("POST", srv.base_url + "/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)  # the first token arrived
        assert ae.num_running == 4 and len(eng.free_slots) == 0
    assert wait_until(lambda: ae.num_running == 0 and len(eng.free_slots) == 4, timeout=5.0)
    done = eng.tokens_generated
    time.sleep(0.3)  # ~15 steps' time: nothing more is decoded for the gone client
    assert eng.tokens_generated == done < 4 * 100
    assert not eng.waiting and ae.queue_depth == 0

    def blocking():  # a non-streaming request whose client gives up
        try:
            httpx.post(srv.base_url + "/completions", json={**body, "stream": False}, timeout=0.5)
        except httpx.TimeoutException:
            pass

    before = eng.tokens_generated
    blocking()
    assert wait_until(lambda: ae.num_running == 0 and len(eng.free_slots) == 4, timeout=5.0)
    after = eng.tokens_generated
    time.sleep(0.3)
    assert eng.tokens_generated == after < before + 4 * 100
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'status="disconnected"} 2.0' in metrics and 'status="ok"}' not in metrics


def test_cors_only_for_listed_origins(make_server):
    srv = make_server(cors_origins=["http://ok.example"])
    pre = {"Access-Control-Request-Method": "POST"}
    r = httpx.options(srv.base_url + "/models", headers={"Origin": "http://ok.example", **pre})
    assert r.headers.get("access-control-allow-origin") == "http://ok.example"
    r = httpx.options(srv.base_url + "/models", headers={"Origin": "http://evil.example", **pre})
    assert r.headers.get("access-control-allow-origin") is None
