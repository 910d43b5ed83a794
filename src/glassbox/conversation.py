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
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from glassbox.errors import GlassboxError
from glassbox.tokenizer import ASSISTANT, END, EOT, ROLE_TOKENS

if TYPE_CHECKING:
    from glassbox.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]


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


def _built_in_jinja() -> str:
    branches = "".join(
        f"{{% {'if' if i == 0 else 'elif'} message['role'] == '{role}' %}}"
        f"{{{{ {_jinja_str(marker)} }}}}"
        for i, (role, marker) in enumerate(ROLE_TOKENS.items())
    )
    unknown = "{{ raise_exception('Unknown role: ' + message['role']) }}"
    return (
        f"{{{{ {_jinja_str(EOT)} }}}}"
        "{% for message in messages %}"
        f"{branches}{{% else %}}{unknown}{{% endif %}}"
        f"{{{{ {_jinja_str(HEADER_END)} + message['content'] + {_jinja_str(END + AFTER_END)} }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {_jinja_str(GENERATION_PROMPT)} }}}}{{% endif %}}"
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


def validate_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` copies of ``messages``; mistakes raise GlassboxError."""
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
        if not isinstance(content, str):
            raise GlassboxError(
                f"messages[{i}].content must be a string, got {type(content).__name__}; "
                "send the message text as 'content'."
            )
        out.append({"role": role, "content": content})
    return out


def render_text(
    tok: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False
) -> str:
    """The conversation as text (what a Jinja chat template would render)."""
    msgs = validate_messages(messages)
    if tok.is_foreign:
        return render_jinja(_template_of(tok), msgs, add_generation_prompt, tok.template_tokens)
    return _built_in_text(msgs, add_generation_prompt)


def encode_prompt(tok: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids for generation: the conversation, then the assistant header, so the
    model continues as the assistant and stops at an id in ``tok.stop_ids``."""
    msgs = validate_messages(messages)
    if tok.is_foreign:
        return _foreign_ids(tok, msgs, add_generation_prompt=True)
    return _built_in_ids(tok, msgs, add_generation_prompt=True).ids


def encode_conversation(tok: Tokenizer, messages: Sequence[Message]) -> ChatTokens:
    """Token ids of the whole conversation and its loss mask for fine-tuning: the mask
    is 1 exactly over assistant content and end-of-turn tokens."""
    msgs = validate_messages(messages)
    if tok.is_foreign:
        return _foreign_conversation(tok, msgs)
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
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str] | None = None,
) -> str:
    """Render a Jinja chat template as transformers' ``apply_chat_template`` does, with
    ``special_tokens`` (bos_token, eos_token, ...) as template variables."""
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **dict(special_tokens or {}),
        )
    except jinja2.TemplateError as e:
        raise GlassboxError(f"The chat template refused the conversation: {e}") from e


def _foreign_ids(
    tok: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    template = _template_of(tok)
    text = render_jinja(template, messages, add_generation_prompt, tok.template_tokens)
    if not _contents_with_special_text(tok, messages):
        return tok.encode(text, allow_special=True)  # transformers' ids exactly
    return _encode_content_as_text(tok, template, messages, add_generation_prompt)


def _contents_with_special_text(tok: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    specials = tok.special_tokens()
    return [i for i, m in enumerate(messages) if any(s in m["content"] for s in specials)]


def _encode_content_as_text(
    tok: Tokenizer, template: str, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    """Some content holds special-token text: render with placeholders, then encode the
    template's text with special tokens and each content as plain text, so content never
    becomes a role marker (transformers would parse it as one)."""
    marks = [f"\x00glassbox-content-{i}\x00" for i in range(len(messages))]
    placeholders = [m | {"content": mark} for m, mark in zip(messages, marks, strict=True)]
    text = render_jinja(template, placeholders, add_generation_prompt, tok.template_tokens)
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


def _foreign_conversation(tok: Tokenizer, messages: list[dict[str, str]]) -> ChatTokens:
    ids = _foreign_ids(tok, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _foreign_ids(tok, messages[:i], add_generation_prompt=True)
        upto = _foreign_ids(tok, messages[: i + 1], add_generation_prompt=False)
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
