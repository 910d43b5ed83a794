"""Caps on the work one request may ask for, checked before anything reaches the engine.

Each cap has a `glassbox serve` flag (see docs/serving.md, "Security and limits"); a
request over a cap gets a 400 naming the parameter, the value, the limit and the flag.
The engine checks only what it must (token ids, the context window); how much work an
HTTP client may ask for is the server's business, so it lives here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from glassbox.serve.errors import APIError, bad_request


@dataclass(frozen=True)
class ServeLimits:
    """Per-request caps and deadlines. Defaults suit one small model on a laptop."""

    max_n: int = 16  # choices per prompt
    max_prompts: int = 16  # entries in a batched /v1/completions prompt
    max_sequences: int = 64  # prompts x n in one request
    max_logprobs: int = 5  # /v1/completions logprobs (OpenAI's limit)
    max_top_logprobs: int = 20  # /v1/chat/completions top_logprobs (OpenAI's limit)
    max_messages: int = 1024  # chat messages per request
    max_prompt_chars: int = 200_000  # characters of prompt text, before tokenization
    max_logit_bias: int = 300  # logit_bias entries (OpenAI's limit)
    max_stop: int = 8  # stop strings
    max_stop_chars: int = 256  # characters in one stop string
    max_schema_bytes: int = 32_768  # a guided_json/regex/choice/response_format, as JSON
    max_schema_depth: int = 64  # nesting of a JSON schema
    max_tools: int = 128  # tools in one chat request (OpenAI's limit)
    max_images: int = 4  # image_url parts in one request (vision-language models)
    max_image_bytes: int = 512 * 1024  # one decoded image (also under --max-body-bytes)
    max_image_pixels: int = 2048 * 2048  # one image's width x height, read from its header
    grammar_timeout: float = 10.0  # seconds to compile one grammar
    request_timeout: float | None = 600.0  # seconds from arrival to the last token
    max_queue_wait: float | None = 120.0  # seconds from arrival to the first token

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            floor = 0 if name == "max_logprobs" else 1e-9  # logprobs=0: the chosen token only
            if value is not None and value < floor:
                raise ValueError(f"{name}={value} must be {'>= 0' if floor == 0 else '> 0'}.")


# The flag that sets each cap, quoted in the error so an operator knows which knob it is.
FLAGS = {name: "--" + name.replace("_", "-") for name in ServeLimits.__dataclass_fields__}


def over(param: str, what: str, value: int, limit: int, cap: str) -> APIError:
    """A 400 for a value over a cap."""
    return bad_request(
        f"{param} has {value} {what}; this server allows at most {limit} "
        f"(the operator sets it with {FLAGS[cap]}). Send fewer.",
        param,
    )


def check_range(param: str, value: int, lo: int, hi: int, cap: str | None = None) -> None:
    """400 unless lo <= value <= hi."""
    if not lo <= value <= hi:
        hint = f" (the operator sets the maximum with {FLAGS[cap]})" if cap else ""
        raise bad_request(
            f"{param}={value} is out of range; use a value in [{lo}, {hi}]{hint}.", param
        )


def check_count(param: str, items: Any, what: str, limit: int, cap: str) -> None:
    """400 when ``items`` has more than ``limit`` entries."""
    if items is not None and len(items) > limit:
        raise over(param, what, len(items), limit, cap)


def check_stop(stop: list[str], limits: ServeLimits) -> None:
    """400 for too many, empty or too long stop strings."""
    check_count("stop", stop, "strings", limits.max_stop, "max_stop")
    for s in stop:
        if not s:
            raise bad_request("stop strings must not be empty.", "stop")
        if len(s) > limits.max_stop_chars:
            raise over("stop", "characters in one string", len(s), limits.max_stop_chars,
                       "max_stop_chars")  # fmt: skip


def json_depth(value: Any) -> int:
    """Nesting depth of plain JSON data, without recursion (a hostile value may be deep)."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v)
    return depth


def check_constraint_size(param: str, value: Any, limits: ServeLimits) -> None:
    """Depth first (so serializing it cannot recurse too deeply), then size."""
    depth = json_depth(value)
    if depth > limits.max_schema_depth:
        raise over(param, "levels of nesting", depth, limits.max_schema_depth, "max_schema_depth")
    size = len(json.dumps(value))
    if size > limits.max_schema_bytes:
        raise over(param, "bytes (as JSON)", size, limits.max_schema_bytes, "max_schema_bytes")
