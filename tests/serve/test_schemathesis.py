"""Property-based fuzzing of the live server from its own /openapi.json: no input may
produce a 5xx answer."""

from __future__ import annotations

from collections import Counter

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error


def test_no_server_errors_from_openapi(live, api_key):
    raw = httpx.get(live.url + "/openapi.json").json()
    # Pin "model" to the served name so requests get past the 404 and reach the engine.
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        raw["components"]["schemas"][name]["properties"]["model"] = {"enum": ["tiny"]}
    schema = schemathesis.openapi.from_dict(raw)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= {o.path for o in operations}
    headers = {"Authorization": f"Bearer {api_key}"}
    statuses: Counter = Counter()
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=40 if op.method.upper() == "POST" else 3,
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

        fuzz()
    # The fuzzer reached the engine (200s) and the validators (400s), not only 404s.
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert statuses[(path, 200)] > 0 and statuses[(path, 400)] > 0, statuses
