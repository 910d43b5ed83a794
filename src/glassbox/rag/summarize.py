"""Map-reduce summarizing for text longer than the context window.

    map:    split the text into chunks that fit the window with the instruction and the
            summary's tokens; summarize each chunk
    reduce: join the summaries; while they do not fit one prompt, chunk and summarize
            them again; finally summarize the joined summaries once

It always terminates: each summary has at most ``max_tokens`` tokens and every chunk
holds at least twice that, so a round shrinks the text; after ``max_rounds`` rounds, or
a round that did not shrink it, the text is cut to fit one prompt, which the result
reports (``truncated``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from glassbox.data.corpus import Document
from glassbox.errors import GlassboxError
from glassbox.infer.generate import generate_text
from glassbox.infer.sampling import SamplingParams
from glassbox.model import Transformer
from glassbox.rag.chunking import chunk_document
from glassbox.tokenizer import Tokenizer

INSTRUCTION = "Summarize the following text in a few sentences."


@dataclass
class Summary:
    text: str
    rounds: list[int] = field(default_factory=list)  # chunks summarized in each round
    truncated: bool = False  # the last round had to cut its input to fit


def _prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode_chat(
        [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": text}]
    )


def summarize(
    model: Transformer,
    tokenizer: Tokenizer,
    text: str,
    max_tokens: int = 64,
    params: SamplingParams | None = None,
    max_rounds: int = 8,
    on_round: Callable[[int, int], object] | None = None,
) -> Summary:
    """Summarize ``text`` of any length with ``model`` (see the module docstring).
    ``on_round(round, chunks)`` is called before each round's generations."""
    if not text.strip():
        raise GlassboxError("The text to summarize is empty.")
    window = model.cfg.context_length
    overhead = len(_prompt(tokenizer, ""))
    room = window - overhead - max_tokens  # tokens of text one prompt can hold
    if room < 2 * max_tokens:
        raise GlassboxError(
            f"The window ({window} tokens) leaves {room} tokens of text per prompt after the "
            f"instruction ({overhead}) and the summary (max_tokens={max_tokens}); that must be at "
            f"least 2 x max_tokens for each round to shrink the text. Lower --max-tokens to "
            f"{max(1, (window - overhead) // 3)} or less."
        )
    result = Summary("")

    def one(part: str) -> str:
        ids = _prompt(tokenizer, part)
        return generate_text(model, tokenizer, ids, max_tokens, params).text.strip()

    for r in range(max_rounds):
        if len(tokenizer.encode(text)) <= room:
            break
        chunks = chunk_document(Document("text", text), tokenizer, size=room, overlap=0)
        if on_round:
            on_round(r + 1, len(chunks))
        result.rounds.append(len(chunks))
        new = "\n".join(one(c.text) for c in chunks)
        if len(tokenizer.encode(new)) >= len(tokenizer.encode(text)):
            break  # no progress (cannot happen with room >= 2 x max_tokens, but be safe)
        text = new
    ids = tokenizer.encode(text)
    if len(ids) > room:
        text, result.truncated = tokenizer.decode(ids[:room]).rstrip("\ufffd"), True
    if on_round:
        on_round(len(result.rounds) + 1, 1)
    result.rounds.append(1)
    result.text = one(text)
    return result
