"""The chat format, in one place: messages -> token ids and the assistant loss mask.

The server, the terminal chat and training stages turn conversations into tokens here
(:func:`encode_conversation` gives the assistant-only loss mask fine-tuning needs). A message is
``{"role": "system" | "user" | "assistant", "content": str}``.

Two kinds of tokenizer (see :class:`glassbox.tokenizer.Tokenizer`):

- **ours** (a glassbox-trained tokenizer) uses the built-in format::

      <|endoftext|><|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n
      <|assistant|>\\n{content}<|end|>\\n ...

  and a generation prompt ``<|assistant|>\\n``. Role markers are token ids chosen from
  the role, never parsed out of the content, so a user typing ``<|user|>`` sends plain
  text. :data:`CHAT_TEMPLATE` is the same format as Jinja, for export; the tests check
  that transformers renders it to the same ids.
- **foreign** (an imported model's tokenizer) renders through the model's own Jinja
  ``chat_template`` exactly as transformers does, and the rendered text is encoded
  whole, so our ids equal transformers' ``apply_chat_template`` ids. The assistant mask
  comes from rendering prefixes of the conversation: the tokens that rendering up to
  and including an assistant message adds to rendering up to it (with the generation
  prompt) are that message. A template whose earlier turns change when later ones are
  added cannot give a mask and raises :class:`GlassboxError`.

The loss mask is 1 over each assistant message's content tokens and its end-of-turn
token, and 0 elsewhere (system and user turns, role headers, whatever a template writes
after the end-of-turn token). Where BPE merges a header's last character with the start
of the content into one token (ours: content starting with two or more blank
characters), that token counts as content: it cannot be split.

**Tool calling** (OpenAI-style ``tools``, assistant ``tool_calls``, ``role: "tool"``
messages) adds no special tokens, so every existing checkpoint can read it. Ours follow
the Hermes/Qwen2.5 convention, flattened onto the three roles before encoding
(:func:`flatten_tools`):

- the tool definitions go into the system turn (appended to the first system message,
  or a system turn of their own) as compact JSON lines between ``<tools>`` tags under a
  short instruction (:data:`TOOLS_INTRO`);
- an assistant call is text in the assistant turn:
  ``<tool_call>\n{"name":...,"arguments":{...}}\n</tool_call>`` (parallel calls one
  after another, separated by ``\n``), so the loss mask learns calls like any reply;
- tool results are a turn with the user role marker holding
  ``<tool_response>\n...\n</tool_response>`` (consecutive tool messages grouped into
  one turn, separated by ``\n``).

JSON is compact (``,`` and ``:`` with no spaces), the form the call grammar
(:mod:`glassbox.infer.structured`, kind ``tool_calls``) generates, so a model sees its
own calls in history exactly as it wrote them. :data:`CHAT_TEMPLATE` renders the same
text from transformers' ``apply_chat_template(messages, tools=...)``. Foreign templates
receive ``tools`` and the messages unchanged (transformers' convention).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from glassbox.errors import GlassboxError
from glassbox.tokenizer import ASSISTANT, END, EOT, ROLE_TOKENS

if TYPE_CHECKING:
    from glassbox.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
Message = Mapping[str, Any]


class ChatTokens(NamedTuple):
    """A conversation as token ids plus the loss mask (1 = assistant output to learn)."""

    ids: list[int]
    loss_mask: list[int]


# ---------------------------------------------------------------------------------------
# The built-in format: one definition, as Python and as Jinja
# ---------------------------------------------------------------------------------------

HEADER_END = "\n"  # after the role marker, before the content
AFTER_END = "\n"  # after <|end|>, before the next turn
GENERATION_PROMPT = ASSISTANT + HEADER_END


def _jinja_str(text: str) -> str:
    """A Jinja string literal for ``text`` (Jinja unescapes like Python)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to help with the request. The "
    "functions, one JSON object per line:\n<tools>\n"
)
TOOLS_OUTRO = (
    "</tools>\n\nTo call a function, write its name and arguments as a JSON object "
    'within <tool_call></tool_call> tags:\n<tool_call>\n{"name":<function-name>,'
    '"arguments":<args-json-object>}\n</tool_call>'
)
CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"
CALL_SEP = "\n"  # between parallel calls, and between grouped tool responses


def compact_json(value: Any) -> str:
    """JSON as the chat format writes it: no spaces, non-ASCII kept (Jinja's
    ``tojson(separators=(',', ':'))`` in transformers' sandbox writes the same)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tool definitions as they appear in the system turn."""
    return TOOLS_INTRO + "".join(compact_json(t) + "\n" for t in tools) + TOOLS_OUTRO


def format_tool_call(name: str, arguments: str | Mapping[str, Any]) -> str:
    """One call as the assistant writes it; ``arguments`` as a JSON string (OpenAI's
    form, written verbatim) or an object."""
    args = arguments if isinstance(arguments, str) else compact_json(arguments)
    return f'{CALL_OPEN}{{"name":{compact_json(name)},"arguments":{args}}}{CALL_CLOSE}'


def format_tool_response(content: str) -> str:
    """One tool result as it appears in the (user-role) tool turn."""
    return RESPONSE_OPEN + content + RESPONSE_CLOSE


_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


class ParsedCall(NamedTuple):
    """A call found in generated text: its name and arguments (a compact JSON string)."""

    name: str
    arguments: str


def parse_tool_calls(
    text: str, names: Collection[str] | None = None
) -> tuple[str, list[ParsedCall]]:
    """Split generated text into (content, calls): each complete ``<tool_call>`` block
    whose body is ``{"name": str, "arguments": object}`` (the name one of ``names``,
    when given) becomes a call, anything else stays content (an unfinished or malformed
    block included). With calls, the content is the leftover text stripped ("" when
    nothing is left)."""
    calls: list[ParsedCall] = []
    kept: list[str] = []
    at = 0
    for m in _CALL_RE.finditer(text):
        call = _parse_call_body(m.group(1))
        if call is None or (names is not None and call.name not in names):
            continue
        kept.append(text[at : m.start()])
        at = m.end()
        calls.append(call)
    if not calls:
        return text, []
    kept.append(text[at:])
    return "".join(kept).strip(), calls


def _parse_call_body(body: str) -> ParsedCall | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or set(value) != {"name", "arguments"}:
        return None
    name, args = value["name"], value["arguments"]
    if not isinstance(name, str) or not isinstance(args, dict):
        return None
    return ParsedCall(name, compact_json(args))


def flatten_tools(
    messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, str]]:
    """Tool definitions, calls and results as plain system/user/assistant turns (see the
    module docstring); a conversation without them comes back as it was."""
    out: list[dict[str, str]] = []
    rest = list(messages)
    if tools:
        head = ""
        if rest and rest[0]["role"] == "system":
            head = rest.pop(0)["content"] + "\n\n"
        out.append({"role": "system", "content": head + tools_block(tools)})
    previous = None
    for m in rest:
        if m["role"] == "tool":
            piece = format_tool_response(m["content"])
            if previous == "tool":
                out[-1]["content"] += CALL_SEP + piece
            else:
                out.append({"role": "user", "content": piece})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [format_tool_call(**c["function"]) for c in m["tool_calls"]]
            parts = ([m["content"]] if m["content"] else []) + calls
            out.append({"role": "assistant", "content": CALL_SEP.join(parts)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
        previous = m["role"]
    return out


def _built_in_jinja() -> str:
    j = _jinja_str
    branches = "".join(
        f"{{% {'if' if i == 0 else 'elif'} message['role'] == '{role}' %}}{{{{ {j(marker)} }}}}"
        for i, (role, marker) in enumerate(ROLE_TOKENS.items())
    )
    unknown = "{{ raise_exception('Unknown role: ' + message['role']) }}"
    compact = "tojson(separators=(',', ':'))"
    system_head = (
        "{% if tools %}"
        f"{{{{ {j(ROLE_TOKENS['system'] + HEADER_END)} }}}}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] + '\n\n' }}{% endif %}"
        f"{{{{ {j(TOOLS_INTRO)} }}}}"
        f"{{% for tool in tools %}}{{{{ tool|{compact} + '\n' }}}}{{% endfor %}}"
        f"{{{{ {j(TOOLS_OUTRO + END + AFTER_END)} }}}}"
        "{% endif %}"
    )
    tool_turn = (
        "{% if loop.first or loop.previtem['role'] != 'tool' %}"
        f"{{{{ {j(ROLE_TOKENS['user'] + HEADER_END)} }}}}"
        f"{{% else %}}{{{{ {j(CALL_SEP)} }}}}{{% endif %}}"
        f"{{{{ {j(RESPONSE_OPEN)} + message['content'] + {j(RESPONSE_CLOSE)} }}}}"
        "{% if loop.last or loop.nextitem['role'] != 'tool' %}"
        f"{{{{ {j(END + AFTER_END)} }}}}{{% endif %}}"
    )
    call_head, call_mid = CALL_OPEN + '{"name":', ',"arguments":'
    calls = (
        f"{{% if message['content'] %}}{{{{ message['content'] + {j(CALL_SEP)} }}}}{{% endif %}}"
        "{% for call in message['tool_calls'] %}"
        "{% if call['function'] is defined %}{% set fn = call['function'] %}"
        "{% else %}{% set fn = call %}{% endif %}"
        f"{{% if not loop.first %}}{{{{ {j(CALL_SEP)} }}}}{{% endif %}}"
        f"{{{{ {j(call_head)} + fn['name']|tojson + {j(call_mid)} }}}}"
        "{% if fn['arguments'] is string %}{{ fn['arguments'] }}"
        f"{{% else %}}{{{{ fn['arguments']|{compact} }}}}{{% endif %}}"
        f"{{{{ {j('}' + CALL_CLOSE)} }}}}"
        "{% endfor %}"
    )
    turn = (
        f"{branches}{{% else %}}{unknown}{{% endif %}}{{{{ {j(HEADER_END)} }}}}"
        "{% if message['role'] == 'assistant' and message['tool_calls'] is defined "
        f"and message['tool_calls'] %}}{calls}"
        "{% else %}{{ message['content'] }}{% endif %}"
        f"{{{{ {j(END + AFTER_END)} }}}}"
    )
    return (
        f"{{{{ {j(EOT)} }}}}{system_head}"
        "{% for message in messages %}"
        "{% if loop.first and tools and message['role'] == 'system' %}"
        f"{{% elif message['role'] == 'tool' %}}{tool_turn}"
        f"{{% else %}}{turn}{{% endif %}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {j(GENERATION_PROMPT)} }}}}{{% endif %}}"
    )


# The built-in format as a Jinja chat template (written into exported tokenizer_config.json).
CHAT_TEMPLATE = _built_in_jinja()


def _built_in_text(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    turns = "".join(
        ROLE_TOKENS[m["role"]] + HEADER_END + m["content"] + END + AFTER_END for m in messages
    )
    return EOT + turns + (GENERATION_PROMPT if add_generation_prompt else "")


def _built_in_ids(
    tok: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool
) -> ChatTokens:
    ids, mask = [tok.eot_id], [0]
    for m in messages:
        learn = int(m["role"] == "assistant")
        ids.append(tok.token_to_id(ROLE_TOKENS[m["role"]]))
        mask.append(0)
        # Header end + content lie between two special tokens; encode them as one text, as
        # transformers does with the rendered template, so exported ids equal ours.
        body, offsets = tok.encode_with_offsets(HEADER_END + m["content"])
        ids += body
        mask += [learn if end > len(HEADER_END) else 0 for _, end in offsets]
        ids.append(tok.end_id)
        mask.append(learn)
        sep = tok.encode(AFTER_END)
        ids += sep
        mask += [0] * len(sep)
    if add_generation_prompt:
        ids += [tok.token_to_id(ASSISTANT), *tok.encode(HEADER_END)]
        mask += [0] * (len(ids) - len(mask))
    return ChatTokens(ids, mask)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def validate_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Plain copies of ``messages``; mistakes raise GlassboxError.

    Each is ``{"role", "content"}``; an assistant message may carry ``tool_calls``
    (content may then be None/empty) and a tool message a ``tool_call_id``."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise GlassboxError(
            "messages must be a list of {'role', 'content'} dicts, got "
            f"{type(messages).__name__}."
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise GlassboxError(
                f"messages[{i}] is a {type(m).__name__}; each message must be a dict with "
                "'role' and 'content'."
            )
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise GlassboxError(f"messages[{i}].role={role!r} is not one of {list(ROLES)}.")
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls and content is None:
            content = ""
        if not isinstance(content, str):
            raise GlassboxError(
                f"messages[{i}].content must be a string, got {type(content).__name__}; "
                "send the message text as 'content'."
            )
        msg: dict[str, Any] = {"role": role, "content": content}
        if calls:
            msg["tool_calls"] = [_validate_call(c, f"messages[{i}].tool_calls[{k}]")
                                 for k, c in enumerate(calls)]  # fmt: skip
        if role == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = str(m["tool_call_id"])
        out.append(msg)
    return out


def _validate_call(call: Any, where: str) -> dict[str, Any]:
    """An OpenAI tool call ``{"id", "type", "function": {"name", "arguments"}}`` (or
    transformers' flat ``{"name", "arguments"}``), normalized to the OpenAI shape."""
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise GlassboxError(
            f"{where} must be {{'type': 'function', 'function': {{'name': str, "
            "'arguments': str}}."
        )
    args = fn.get("arguments", {})
    if not isinstance(args, (str, Mapping)):
        raise GlassboxError(f"{where}.function.arguments must be a JSON string or an object.")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _plain(tok: Tokenizer, messages: Sequence[Message], tools) -> list[dict[str, Any]]:
    msgs = validate_messages(messages)
    return msgs if tok.is_foreign else flatten_tools(msgs, tools)


def render_text(
    tok: Tokenizer,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The conversation as text (what a Jinja chat template would render)."""
    msgs = _plain(tok, messages, tools)
    if tok.is_foreign:
        return render_jinja(
            _template_of(tok), msgs, add_generation_prompt, tok.template_tokens, tools
        )
    return _built_in_text(msgs, add_generation_prompt)


def encode_prompt(
    tok: Tokenizer,
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids for generation: the conversation, then the assistant header, so the
    model continues as the assistant and stops at an id in ``tok.stop_ids``."""
    msgs = _plain(tok, messages, tools)
    if tok.is_foreign:
        return _foreign_ids(tok, msgs, True, tools)
    return _built_in_ids(tok, msgs, add_generation_prompt=True).ids


def encode_conversation(
    tok: Tokenizer,
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> ChatTokens:
    """Token ids of the whole conversation and its loss mask for fine-tuning: the mask
    is 1 exactly over assistant content (tool calls included) and end-of-turn tokens."""
    msgs = _plain(tok, messages, tools)
    if tok.is_foreign:
        return _foreign_conversation(tok, msgs, tools)
    return _built_in_ids(tok, msgs, add_generation_prompt=False)


# ---------------------------------------------------------------------------------------
# Foreign tokenizers: the model's own Jinja template
# ---------------------------------------------------------------------------------------


def _template_of(tok: Tokenizer) -> str:
    if not tok.chat_template:
        raise GlassboxError(
            "This tokenizer has no chat template (a base model?); add 'chat_template' to "
            "its tokenizer_config.json, or use plain-text completion instead of chat."
        )
    return tok.chat_template


@lru_cache(maxsize=16)
def _compile(template: str):
    """Compile a chat template in the sandbox transformers uses, with its helpers."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant marker):
        render the body; we find assistant spans by prefixes instead."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Like transformers: no HTML escaping, unlike Jinja's own tojson.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise GlassboxError(f"The chat template does not compile: {e}") from e


def render_jinja(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Render a Jinja chat template as transformers' ``apply_chat_template`` does, with
    ``special_tokens`` (bos_token, eos_token, ...) as template variables."""
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=[dict(t) for t in tools] if tools else None,
            documents=None,
            **dict(special_tokens or {}),
        )
    except jinja2.TemplateError as e:
        raise GlassboxError(f"The chat template refused the conversation: {e}") from e


def _foreign_ids(
    tok: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool, tools=None
) -> list[int]:
    template = _template_of(tok)
    text = render_jinja(template, messages, add_generation_prompt, tok.template_tokens, tools)
    if not _contents_with_special_text(tok, messages):
        return tok.encode(text, allow_special=True)  # transformers' ids exactly
    return _encode_content_as_text(tok, template, messages, add_generation_prompt, tools)


def _contents_with_special_text(tok: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    specials = tok.special_tokens()
    return [i for i, m in enumerate(messages) if any(s in m["content"] for s in specials)]


def _encode_content_as_text(
    tok: Tokenizer,
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools=None,
) -> list[int]:
    """Some content holds special-token text: render with placeholders, then encode the
    template's text with special tokens and each content as plain text, so content never
    becomes a role marker (transformers would parse it as one)."""
    marks = [f"\x00glassbox-content-{i}\x00" for i in range(len(messages))]
    placeholders = [m | {"content": mark} for m, mark in zip(messages, marks, strict=True)]
    text = render_jinja(template, placeholders, add_generation_prompt, tok.template_tokens, tools)
    pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")", text)
    if pieces[1::2] != marks:
        bad = _contents_with_special_text(tok, messages)[0]
        raise GlassboxError(
            f"messages[{bad}].content contains special-token text, and this chat template "
            "does not write each message's content once and verbatim, so it cannot be kept "
            "as plain text; remove the special-token text from the message."
        )
    ids: list[int] = []
    for piece in pieces:
        if piece in marks:
            ids += tok.encode(messages[marks.index(piece)]["content"])
        elif piece:
            ids += tok.encode(piece, allow_special=True)
    return ids


def _foreign_conversation(tok: Tokenizer, messages: list[dict[str, Any]], tools=None) -> ChatTokens:
    ids = _foreign_ids(tok, messages, False, tools)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _foreign_ids(tok, messages[:i], True, tools)
        upto = _foreign_ids(tok, messages[: i + 1], False, tools)
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise GlassboxError(
                f"The chat template is not prefix-consistent at messages[{i}]: rendering the "
                "conversation up to that message does not start with the rendering of the "
                "turns before it (or is not the start of the whole conversation), so the "
                "assistant loss mask cannot be computed. Use a template whose earlier turns "
                "render the same whatever follows them."
            )
        span = upto[len(before) :]
        # Keep the end-of-turn token, drop what the template writes after it (e.g. "\n").
        ends = [j for j, t in enumerate(span) if t == tok.end_id]
        stop = len(before) + (ends[-1] + 1 if ends else len(span))
        mask[len(before) : stop] = [1] * (stop - len(before))
    return ChatTokens(ids, mask)


def find_end_of_turn(tok: Tokenizer) -> int | None:
    """The special token a foreign template writes right after assistant content
    (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...); None when it writes none or the
    template cannot render a plain user/assistant exchange."""
    if not tok.chat_template:
        return None
    probe = "glassbox probe reply"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    try:
        text = render_jinja(tok.chat_template, msgs, False, tok.template_tokens)
    except GlassboxError:
        return None
    at = text.rfind(probe)
    if at < 0:
        return None
    tail = tok.encode(text[at + len(probe) :], allow_special=True)
    return next((t for t in tail if t in tok.special_ids), None)
