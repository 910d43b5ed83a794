"""The server through the official `openai` client (and raw HTTP where the client hides
details): chat, completions, streaming, logprobs, structured output, errors."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from glassbox.checkpoint import load_model_dir
from glassbox.infer.engine import Engine, GenerationRequest
from glassbox.infer.sampling import SamplingParams

MSG = [{"role": "user", "content": "hello world"}]


API_KEY = "test-key"  # the key the `live` fixture (conftest.py) serves with


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def local(tiny_ckpt):
    model, tok, _ = load_model_dir(tiny_ckpt)
    return model, tok


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_chat_greedy_matches_engine_and_counts_usage(client, local):
    model, tok = local
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    prompt = tok.encode_chat(MSG)
    req = GenerationRequest(
        prompt,
        SamplingParams(temperature=0),
        12,
        stop_token_ids=frozenset({tok.end_id, tok.eot_id}),
    )
    events = list(Engine(model, tok).generate(req))
    assert r.choices[0].message.content == "".join(e.text for e in events)
    assert r.choices[0].finish_reason == events[-1].finish_reason
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == sum(e.token is not None for e in events)


def test_completions_seed_n_and_logprobs(client):
    kw = dict(model="tiny", prompt="The quick", max_tokens=8, n=3, seed=5, logprobs=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    for c in a.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        assert all(x <= 0 for x in lp.token_logprobs)
        # A dict keyed by token text: byte tokens that all show as U+FFFD share one key.
        assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
        assert sum(len(t) == 2 for t in lp.top_logprobs) >= len(lp.top_logprobs) // 2


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0])  # greedy takes the top token
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_streaming_matches_non_streaming_and_reports_usage(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=15, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_raw_sse_ends_with_done(live):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(live.base_url + "/completions", json=body, headers=headers, timeout=30)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_stop_strings(client):
    base = client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0)
    text = base.choices[0].text
    stop = text[6:8]
    assert len(stop) == 2
    r = client.completions.create(
        model="tiny", prompt="hello", max_tokens=20, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


def test_json_schema_outputs_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(4):
        r = client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=100, temperature=1.0, seed=seed,
            response_format=fmt,
        )  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_object_regex_and_choice(client):
    # An object of any size may run out of tokens; these seeded draws are known to close
    # it, so a broken grammar (or a broken "grammar complete -> stop") fails here.
    for seed in (16, 28):
        r = client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=100, seed=seed,
            response_format={"type": "json_object"},
        )  # fmt: skip
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(
        model="tiny", prompt="x", max_tokens=30, seed=2,
        extra_body={"guided_regex": r"[a-z]{2,5}-[0-9]{3}"},
    )  # fmt: skip
    import re

    assert r.choices[0].finish_reason == "stop"  # at most 9 characters: it must end
    assert re.fullmatch(r"[a-z]{2,5}-[0-9]{3}", r.choices[0].text)
    choices = ["red", "green", "blue sky"]
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=MSG, seed=seed, extra_body={"guided_choice": choices}
        )
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content in choices


def test_truncate_and_rest_of_context(client, live):
    ctx = client.models.list().data[0].model_extra["max_model_len"]
    long = "hello world " * 200
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=long, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    r = client.completions.create(
        model="tiny", prompt=long, max_tokens=4, temperature=0,
        extra_body={"truncate_prompt_tokens": 20},
    )  # fmt: skip
    assert r.usage.prompt_tokens == 20
    no_stop = {str(i): -100 for i in range(6)}  # special tokens (incl. end ids) never drawn
    r = client.completions.create(model="tiny", prompt="hi", logit_bias=no_stop, seed=0)
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == ctx


def test_errors(client, local):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1000)
    msg = e.value.body["message"]
    prompt_tokens = int(msg.split("prompt has ")[1].split()[0])
    assert "context window is 128 tokens" in msg and "1000 new tokens" in msg
    assert prompt_tokens == len(local[1].encode_chat(MSG))
    for kw, param, rng in [
        ({"temperature": 5000}, "temperature", "[0.0, 100.0]"),
        ({"top_p": 2}, "top_p", "[0.0, 1.0]"),
        ({"presence_penalty": 3}, "presence_penalty", "[-2.0, 2.0]"),
        ({"n": 99}, "n", "[1, 16]"),
        ({"stop": [str(i) for i in range(9)]}, "stop", "at most 8"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs", "[0, 20]"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, **kw)
        assert e.value.body["param"] == param and rng in e.value.body["message"]
        assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSG)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model="tiny", messages=MSG, response_format=bad)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, temperature="hot")
    assert e.value.body["param"] == "temperature"


def test_completions_caps_name_their_parameter(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, logprobs=6)
    assert e.value.body["param"] == "logprobs" and "[0, 5]" in e.value.body["message"]
    long = "hello world " * 200  # over the window: the error names the prompt, not messages
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=long, max_tokens=4)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": long}], max_tokens=4
        )
    assert e.value.body["param"] == "messages"


def test_api_key_required(live):
    c = openai.OpenAI(base_url=live.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        c.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.post(live.base_url + "/completions", json={}).status_code == 401
    assert httpx.get(live.url + "/health").status_code == 200  # health needs no key
    assert httpx.get(live.url + "/metrics").status_code == 401  # metrics does


def test_health_metrics_and_body_limit(live, client):
    client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    text = httpx.get(live.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in [
        "glassbox_queue_depth", "glassbox_running_sequences", "glassbox_generation_tokens_total",
        "glassbox_time_to_first_token_seconds_bucket", "glassbox_e2e_request_latency_seconds",
        "glassbox_free_slots", 'glassbox_requests_total{model="tiny",status="ok"}',
    ]:  # fmt: skip
        assert name in text
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["engines"]["tiny"]["alive"] is True
    assert health["engines"]["tiny"]["free_slots"] == health["engines"]["tiny"]["max_seqs"]
    r = httpx.post(
        live.base_url + "/completions",
        content=b"x" * (2 << 20),
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.options(
        live.base_url + "/models",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in r.headers  # CORS off by default
