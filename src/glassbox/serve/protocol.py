"""OpenAI-compatible request bodies and the translation into engine requests.

Pydantic checks types here; the value checks raise :class:`APIError` with the
parameter's name at the point where it is known (sampling ranges come from
``SamplingParams.validate``, checked one field at a time so the field is named; the
server's caps from serve/limits.py).
Parameters beyond OpenAI's follow vLLM's names: top_k, min_p, repetition_penalty,
truncate_prompt_tokens, guided_json, guided_regex, guided_choice.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from glassbox.errors import GlassboxError
from glassbox.infer.engine import GenerationRequest
from glassbox.infer.sampling import SamplingParams
from glassbox.infer.structured import Constraint
from glassbox.serve.errors import bad_request
from glassbox.serve.limits import (
    ServeLimits,
    check_constraint_size,
    check_count,
    check_range,
    check_stop,
)
from glassbox.serve.tools import ToolPlan, check_history, plan_tools

# Sampling fields whose ranges SamplingParams.validate knows, by their HTTP names.
_RANGED = (
    "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty",
)  # fmt: skip


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, description="New tokens; omitted = rest of context.")
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # extras (vLLM names)
    top_k: int = Field(0, description="0 or -1 = off.")
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    truncate_prompt_tokens: int | None = Field(None, description="Keep the last N prompt tokens.")
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    def sampling_params(self, vocab_size: int) -> SamplingParams:
        """Validated sampling parameters; a bad value is a 400 naming its field."""
        for name in _RANGED:
            _validate_field(name, SamplingParams(**{name: getattr(self, name)}), vocab_size)
        top_k = 0 if self.top_k == -1 else self.top_k
        _validate_field("top_k", SamplingParams(top_k=top_k), vocab_size)
        bias: dict[int, float] = {}
        for k, v in (self.logit_bias or {}).items():
            try:
                bias[int(k)] = float(v)
            except ValueError:
                raise bad_request(
                    f"logit_bias key {k!r} is not a token id; use integer token ids.",
                    "logit_bias",
                ) from None
        _validate_field("logit_bias", SamplingParams(logit_bias=bias), vocab_size)
        if self.seed is not None and not 0 <= self.seed < 2**63 - 64:
            raise bad_request(
                f"seed={self.seed} is out of range; use a value in [0, 2**63).", "seed"
            )
        return SamplingParams(
            temperature=self.temperature, top_k=top_k, top_p=self.top_p, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=bias, seed=self.seed,
        )  # fmt: skip

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def check_limits(self, limits: ServeLimits, prompts: int) -> None:
        """The server's caps on work per request (``prompts``: how many prompts)."""
        check_range("n", self.n, 1, limits.max_n, "max_n")
        if prompts * self.n > limits.max_sequences:
            raise bad_request(
                f"n={self.n} for {prompts} prompts makes {prompts * self.n} sequences; this "
                f"server allows at most {limits.max_sequences} per request (the operator "
                "sets it with --max-sequences). Lower n or send fewer prompts.",
                "n",
            )
        check_count("logit_bias", self.logit_bias, "entries", limits.max_logit_bias,
                    "max_logit_bias")  # fmt: skip
        check_stop(self.stop_list(), limits)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad_request(f"max_tokens={self.max_tokens} must be >= 1.", "max_tokens")
        t = self.truncate_prompt_tokens
        if t is not None and t < 1:
            raise bad_request(f"truncate_prompt_tokens={t} must be >= 1.", "truncate_prompt_tokens")

    def constraint(self, limits: ServeLimits) -> tuple[str, Constraint] | None:
        """The structured-output constraint and the parameter that gave it, if any (at
        most one may be given); its size is checked against the server's caps."""
        found: list[tuple[str, Constraint]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", Constraint("json_object")))
        elif rf is not None and rf.type == "json_schema":
            spec = rf.json_schema or {}
            schema = spec.get("schema")
            if not isinstance(schema, dict):
                raise bad_request(
                    "response_format.json_schema.schema must be a JSON Schema object.",
                    "response_format",
                )
            found.append(("response_format", Constraint("json_schema", schema)))
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise bad_request(f"guided_json is not valid JSON: {e}", "guided_json") from e
            found.append(("guided_json", Constraint("json_schema", schema)))
        if self.guided_regex is not None:
            found.append(("guided_regex", Constraint("regex", self.guided_regex)))
        if self.guided_choice is not None:
            found.append(("guided_choice", Constraint("choice", list(self.guided_choice))))
        if len(found) > 1:
            raise bad_request(
                "Give at most one of response_format (json), guided_json, guided_regex, "
                "guided_choice.",
                found[1][0],
            )
        if not found:
            return None
        param, c = found[0]
        check_constraint_size(param, c.value, limits)
        return param, c

    def engine_request(
        self,
        prompt: list[int],
        params: SamplingParams,
        stop_ids: frozenset[int],
        logprobs: int | None,
    ) -> GenerationRequest:
        return GenerationRequest(
            prompt=prompt, params=params, max_tokens=self.max_tokens, n=self.n,
            stop=self.stop_list(), stop_token_ids=stop_ids, logprobs=logprobs,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
        )  # fmt: skip


def _validate_field(name: str, params: SamplingParams, vocab_size: int) -> None:
    try:
        params.validate(vocab_size)
    except GlassboxError as e:
        raise bad_request(str(e), name) from None


class CompletionRequest(_SamplingFields):
    """The body of POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text, a list of texts, token ids, or lists of token ids."
    )
    logprobs: int | None = Field(
        None, description="Also return the top-N alternatives (0-5; --max-logprobs)."
    )
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    """One part of a message's content: ``{"type": "text", "text": ...}`` or, for a
    vision-language model, ``{"type": "image_url", "image_url": {"url": "data:..."}}``."""

    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    text: str = ""
    image_url: Any = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(BaseModel):
    """An assistant's earlier tool call, sent back in the history."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One chat message; content is text or a list of parts (text, and images for a
    vision-language model). Assistant messages may carry ``tool_calls``; ``role: "tool"``
    messages answer one by ``tool_call_id``."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def as_dict(self, index: int) -> dict[str, Any]:
        """The message for glassbox.conversation ("developer" is OpenAI's newer name for
        the system role). Text parts are joined; a message with images keeps its parts
        (glassbox.vision.api reads them)."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self._content(index),
        }
        if self.role == "assistant" and self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
        return out

    def _content(self, index: int) -> str | list[dict[str, Any]]:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for k, part in enumerate(self.content):
            if part.type not in ("text", "image_url"):
                raise bad_request(
                    f"messages[{index}].content[{k}] has type {part.type!r}; this server "
                    "reads 'text' parts, and 'image_url' parts for vision-language models.",
                    f"messages[{index}].content[{k}].type",
                )
        if any(p.type == "image_url" for p in self.content):
            return [p.model_dump(include={"type", p.type}) for p in self.content]
        return "".join(p.text for p in self.content)


def content_chars(message: dict[str, Any]) -> int:
    """Characters of a message's text (image parts are counted by their own caps)."""
    content = message["content"]
    if isinstance(content, str):
        return len(content)
    return sum(len(p.get("text") or "") for p in content)


def image_parts(messages: list[dict[str, Any]]) -> list[str]:
    """The ``messages[i].content[k]`` path of every image part, in order."""
    return [
        f"messages[{i}].content[{k}]"
        for i, m in enumerate(messages) if isinstance(m["content"], list)
        for k, p in enumerate(m["content"]) if p["type"] == "image_url"
    ]  # fmt: skip


class ChatCompletionRequest(_SamplingFields):
    """The body of POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    _tool_plan: ToolPlan | None = PrivateAttr(default=None)

    def chat_messages(self, limits: ServeLimits) -> list[dict[str, Any]]:
        """The messages for the chat template, within the server's caps."""
        if not self.messages:
            raise bad_request("messages is empty; send at least one message.", "messages")
        check_count("messages", self.messages, "messages", limits.max_messages, "max_messages")
        messages = [m.as_dict(i) for i, m in enumerate(self.messages)]
        for i, m in enumerate(messages):
            if "tool_calls" in m:
                check_constraint_size(f"messages[{i}].tool_calls", m["tool_calls"], limits)
        check_history(messages)
        return messages

    def plan_tools(self, limits: ServeLimits, foreign: bool) -> ToolPlan:
        """Validate ``tools``/``tool_choice``/``parallel_tool_calls`` (400s naming them)."""
        self._tool_plan = plan_tools(
            self.tools, self.tool_choice, self.parallel_tool_calls, limits, foreign
        )
        return self._tool_plan

    @property
    def tool_plan(self) -> ToolPlan | None:
        return self._tool_plan

    def constraint(self, limits: ServeLimits) -> tuple[str, Constraint] | None:
        """With tools to call, the tool-call grammar; a response_format JSON schema then
        shapes the text branch of ``auto`` (``required``/named replies are calls only)."""
        plan = self._tool_plan
        if plan is None or plan.constraint(None) is None:
            return super().constraint(limits)
        for name in ("guided_json", "guided_regex", "guided_choice"):
            if getattr(self, name) is not None:
                raise bad_request(
                    f"{name} cannot be combined with tools; use response_format for the "
                    "shape of a text reply, or tool_choice='none'.",
                    name,
                )
        found = super().constraint(limits)
        text_schema = None
        if found is not None:  # response_format
            c = found[1]
            text_schema = {"type": "object"} if c.kind == "json_object" else c.value
        return "tools", plan.constraint(text_schema)
