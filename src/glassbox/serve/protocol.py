"""OpenAI-compatible request bodies and the translation into engine requests.

Pydantic checks types here; ranges are checked once, by ``SamplingParams.validate`` and
``Engine.prepare``, so the messages name the parameter and its valid range everywhere.
Parameters beyond OpenAI's follow vLLM's names: top_k, min_p, repetition_penalty,
truncate_prompt_tokens, guided_json, guided_regex, guided_choice.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from glassbox.errors import GlassboxError
from glassbox.infer.engine import GenerationRequest
from glassbox.infer.sampling import SamplingParams
from glassbox.infer.structured import Constraint


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

    def sampling_params(self) -> SamplingParams:
        bias: dict[int, float] = {}
        for k, v in (self.logit_bias or {}).items():
            try:
                bias[int(k)] = float(v)
            except ValueError:
                raise GlassboxError(
                    f"logit_bias key {k!r} is not a token id; use integer token ids."
                ) from None
        if self.seed is not None and not 0 <= self.seed < 2**63 - 64:
            raise GlassboxError(f"seed={self.seed} is out of range; use a value in [0, 2**63).")
        return SamplingParams(
            temperature=self.temperature, top_k=0 if self.top_k == -1 else self.top_k,
            top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=bias, seed=self.seed,
        )  # fmt: skip

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def constraint(self) -> Constraint | None:
        """The structured-output constraint, if any (at most one may be given)."""
        found: list[Constraint] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(Constraint("json_object"))
        elif rf is not None and rf.type == "json_schema":
            spec = rf.json_schema or {}
            schema = spec.get("schema")
            if not isinstance(schema, dict):
                raise GlassboxError(
                    "response_format.json_schema.schema must be a JSON Schema object."
                )
            found.append(Constraint("json_schema", schema))
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise GlassboxError(f"guided_json is not valid JSON: {e}") from e
            found.append(Constraint("json_schema", schema))
        if self.guided_regex is not None:
            found.append(Constraint("regex", self.guided_regex))
        if self.guided_choice is not None:
            found.append(Constraint("choice", list(self.guided_choice)))
        if len(found) > 1:
            raise GlassboxError(
                "Give at most one of response_format (json), guided_json, guided_regex, "
                "guided_choice."
            )
        return found[0] if found else None

    def engine_request(
        self, prompt: list[int], stop_ids: frozenset[int], logprobs: int | None
    ) -> GenerationRequest:
        return GenerationRequest(
            prompt=prompt, params=self.sampling_params(), max_tokens=self.max_tokens, n=self.n,
            stop=self.stop_list(), stop_token_ids=stop_ids, logprobs=logprobs,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
        )  # fmt: skip


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text, a list of texts, token ids, or lists of token ids."
    )
    logprobs: int | None = Field(None, description="Also return the top-N alternatives (0-20).")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text":
                raise GlassboxError(
                    f"Message content of type {part.type!r} is not supported; send text."
                )
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None

    def chat_messages(self) -> list[dict[str, str]]:
        if not self.messages:
            raise GlassboxError("messages is empty; send at least one message.")
        # "developer" is OpenAI's newer name for the system role.
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]
