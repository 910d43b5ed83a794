"""Hostile and malformed input over HTTP: every case is a 4xx naming the parameter,
answered quickly, and the engine is left idle with every slot free."""

from __future__ import annotations

import json
import time

import httpx

from glassbox.serve.limits import ServeLimits

BOUND_S = 5.0  # every bad request is answered well within this


def post(url: str, body=None, content: bytes | None = None, **kw) -> tuple[httpx.Response, float]:
    t = time.perf_counter()
    if content is not None:
        r = httpx.post(url, content=content, timeout=30, **kw)
    else:
        r = httpx.post(url, json=body, timeout=30, **kw)
    return r, time.perf_counter() - t


def assert_4xx(r: httpx.Response, elapsed: float, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param, err
    assert elapsed < BOUND_S
    return err


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMP = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


def test_bad_input_matrix(make_server):
    srv = make_server(max_body_bytes=2 << 20)
    chat, comp = srv.base_url + "/chat/completions", srv.base_url + "/completions"
    vocab = srv.app.state.models["tiny"].vocab_size
    cases = [
        # (url, body, status, param, words in the message)
        (chat, {**CHAT, "guided_json": nested(500)}, 400, "guided_json", "nesting"),
        (chat, {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": nested(500)}}}, 400, "response_format", "nesting"),
        (comp, {**COMP, "prompt": "x" * (1 << 20)}, 400, "prompt", "characters"),
        (chat, {**CHAT, "messages": [{"role": "user", "content": "x"}] * 30_000}, 400,
         "messages", "30000 messages"),
        (comp, {**COMP, "logit_bias": {str(i): 1.0 for i in range(vocab)}}, 400, "logit_bias",
         "entries"),
        (comp, {**COMP, "prompt": ["hi"] * 16, "n": 16, "logprobs": 5}, 400, "n",
         "256 sequences"),
        (comp, {**COMP, "prompt": ["hi"] * 17}, 400, "prompt", "17 entries"),
        (comp, {**COMP, "guided_regex": "a" * 40_000}, 400, "guided_regex", "bytes"),
        (chat, {**CHAT, "guided_json": {"type": "object", "properties": {
            f"k{i}": {"type": "string", "pattern": "[a-z]{1,20}"} for i in range(3000)}}},
         400, "guided_json", "bytes"),
        (comp, {**COMP, "stop": ["x" * 300]}, 400, "stop", "characters"),
        (comp, {**COMP, "stop": [""]}, 400, "stop", "empty"),
        (comp, {**COMP, "prompt": [[]]}, 400, "prompt", "empty"),
        (comp, {**COMP, "prompt": [vocab + 5]}, 400, "prompt", "out of range"),
        (comp, {**COMP, "max_tokens": 0}, 400, "max_tokens", ">= 1"),
        (comp, {**COMP, "seed": -1}, 400, "seed", "out of range"),
        (comp, {**COMP, "top_k": -5}, 400, "top_k", ">= 0"),
        (comp, {**COMP, "logit_bias": {"abc": 1}}, 400, "logit_bias", "not a token id"),
        (comp, {**COMP, "n": 17}, 400, "n", "[1, 16]"),
        (chat, {**CHAT, "guided_json": "{not json"}, 400, "guided_json", "not valid JSON"),
        (chat, {**CHAT, "guided_regex": "(unclosed"}, 400, "guided_regex", "regex"),
        (chat, {**CHAT, "guided_regex": "x", "guided_choice": ["a"]}, 400, "guided_choice",
         "at most one"),
    ]  # fmt: skip
    for url, body, status, param, words in cases:
        r, elapsed = post(url, body)
        err = assert_4xx(r, elapsed, status, param)
        assert words in err["message"], (param, err["message"])
    eng = srv.app.state.models["tiny"].engine
    assert eng.num_running == 0 and eng.queue_depth == 0 and eng.free_slots == eng.engine.max_seqs


def test_wrong_types_for_every_field(make_server):
    srv = make_server()
    wrong = {
        "model": 5, "max_tokens": "many", "temperature": "hot", "top_p": [1], "n": 1.5,
        "stream": "maybe", "stream_options": 3, "stop": 7, "presence_penalty": {},
        "frequency_penalty": [], "logit_bias": [1, 2], "seed": "s", "user": 1,
        "response_format": "json", "top_k": "k", "min_p": "m", "repetition_penalty": [],
        "truncate_prompt_tokens": "t", "guided_json": 5, "guided_regex": 5,
        "guided_choice": "red",
    }  # fmt: skip
    for endpoint, base, extra in [
        ("/completions", COMP, {"prompt": {"a": 1}, "logprobs": "two", "echo": "nope"}),
        ("/chat/completions", CHAT, {"messages": "hi", "logprobs": "perhaps", "top_logprobs": []}),
    ]:
        for field, value in {**wrong, **extra}.items():
            r, elapsed = post(srv.base_url + endpoint, {**base, field: value})
            err = assert_4xx(r, elapsed, 400, err_param(field, r))
            assert err["param"].split(".")[0] == field, (field, err)


def err_param(field: str, r: httpx.Response) -> str:
    """Pydantic may point inside the field (e.g. 'stop.str' for a union): that is fine."""
    param = r.json()["error"]["param"] or ""
    return param if param.split(".")[0] == field else field


def test_bodies_that_are_not_json(make_server):
    srv = make_server()
    url = srv.base_url + "/completions"
    headers = {"content-type": "application/json"}
    for content in [
        b'{"model": "tiny", "prompt": "\xff\xfe\xfa"}',  # not UTF-8
        b'{"model": "tiny", "prompt": ',  # truncated
        b"[" * 100_000 + b"]" * 100_000,  # nested past Python's recursion limit
    ]:
        r, elapsed = post(url, content=content, headers=headers)
        assert r.status_code == 400 and elapsed < BOUND_S, r.text[:200]
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_oversized_bodies_are_413_declared_or_chunked(make_server):
    srv = make_server(max_body_bytes=64 << 10)
    url = srv.base_url + "/completions"

    def chunks():  # no content-length: the size is only known while reading
        body = json.dumps({**COMP, "prompt": "x" * (256 << 10)}).encode()
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    for kw in [{"content": b"x" * (128 << 10)}, {"content": chunks()}]:
        t = time.perf_counter()
        r = httpx.post(url, headers={"content-type": "application/json"}, timeout=30, **kw)
        assert r.status_code == 413, r.text[:200]
        assert r.json()["error"]["code"] == "request_too_large"
        assert "65536" in r.json()["error"]["message"] and time.perf_counter() - t < BOUND_S
    assert httpx.post(url, json=COMP, timeout=30).status_code == 200  # still serving


def test_grammar_compile_time_limit(make_server):
    # 0.1 ms: compiling 450 properties takes longer on any machine (with 0.01 s the
    # limit did not trip on a quiet one: the schema compiled in under 10 ms)
    srv = make_server(limits=ServeLimits(grammar_timeout=0.0001))
    props = {f"k{i}": {"type": "string", "pattern": "[a-z]{1,20}"} for i in range(450)}
    schema = {"type": "object", "properties": props, "required": list(props)}
    assert len(json.dumps(schema)) < ServeLimits().max_schema_bytes  # only time stops it
    r, elapsed = post(srv.base_url + "/chat/completions", {**CHAT, "guided_json": schema})
    err = assert_4xx(r, elapsed, 400, "guided_json")
    assert err["code"] == "grammar_too_complex" and "--grammar-timeout" in err["message"]


def test_pathological_regex_does_not_stall_other_streams(make_server, no_stop):
    srv = make_server()
    body = {**COMP, "max_tokens": 4, "guided_regex": "(a{1000}){1000}", "n": 4}
    r, elapsed = post(srv.base_url + "/completions", body)
    assert r.status_code == 200 and elapsed < BOUND_S
    assert all(set(c["text"]) <= {"a"} for c in r.json()["choices"])
