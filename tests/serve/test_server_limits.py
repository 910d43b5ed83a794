"""Back-pressure and lifecycle: 429 when the queue is full, cancellation when the client
goes away, CORS only when asked, the CLI commands."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest


def slow_down(srv, seconds: float) -> None:
    """Make every engine step take ``seconds`` longer (a stand-in for a big model)."""
    engine = srv.app.state.models["tiny"].engine.engine
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    engine.step = slow_step


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_full_queue_answers_429(make_server):
    srv = make_server(max_seqs=1, max_queue=1)
    slow_down(srv, 0.05)
    ae = srv.app.state.models["tiny"].engine
    client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
    body = dict(model="tiny", prompt="hello", max_tokens=40)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(client.completions.create(**body)))
        for _ in range(2)
    ]
    threads[0].start()
    assert wait_for(lambda: ae.num_running == 1)  # first request holds the only slot
    threads[1].start()
    assert wait_for(lambda: ae.queue_depth == 1)  # second one waits
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(**body)
    assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
    assert "queue_depth" in httpx.get(srv.url + "/metrics").text
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 2  # the queued request still completes
    client.completions.create(model="tiny", prompt="hello", max_tokens=2)  # room again


def test_client_disconnect_cancels_generation(make_server):
    srv = make_server()
    slow_down(srv, 0.02)
    ae = srv.app.state.models["tiny"].engine
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 100, "stream": True}
    with httpx.stream("POST", srv.base_url + "/completions", json=body, timeout=30) as r:
        next(r.iter_lines())  # the first token arrived
        assert ae.num_running == 1
    assert wait_for(lambda: ae.num_running == 0, timeout=2.0)  # far less than 100 steps
    assert ae.engine.tokens_generated < 100

    def blocking():  # a non-streaming request whose client gives up
        try:
            httpx.post(srv.base_url + "/completions", json={**body, "stream": False}, timeout=0.3)
        except httpx.TimeoutException:
            pass

    blocking()
    assert wait_for(lambda: ae.num_running == 0, timeout=2.0)


def test_cors_only_for_listed_origins(make_server):
    srv = make_server(cors_origins=["http://ok.example"])
    pre = {"Access-Control-Request-Method": "POST"}
    r = httpx.options(srv.base_url + "/models", headers={"Origin": "http://ok.example", **pre})
    assert r.headers.get("access-control-allow-origin") == "http://ok.example"
    r = httpx.options(srv.base_url + "/models", headers={"Origin": "http://evil.example", **pre})
    assert r.headers.get("access-control-allow-origin") is None
