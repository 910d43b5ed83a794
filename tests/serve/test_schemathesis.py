"""Property-based fuzzing of the live server from its own /openapi.json: no input may
produce a 5xx answer, streaming or not."""

from __future__ import annotations

import copy
import time
from collections import Counter

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

GENERATION = ("CompletionRequest", "ChatCompletionRequest")


def fuzz_schema(raw: dict, stream: bool | None):
    """The app's schema with ``model`` pinned to the served name (so requests reach the
    engine, not the 404) and, if given, ``stream`` pinned too."""
    raw = copy.deepcopy(raw)
    for name in GENERATION:
        props = raw["components"]["schemas"][name]["properties"]
        props["model"] = {"enum": ["tiny"]}
        if stream is not None:
            props["stream"] = {"enum": [stream]}
            raw["components"]["schemas"][name].setdefault("required", []).append("stream")
    return schemathesis.openapi.from_dict(raw)


def run_fuzz(live, api_key, schema, examples: int, statuses: Counter, kinds: Counter) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    for result in schema.get_all_operations():
        op = result.ok()
        post = op.method.upper() == "POST"

        @given(case=op.as_strategy())
        @settings(
            max_examples=examples if post else 3,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case):
            response = case.call_and_validate(
                base_url=live.url, headers=headers, checks=[not_a_server_error], timeout=30
            )
            statuses[(case.path, response.status_code)] += 1
            kind = (response.headers.get("content-type") or [""])[0].split(";")[0]
            kinds[(case.path, kind)] += 1

        fuzz()


def test_no_server_errors_from_openapi(live, api_key):
    raw = httpx.get(live.url + "/openapi.json").json()
    statuses: Counter = Counter()
    kinds: Counter = Counter()
    any_stream = fuzz_schema(raw, None)
    paths = {r.ok().path for r in any_stream.get_all_operations()}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= paths
    run_fuzz(live, api_key, any_stream, 80, statuses, kinds)
    run_fuzz(live, api_key, fuzz_schema(raw, True), 40, statuses, kinds)
    # The fuzzer reached the engine (200s, JSON and SSE) and the validators (400s).
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert statuses[(path, 200)] > 0 and statuses[(path, 400)] > 0, statuses
        assert kinds[(path, "text/event-stream")] > 0, kinds
    # Nothing leaked: every slot comes back. A stream the fuzzer stopped reading is
    # aborted by the engine thread a moment after the client hangs up, so allow it that
    # moment (a leaked slot never comes back, however long one waits).
    eng = live.app.state.models["tiny"].engine
    deadline = time.monotonic() + 15
    while (eng.num_running or eng.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert eng.num_running == 0 and eng.queue_depth == 0
