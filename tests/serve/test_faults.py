"""Faults over HTTP: a request whose prefill raises fails alone with a generic 500 and a
request id; a dead engine makes /health 503; deadlines answer OpenAI-shaped errors;
uvicorn's graceful shutdown lets a running stream finish."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from glassbox.serve.limits import ServeLimits

POISON = 300  # a token id the normal prompts below never contain
SECRET = "CUDA out of memory at /secret/weights/model.safetensors (9.31 GiB)"


def poison_prefill(srv) -> None:
    """Make the model raise on any multi-token forward (a prefill) that holds POISON."""
    model = srv.app.state.models["tiny"].engine.engine.model
    forward = model.forward

    def faulty(tokens, *args, **kwargs):
        if tokens.shape[1] > 1 and bool((tokens == POISON).any()):
            raise RuntimeError(SECRET)
        return forward(tokens, *args, **kwargs)

    model.forward = faulty


def read_sse(lines) -> tuple[list[dict], bool]:
    """(JSON events, whether the stream ended with [DONE]) from SSE lines."""
    events, done = [], False
    for line in lines:
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events, done


def test_failed_prefill_fails_only_its_request(make_server, no_stop, slower):
    srv = make_server(max_seqs=8)
    poison_prefill(srv)
    slower(srv, 0.01)
    ae = srv.app.state.models["tiny"].engine
    client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
    good = dict(model="tiny", max_tokens=30, temperature=0, logit_bias=no_stop)
    expected = client.completions.create(prompt=[1, 2, 3], **good).choices[0].text
    results: list = []

    def run_good():
        r = client.completions.create(prompt=[1, 2, 3], stream=True, **good)
        chunks = list(r)
        results.append(("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0]))

    threads = [threading.Thread(target=run_good) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.1)  # the good ones are decoding
    bad = {"model": "tiny", "prompt": [1, POISON, 2], "max_tokens": 5}
    for stream in (False, True):
        r = httpx.post(srv.base_url + "/completions", json={**bad, "stream": stream}, timeout=30)
        assert r.status_code == 500, r.text
        err, rid = r.json()["error"], r.headers["x-request-id"]
        assert err["type"] == "server_error" and err["code"] == "internal_error"
        assert rid in err["message"] and "secret" not in r.text and "GiB" not in r.text
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3
    for text, last in results:  # the others went on, untouched
        assert text == expected and last.finish_reason == "length"
    assert ae.alive and ae.num_running == 0 and ae.queue_depth == 0 and ae.free_slots == 8
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'status="error"} 2.0' in metrics and 'status="ok"} 4.0' in metrics


def test_health_is_503_when_the_engine_is_dead(make_server):
    srv = make_server()
    health = httpx.get(srv.url + "/health")
    assert health.status_code == 200 and health.json()["engines"]["tiny"]["alive"]
    srv.app.state.models["tiny"].engine.stop()  # the engine thread ends
    health = httpx.get(srv.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    r = httpx.post(srv.base_url + "/completions", json={"model": "tiny", "prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"


def test_request_timeout(make_server, no_stop, wait_until, slower):
    srv = make_server(limits=ServeLimits(request_timeout=0.4))
    slower(srv, 0.02)
    ae = srv.app.state.models["tiny"].engine
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 100, "logit_bias": no_stop}
    t = time.perf_counter()
    r = httpx.post(srv.base_url + "/completions", json=body, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert "--request-timeout" in r.json()["error"]["message"]
    assert time.perf_counter() - t < 2
    with httpx.stream(
        "POST", srv.base_url + "/completions", json={**body, "stream": True}, timeout=30
    ) as r:
        assert r.status_code == 200
        events, done = read_sse(r.iter_lines())
    assert events[-1]["error"]["code"] == "request_timeout" and done
    assert wait_until(lambda: ae.free_slots == ae.engine.max_seqs and ae.num_running == 0)
    assert 'status="timeout"} 2.0' in httpx.get(srv.url + "/metrics").text


def test_queue_wait_limit(make_server, no_stop, wait_until, slower):
    srv = make_server(max_seqs=1, limits=ServeLimits(max_queue_wait=0.3))
    slower(srv, 0.02)
    ae = srv.app.state.models["tiny"].engine
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 60, "logit_bias": no_stop,
            "stream": True}  # fmt: skip
    warm = {"model": "tiny", "prompt": "hi", "max_tokens": 1}  # the first forward is slow
    assert httpx.post(srv.base_url + "/completions", json=warm, timeout=30).status_code == 200
    with httpx.stream("POST", srv.base_url + "/completions", json=body, timeout=30) as first:
        lines = first.iter_lines()
        next(lines)  # it holds the only slot
        r = httpx.post(srv.base_url + "/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_timeout"
        assert wait_until(lambda: ae.queue_depth == 0)  # the refused request left the queue
        events, done = read_sse(lines)
    assert done and events[-1]["choices"][0]["finish_reason"] == "length"


def test_graceful_shutdown_finishes_running_streams(make_server, no_stop, slower):
    srv = make_server()
    slower(srv, 0.02)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 40, "logit_bias": no_stop,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", srv.base_url + "/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        srv.server.should_exit = True  # what SIGTERM does
        rest = "\n".join(lines)
    assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
    srv.thread.join(timeout=15)
    assert not srv.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health")
