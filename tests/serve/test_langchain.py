"""LangChain's ``ChatOpenAI`` pointed at a live server, as a new user would: bound tools,
``with_structured_output(method="function_calling")`` and streaming tool calls, on an
untrained tiny model (the tool-call grammar makes the calls valid)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from pydantic import BaseModel, Field

from glassbox import checkpoint
from glassbox.config import ModelConfig
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer

langchain_openai = pytest.importorskip("langchain_openai")
API_KEY = "test-key"  # the key the `live` fixture (conftest.py) serves with


class Weather(BaseModel):
    """Look up the weather in a city."""

    city: str = Field(max_length=12, description="The city.")
    unit: str = Field(pattern="^(c|f)$", description="c or f.")


class Sum(BaseModel):
    """Add two small numbers."""

    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, small_text):
    """A tiny random model with room for tool definitions in its context (1024)."""
    tok = Tokenizer.train([small_text, "<tool_call>\n</tool_call>"], vocab_size=400,
                          show_progress=False)  # fmt: skip
    torch.manual_seed(1)
    cfg = ModelConfig.from_name("test", vocab_size=tok.vocab_size, context_length=1024,
                                init_std=0.2)  # fmt: skip
    out = tmp_path_factory.mktemp("ckpt") / "lc"
    checkpoint.save_model_dir(out, Transformer(cfg).eval(), tok, "test")
    return out


def chat(live, **kw):
    return langchain_openai.ChatOpenAI(
        base_url=live.base_url, api_key=API_KEY, model="tiny", max_retries=0,
        max_tokens=160, **kw,
    )  # fmt: skip


def test_with_structured_output_function_calling_returns_a_validated_object(live):
    for seed in range(3):
        llm = chat(live, seed=seed, temperature=1.0)
        out = llm.with_structured_output(Sum, method="function_calling").invoke("2 + 3?")
        assert isinstance(out, Sum) and 0 <= out.a <= 99 and 0 <= out.b <= 99
        raw = llm.with_structured_output(Weather, method="function_calling", include_raw=True)
        result = raw.invoke("Weather in Lyon?")
        assert result["parsing_error"] is None and isinstance(result["parsed"], Weather)


def test_bind_tools_required_and_streamed_tool_calls(live):
    llm = chat(live, seed=3, temperature=1.0).bind_tools([Weather, Sum], tool_choice="required")
    msg = llm.invoke("What is the weather in Osaka?")
    assert msg.tool_calls and msg.response_metadata["finish_reason"] == "tool_calls"
    schemas = {"Weather": Weather.model_json_schema(), "Sum": Sum.model_json_schema()}
    for call in msg.tool_calls:
        jsonschema.validate(call["args"], schemas[call["name"]])
    # Streaming: LangChain merges the deltas into the same calls.
    merged = None
    for chunk in llm.stream("What is the weather in Osaka?"):
        merged = chunk if merged is None else merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [
        (c["name"], c["args"]) for c in msg.tool_calls
    ]


def test_agent_style_round_trip(live):
    """call -> ToolMessage -> answer, the loop every tool-using agent runs."""
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = chat(live, seed=4, temperature=1.0).bind_tools([Sum])
    forced = llm.bind(tool_choice={"type": "function", "function": {"name": "Sum"}})
    history = [HumanMessage("What is 2 + 3?")]
    ai = forced.invoke(history)
    call = ai.tool_calls[0]
    args = Sum(**call["args"])
    history += [ai, ToolMessage(json.dumps(args.a + args.b), tool_call_id=call["id"])]
    answer = chat(live, seed=4, max_completion_tokens=8).invoke(history)
    assert isinstance(answer.content, str) and not answer.tool_calls
