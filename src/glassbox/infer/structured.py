"""Structured output: grammar masks over the vocabulary, one matcher per sequence.

The grammar work is plumbing, so it comes from `llguidance` (see docs/serving.md for why
not xgrammar): it compiles JSON schemas, regexes and Lark grammars against our own
tokenizer and, at every decoding step, answers "which token ids may come next?" as a
bitmask. The engine turns that bitmask into -inf logits before sampling and feeds every
chosen token back to the matcher.

    spec (json_object | json_schema | regex | choice | tool_calls)
      --GrammarCompiler.compile--> Grammar (compiled once under explicit limits, cached)
      --Grammar.matcher()--> TokenMatcher (a deep copy per sequence: mask, accept, done)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import llguidance as llg
import numpy as np
import torch

from glassbox.errors import GlassboxError
from glassbox.tokenizer import Tokenizer

ConstraintKind = Literal["json_object", "json_schema", "regex", "choice", "tool_calls"]

# Compact JSON (no optional whitespace): a weak model cannot wander off into endless
# spaces and newlines, and outputs stay short.
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Constraint:
    """What the output must match: a JSON object, a JSON schema, a regex, one of a list
    of strings, or tool calls. ``value`` is the schema (dict), the regex, the list of
    choices, or for ``tool_calls`` a dict (see :func:`tool_calls_constraint`)."""

    kind: ConstraintKind
    value: Any = None

    def key(self) -> str:
        # Key order kept: a schema's property order is the order the output writes them.
        return json.dumps([self.kind, self.value])


def bitmask_words(vocab_size: int) -> int:
    """int32 words needed for one row of a token bitmask."""
    return (vocab_size + 31) // 32


def unpack_bitmask_np(bits: torch.Tensor, vocab_size: int) -> np.ndarray:
    """(B, W) int32 bitmask -> (B, V) numpy bool, True where the token is allowed.

    Bit j of word w is token 32w + j; on little-endian machines that is bit j % 8 of
    byte 4w + j // 8, so numpy's unpackbits does it in microseconds, on one thread.
    """
    words = bits.contiguous().numpy()
    if sys.byteorder != "little":  # pragma: no cover
        words = words.byteswap()
    allowed = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    return allowed[:, :vocab_size].view(np.bool_)  # (B, V)


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, W) int32 bitmask -> (B, V) bool tensor, True where the token is allowed."""
    return torch.from_numpy(np.ascontiguousarray(unpack_bitmask_np(bits, vocab_size)))


class TokenMatcher:
    """The grammar state of one sequence."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int):
        self._m = matcher
        self.vocab_size = vocab_size

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed-token bitmask for the next step into ``row`` ((W,) int32)."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def allowed(self) -> torch.Tensor:
        """(V,) bool mask of the tokens the grammar allows next."""
        row = torch.zeros(bitmask_words(self.vocab_size), dtype=torch.int32)
        self.fill_bitmask(row)
        return unpack_bitmask(row.view(1, -1), self.vocab_size)[0]

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False if the grammar rejects it."""
        return self._m.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and admits no more tokens (except end-of-sequence)."""
        return self._m.is_stopped()


# Explicit parser limits instead of llguidance's defaults, so that one hostile grammar
# costs bounded time and memory on the engine thread. The fuel figures are llguidance's
# own speed estimates: ~50k initial fuel per ms, ~14k step fuel per ms.
PARSER_LIMITS = dict(
    max_items_in_row=2_000,  # branching of one production row
    # ~2 ms of eager lexer building (the default is 10x): past it the lexer is built
    # lazily, so "(a{1000}){1000}" compiles in ~0.1 s instead of ~3.5 s.
    initial_lexer_fuel=100_000,
    step_lexer_fuel=200_000,  # ~15 ms of lexer work per token mask, at most
    step_max_items=50_000,  # Earley items per mask step
    max_lexer_states=50_000,  # ~100 MB of lexer states (the default allows 250k)
    max_grammar_size=200_000,  # symbols in the grammar's productions
    verbose_errors=False,  # errors reach HTTP clients: no parser internals
)


@dataclass(frozen=True)
class Grammar:
    """A grammar compiled for one tokenizer; hands out fresh matchers for new sequences.

    The grammar is compiled once, into ``_prototype`` (a matcher that never consumes a
    token); :meth:`matcher` deep-copies it, which costs microseconds instead of a
    recompile per sequence on the engine thread.
    """

    text: str  # llguidance's grammar (JSON)
    constraint: Constraint
    _prototype: llg.LLMatcher
    vocab_size: int

    def matcher(self) -> TokenMatcher:
        """A matcher at the start of the grammar, for one new sequence."""
        return TokenMatcher(self._prototype.deep_copy(), self.vocab_size)


class GrammarCompiler:
    """Compiles constraints against one tokenizer. Thread-safe; results are cached.

    Compilation can take long for a large schema; callers on an event loop should run
    :meth:`compile` in a worker thread (the server does, with a time limit).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        eos_ids: list[int],
        limits: dict[str, Any] | None = None,
    ):
        self.vocab_size = vocab_size
        # llguidance reads our tokenizer.json directly (the same BPE the model uses);
        # its vocabulary is padded to the model's so masks line up with the logits.
        self.ll_tokenizer = llg.LLTokenizer(
            tokenizer.to_json(), n_vocab=vocab_size, eos_token=eos_ids
        )
        self.limits = llg.LLParserLimits(**(PARSER_LIMITS if limits is None else limits))
        self._compile = lru_cache(maxsize=256)(self._compile_key)

    def compile(self, constraint: Constraint) -> Grammar:
        """Validate and compile ``constraint``; a bad schema/regex raises GlassboxError."""
        try:
            key = constraint.key()
        except (RecursionError, TypeError, ValueError) as e:
            raise GlassboxError(
                f"The {constraint.kind} constraint cannot be read ({type(e).__name__}); "
                "send plain JSON nested at most a few dozen levels deep."
            ) from None
        return self._compile(key)

    def _compile_key(self, key: str) -> Grammar:
        kind, value = json.loads(key)
        constraint = Constraint(kind, value)
        text = grammar_text(constraint)
        prototype = llg.LLMatcher(self.ll_tokenizer, text, log_level=0, limits=self.limits)
        if prototype.is_error():
            raise GlassboxError(f"Invalid {kind} constraint: {prototype.get_error()}")
        return Grammar(text, constraint, prototype, self.vocab_size)

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes one token stands for (special tokens: their marker text)."""
        return self.ll_tokenizer.decode_bytes([token])


def grammar_text(constraint: Constraint) -> str:
    """llguidance grammar for a constraint; raises GlassboxError for malformed values."""
    kind, value = constraint.kind, constraint.value
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if kind == "json_schema":
        if not isinstance(value, dict):
            raise GlassboxError("json_schema must be a JSON object (a JSON Schema).")
        try:
            return llg.LLMatcher.grammar_from_json_schema(value, defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise GlassboxError(f"Invalid json_schema: {e}") from e
        except RecursionError:
            raise GlassboxError("json_schema is nested too deeply; flatten it.") from None
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise GlassboxError("regex must be a non-empty string.")
        return llg.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise GlassboxError("choice must be a non-empty list of strings.")
        if any(c == "" for c in value):
            raise GlassboxError("choice strings must not be empty.")
        # Lark string literals take JSON-style escapes, so json.dumps quotes each choice.
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if kind == "tool_calls":
        return llg.LLMatcher.grammar_from_lark(tool_calls_lark(value))
    raise GlassboxError(
        f"Unknown constraint type {kind!r}; use json_object, json_schema, regex, choice or "
        "tool_calls."
    )


# ---------------------------------------------------------------------------------------
# Tool calls: <tool_call> blocks (glassbox.conversation's format), one Lark grammar
# ---------------------------------------------------------------------------------------

_NO_WHITESPACE = {"x-guidance": _JSON_OPTIONS}


def tool_calls_constraint(
    tools: list[dict[str, Any]],
    mode: Literal["required", "auto"],
    parallel: bool,
    text_schema: dict[str, Any] | None = None,
) -> Constraint:
    """The constraint for tool calling. ``tools``: ``[{"name", "parameters"}]`` (the
    functions the output may call; one entry for a named ``tool_choice``). ``required``:
    the output is calls only; ``auto``: plain text (without ``<tool_call>``; or JSON
    matching ``text_schema`` when given) or calls. ``parallel``: one or more calls,
    else exactly one."""
    value = {"tools": tools, "mode": mode, "parallel": parallel, "text_schema": text_schema}
    return Constraint("tool_calls", value)


def call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON schema of one call body ``{"name": name, "arguments": {...}}``; the
    parameters' ``$defs``/``definitions`` move to the top so ``#/$defs/..`` refs resolve.

    Objects that list ``properties`` but do not say ``additionalProperties`` generate
    only the listed ones (as llama.cpp's grammars do): JSON Schema would allow any extra
    key, and an untrained model wanders off into them until max_tokens cuts the call.
    What is generated still validates against the schema as given."""
    params = _closed(parameters) if parameters else {"type": "object"}
    hoisted = {k: params.pop(k) for k in ("$defs", "definitions") if k in params}
    params.pop("$schema", None)
    params.setdefault("type", "object")
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        **hoisted,
        **_NO_WHITESPACE,
    }


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else",
               "additionalProperties", "propertyNames", "unevaluatedProperties")  # fmt: skip
_SCHEMA_LISTS = ("prefixItems", "allOf", "anyOf", "oneOf", "items")


def _closed(schema: Any) -> Any:
    """A copy of ``schema`` with ``additionalProperties: false`` on every object schema
    that lists ``properties`` and leaves additional ones unsaid."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _closed(v) for k, v in out[key].items()}
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(x) for x in out[key]]
    if "properties" in out and not {"additionalProperties", "patternProperties"} & set(out):
        out["additionalProperties"] = False
    return out


def tool_calls_lark(value: Any) -> str:
    """The Lark grammar for a ``tool_calls`` constraint (see :func:`tool_calls_constraint`)."""
    from glassbox.conversation import CALL_CLOSE, CALL_OPEN, CALL_SEP

    if not isinstance(value, dict) or not value.get("tools"):
        raise GlassboxError("tool_calls needs a non-empty list of tools.")
    rules = []
    for i, tool in enumerate(value["tools"]):
        schema = call_schema(tool["name"], tool.get("parameters"))
        rules.append(f"tool_{i}: %json {json.dumps(schema)}")
    names = " | ".join(f"tool_{i}" for i in range(len(value["tools"])))
    calls = f"call ({json.dumps(CALL_SEP)} call)*" if value.get("parallel") else "call"
    lines = [
        f"calls: {calls}",
        f"call: {json.dumps(CALL_OPEN)} body {json.dumps(CALL_CLOSE)}",
        f"body: {names}",
        *rules,
    ]
    if value.get("mode") == "required":
        return "\n".join(["start: calls", *lines])
    text = value.get("text_schema")
    if text is not None:
        lines.append(f"text: %json {json.dumps({**text, **_NO_WHITESPACE})}")
    else:
        # Any non-empty text that never writes the call tag.
        open_tag = CALL_OPEN.strip()
        lines.append(f"text: TEXT\nTEXT: /(.|\\n)+/ & ~/(.|\\n)*{open_tag}(.|\\n)*/")
    return "\n".join(["start: text | calls", *lines])
