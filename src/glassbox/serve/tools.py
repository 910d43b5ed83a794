"""Tool calling on /v1/chat/completions: the request's ``tools``, ``tool_choice`` and
``parallel_tool_calls`` checked and turned into a :class:`ToolPlan` (what to render, which
grammar constrains the reply, which names to parse back), and the reply's text turned
into OpenAI ``tool_calls``, whole (:func:`message_with_calls`) or as stream deltas
(:class:`ToolCallStream`).

The format is glassbox.conversation's (Hermes/Qwen2.5 style ``<tool_call>`` blocks); the
grammar is infer/structured.py's ``tool_calls`` constraint. See docs/serving.md, "Tool
calling".
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from glassbox.conversation import CALL_CLOSE, CALL_OPEN, ParsedCall, parse_tool_calls
from glassbox.infer.structured import Constraint, tool_calls_constraint
from glassbox.serve.errors import bad_request
from glassbox.serve.limits import ServeLimits, check_constraint_size, check_count

# OpenAI's rule for function names.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tool fields ask for, validated.

    ``tools``: the definitions rendered into the prompt (OpenAI shape, only the known
    keys); ``choice``: ``none``/``auto``/``required``/``named``; ``named``: the forced
    function; ``parallel``: more than one call allowed; ``constrained``: the reply is
    decoded under the tool-call grammar (our chat format only)."""

    tools: list[dict[str, Any]]
    choice: str
    named: str | None
    parallel: bool
    constrained: bool

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.tools)

    @property
    def parses(self) -> bool:
        """Whether the reply's text is parsed into tool_calls."""
        return bool(self.tools) and self.choice != "none"

    def constraint(self, text_schema: dict[str, Any] | None) -> Constraint | None:
        """The grammar for the reply (None: unconstrained)."""
        if not self.constrained or self.choice == "none":
            return None
        chosen = [t["function"] for t in self.tools]
        if self.named is not None:
            chosen = [f for f in chosen if f["name"] == self.named]
        specs = [{"name": f["name"], "parameters": f.get("parameters")} for f in chosen]
        if self.choice == "auto":
            return tool_calls_constraint(specs, "auto", self.parallel, text_schema)
        return tool_calls_constraint(specs, "required", self.parallel and self.named is None)


def check_tools(raw: list[Any] | None, limits: ServeLimits) -> list[dict[str, Any]]:
    """The ``tools`` list, each ``{"type": "function", "function": {"name",
    "description"?, "parameters"?}}``; a 400 naming ``tools[i]...`` for a bad entry."""
    if not raw:
        return []
    check_count("tools", raw, "tools", limits.max_tools, "max_tools")
    check_constraint_size("tools", raw, limits)
    out, seen = [], set()
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_request(
                f"{where} must be {{'type': 'function', 'function': {{...}}}}; only function "
                "tools are supported.",
                f"{where}.type",
            )
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(
                f"{where}.function must be an object with a name.", f"{where}.function"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request(
                f"{where}.function.name={name!r} is not a valid function name; use 1-64 "
                "letters, digits, '_' or '-'.",
                f"{where}.function.name",
            )
        if name in seen:
            raise bad_request(
                f"{where}.function.name={name!r} is defined twice; give each tool a distinct name.",
                f"{where}.function.name",
            )
        seen.add(name)
        clean: dict[str, Any] = {"name": name}
        desc = fn.get("description")
        if desc is not None:
            if not isinstance(desc, str):
                raise bad_request(f"{where}.function.description must be a string.",
                                  f"{where}.function.description")  # fmt: skip
            clean["description"] = desc
        params = fn.get("parameters")
        if params is not None:
            check_parameters(params, f"{where}.function.parameters")
            clean["parameters"] = params
        out.append({"type": "function", "function": clean})
    return out


def check_parameters(params: Any, param: str) -> None:
    """400 unless ``params`` is a valid JSON schema for an object."""
    import jsonschema

    if not isinstance(params, dict):
        raise bad_request(f"{param} must be a JSON Schema object.", param)
    if params.get("type", "object") != "object":
        raise bad_request(
            f"{param} has type {params.get('type')!r}; a function's parameters must be a "
            "JSON Schema with type 'object'.",
            param,
        )
    try:
        jsonschema.validators.validator_for(params).check_schema(params)
    except jsonschema.SchemaError as e:
        raise bad_request(f"{param} is not a valid JSON Schema: {e.message}", param) from None
    except Exception as e:  # e.g. a $schema that is not a string: still the client's schema
        raise bad_request(
            f"{param} is not a valid JSON Schema ({type(e).__name__}).", param
        ) from None


def check_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(mode, named function) from ``tool_choice``; 400 naming ``tool_choice``."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(
                f"tool_choice={choice!r} is not one of 'none', 'auto', 'required', or "
                "{'type': 'function', 'function': {'name': ...}}.",
                "tool_choice",
            )
        if choice != "none" and not tools:
            raise bad_request(
                f"tool_choice={choice!r} needs tools; send the functions in 'tools'.",
                "tool_choice",
            )
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad_request(
            "tool_choice must be 'none', 'auto', 'required', or "
            "{'type': 'function', 'function': {'name': ...}}.",
            "tool_choice",
        )
    names = [t["function"]["name"] for t in tools]
    if name not in names:
        raise bad_request(
            f"tool_choice names function {name!r}, which is not in tools "
            f"({names or 'none given'}); name one of the tools.",
            "tool_choice",
        )
    return "named", name


def check_history(messages: list[dict[str, Any]]) -> None:
    """Every tool message answers an earlier assistant call (by ``tool_call_id``)."""
    ids: set[str] = set()
    for i, m in enumerate(messages):
        for call in m.get("tool_calls") or []:
            if "id" in call:
                ids.add(call["id"])
        if m["role"] == "tool" and m.get("tool_call_id") not in ids:
            got = m.get("tool_call_id")
            raise bad_request(
                f"messages[{i}] is a tool message with tool_call_id={got!r}, which matches no "
                "earlier assistant tool call; answer a call the assistant made (its "
                "tool_calls[].id).",
                f"messages[{i}].tool_call_id",
            )


def plan_tools(
    raw_tools: list[Any] | None,
    tool_choice: Any,
    parallel: bool | None,
    limits: ServeLimits,
    foreign: bool,
) -> ToolPlan:
    """Validate the tool fields of a request into a :class:`ToolPlan`.

    Imported models render tools through their own template; their call format is
    theirs, so a forced call (``required``/named) cannot be constrained: 400."""
    tools = check_tools(raw_tools, limits)
    choice, named = check_tool_choice(tool_choice, tools)
    if foreign and choice in ("required", "named"):
        raise bad_request(
            f"tool_choice={tool_choice!r} needs the tool-call grammar, which only models "
            "with glassbox's chat format have; this imported model uses its own template. "
            "Use tool_choice 'auto' (calls are parsed when the model writes <tool_call> "
            "blocks) or 'none'.",
            "tool_choice",
        )
    return ToolPlan(tools, choice, named, parallel is not False, not foreign and bool(tools))


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def call_object(call: ParsedCall, index: int | None = None) -> dict[str, Any]:
    """One OpenAI tool call (with ``index`` for a stream delta)."""
    obj: dict[str, Any] = {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    return obj if index is None else {"index": index, **obj}


def message_with_calls(text: str, names: frozenset[str]) -> tuple[dict[str, Any], bool]:
    """The assistant message for ``text`` and whether it holds tool calls."""
    content, calls = parse_tool_calls(text, names)
    if not calls:
        return {"role": "assistant", "content": text}, False
    msg = {
        "role": "assistant",
        "content": content or None,
        "tool_calls": [call_object(c) for c in calls],
    }
    return msg, True


class ToolCallStream:
    """Turns one choice's streamed text into OpenAI deltas: content as it comes, and each
    ``<tool_call>`` block as one tool-call delta when its closing tag arrives (the
    arguments whole). Text that may be the start of a tag is held back until it is not.
    The deltas reassemble into what :func:`message_with_calls` gives for the whole text.
    """

    def __init__(self, names: frozenset[str]):
        self.names = names
        self.buf = ""
        self.calls = 0
        self.held = ""  # text after a call: content only if something non-blank is left

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buf += text
        deltas: list[dict[str, Any]] = []
        while True:
            k = self.buf.find(CALL_OPEN)
            if k < 0:
                keep = _partial_tag(self.buf)
                self._content(self.buf[: len(self.buf) - keep], deltas)
                self.buf = self.buf[len(self.buf) - keep :]
                return deltas
            e = self.buf.find(CALL_CLOSE, k + len(CALL_OPEN))
            if e < 0:
                self._content(self.buf[:k], deltas)
                self.buf = self.buf[k:]
                return deltas
            block = self.buf[k : e + len(CALL_CLOSE)]
            _, parsed = parse_tool_calls(block, self.names)
            self._content(self.buf[:k], deltas)
            if parsed:
                deltas.append({"tool_calls": [call_object(parsed[0], self.calls)]})
                self.calls += 1
            else:
                self._content(block, deltas)
            self.buf = self.buf[e + len(CALL_CLOSE) :]

    def finish(self) -> list[dict[str, Any]]:
        """Deltas for what is left at the end (an unfinished block is content)."""
        deltas: list[dict[str, Any]] = []
        self._content(self.buf, deltas)
        self.buf = ""
        if self.calls and self.held.strip():
            deltas.append({"content": self.held.strip()})
        self.held = ""
        return deltas

    def _content(self, text: str, deltas: list[dict[str, Any]]) -> None:
        if not text:
            return
        if self.calls:
            self.held += text
        else:
            deltas.append({"content": text})


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of ``text`` that starts the call tag."""
    for n in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            return n
    return 0
