"""Tool calling through the official `openai` client against a live server on an
untrained tiny model: the grammar makes every forced call valid, ``auto`` gives text or
valid calls, streams reassemble into the same calls, and bad tool input is a 400 naming
the parameter."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch

from glassbox import checkpoint
from glassbox.config import ModelConfig
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer

API_KEY = "test-key"  # the key the `live` fixture (conftest.py) serves with
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Lyon", "Porto", "Osaka"]},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999},
        "b": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "a + b.",
                                      "parameters": ADD}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MSG = [{"role": "user", "content": "What is the weather in Lyon, and what is 2 + 3?"}]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, small_text):
    """A tiny random model with room for tool definitions in its context (1024)."""
    texts = [small_text, json.dumps(TOOLS) * 4, "<tool_call>\n</tool_call>\n" * 10]
    tok = Tokenizer.train(texts, vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        "test", vocab_size=tok.vocab_size, context_length=1024, init_std=0.2
    )
    out = tmp_path_factory.mktemp("ckpt") / "tools"
    checkpoint.save_model_dir(out, Transformer(cfg).eval(), tok, "test")
    return out


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=API_KEY, max_retries=0)


def assert_valid_calls(calls, names=SCHEMAS) -> None:
    assert calls, "expected at least one tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def ask(client, **kw):
    args = dict(model="tiny", messages=MSG, tools=TOOLS, max_tokens=200, temperature=1.0)
    return client.chat.completions.create(**(args | kw))


@pytest.mark.parametrize("parallel", [True, False])
def test_required_always_returns_valid_calls(client, parallel):
    for seed in range(6):
        r = ask(client, tool_choice="required", seed=seed, parallel_tool_calls=parallel)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        assert_valid_calls(choice.message.tool_calls)
        if not parallel:
            assert len(choice.message.tool_calls) == 1


def test_named_tool_choice_calls_that_function_once(client):
    named = {"type": "function", "function": {"name": "add"}}
    for seed in range(6):
        r = ask(client, tool_choice=named, seed=seed)
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls"
        assert_valid_calls(calls, names={"add"})


def test_auto_returns_text_or_valid_calls(client):
    kinds = set()
    for seed in range(8):
        r = ask(client, tool_choice="auto", seed=seed, n=2)
        for choice in r.choices:
            msg = choice.message
            if msg.tool_calls:
                kinds.add("calls")
                assert_valid_calls(msg.tool_calls)
                assert choice.finish_reason == "tool_calls"
            else:
                kinds.add("text")
                assert "<tool_call>" not in msg.content
                assert choice.finish_reason in ("stop", "length")
    assert kinds  # which kinds a random model picks is up to its logits


def accepts(grammar, tok, text: str) -> bool:
    m = grammar.matcher()
    return all(m.accept(t) for t in tok.encode(text)) and m._m.is_accepting()


def test_auto_grammar_admits_text_or_valid_calls_only(tiny_ckpt):
    """What a random model rarely writes, checked on the grammar itself."""
    from glassbox.infer.structured import GrammarCompiler, tool_calls_constraint

    _, tok, _ = checkpoint.load_model_dir(tiny_ckpt)
    compiler = GrammarCompiler(tok, tok.vocab_size, [tok.end_id])
    specs = [{"name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]  # fmt: skip
    auto = compiler.compile(tool_calls_constraint(specs, "auto", parallel=True))
    required = compiler.compile(tool_calls_constraint(specs, "required", parallel=False))
    call = '<tool_call>\n{"name":"add","arguments":{"a":2,"b":3}}\n</tool_call>'
    weather = (
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Osaka","unit":"c"}}\n</tool_call>'
    )
    assert accepts(auto, tok, "It is sunny.") and accepts(auto, tok, call)
    assert accepts(auto, tok, call + "\n" + weather)
    assert not accepts(auto, tok, "Sure: " + call)  # text never writes the tag
    assert not accepts(auto, tok, call.replace("add", "sub"))  # unknown function
    assert not accepts(auto, tok, call.replace('"b":3', '"b":"3"'))  # schema violated
    assert not accepts(auto, tok, call.replace('"a":2', '"a": 2'))  # compact JSON only
    assert accepts(required, tok, call) and not accepts(required, tok, "It is sunny.")
    assert not accepts(required, tok, call + "\n" + weather)  # one call when not parallel


def reassemble(chunks) -> tuple[str | None, list[tuple[str, str]], str | None, set[str]]:
    """(content, [(name, arguments)], finish_reason, ids) from stream chunks."""
    content, calls, finish, ids = None, {}, None, set()
    for chunk in chunks:
        for choice in chunk.choices:
            d = choice.delta
            if d.content:
                content = (content or "") + d.content
            for tc in d.tool_calls or []:
                entry = calls.setdefault(tc.index, ["", ""])
                if tc.id:
                    ids.add(tc.id)
                if tc.function.name:
                    entry[0] += tc.function.name
                entry[1] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [tuple(calls[k]) for k in sorted(calls)], finish, ids


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_stream_deltas_reassemble_into_the_same_calls(client, choice):
    for seed in range(4):
        whole = ask(client, tool_choice=choice, seed=seed).choices[0]
        content, calls, finish, ids = reassemble(
            ask(client, tool_choice=choice, seed=seed, stream=True)
        )
        expected = [(c.function.name, c.function.arguments)
                    for c in whole.message.tool_calls or []]  # fmt: skip
        assert calls == expected
        assert len(ids) == len(calls)
        assert finish == whole.finish_reason
        assert (content or None) == (whole.message.content or None)


def test_round_trip_call_result_answer(client):
    first = ask(client, tool_choice={"type": "function", "function": {"name": "add"}}, seed=1)
    call = first.choices[0].message.tool_calls[0]
    history = MSG + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    r = client.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS, tool_choice="none", max_tokens=8, seed=1
    )
    assert r.choices[0].message.tool_calls is None
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens > first.usage.prompt_tokens


def test_tool_choice_none_renders_tools_but_adds_no_grammar(client):
    r = ask(client, tool_choice="none", seed=0, max_tokens=5)
    assert r.choices[0].message.tool_calls is None
    plain = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, seed=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens  # definitions in the prompt


BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "no-such-type"}}}


def tool(name="f", params=None):
    fn = {"name": name} | ({"parameters": params} if params is not None else {})
    return {"type": "function", "function": fn}


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [tool(params=BAD_SCHEMA)]}, "tools[0].function.parameters"),
        ({"tools": [tool(), tool("g", {"type": "array"})]}, "tools[1].function.parameters"),
        ({"tools": [tool(), tool()]}, "tools[1].function.name"),
        ({"tools": [tool("bad name!")]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [tool()] * 200}, "tools"),
        (
            {"tools": [tool(params={"type": "object", "$schema": 5})]},
            "tools[0].function.parameters",
        ),
        (
            {
                "tools": [
                    tool(params={"type": "object", "properties": {"a": {"$ref": "#/$defs/no"}}})
                ]
            },
            "tools",
        ),
        ({"tools": [tool()], "guided_regex": "a+"}, "guided_regex"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_parameter(live, extra, param):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 4, "tools": TOOLS} | extra
    r = httpx.post(live.base_url + "/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"]


def test_tool_choice_without_tools_and_unanswered_tool_messages_are_400s(live):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = live.base_url + "/chat/completions"
    r = httpx.post(url, headers=auth, json={"model": "tiny", "messages": MSG,
                                            "tool_choice": "required"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    orphan = MSG + [{"role": "tool", "tool_call_id": "call_x", "content": "5"}]
    r = httpx.post(url, headers=auth, json={"model": "tiny", "messages": orphan,
                                            "tools": TOOLS})  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[1].tool_call_id"
    assert "call_x" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "text",
    [
        "plain text with < and <tool and </tool_call>",
        '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>',
        '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>\n'
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Lyon","unit":"f"}}\n</tool_call>',
        '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>\n<tool_call>\n{"na',
        '<tool_call>\n{"name":"nope","arguments":{}}\n</tool_call>',
    ],
)
def test_tool_call_stream_matches_the_whole_parse_at_any_split(text):
    from glassbox.serve.tools import ToolCallStream, message_with_calls

    names = frozenset(SCHEMAS)
    msg, _ = message_with_calls(text, names)
    want = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])]
    for step in (1, 2, 5, len(text)):
        stream, deltas = ToolCallStream(names), []
        for i in range(0, len(text), step):
            deltas += stream.feed(text[i : i + step])
        deltas += stream.finish()
        content = "".join(d.get("content", "") for d in deltas) or None
        calls = [(c["function"]["name"], c["function"]["arguments"])
                 for d in deltas for c in d.get("tool_calls", [])]  # fmt: skip
        assert calls == want and content == msg["content"], (step, deltas)
