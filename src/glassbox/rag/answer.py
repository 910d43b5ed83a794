"""Retrieval-augmented answers: the question's best chunks go into the prompt, numbered,
within the context budget, and the answer cites them.

The prompt is a chat conversation (the model's own chat format)::

    system: Answer from the sources, citing them as [n]. If they lack it, say "I don't know."
            [1] (doc#0) ...chunk text...
            [2] (doc#3) ...
    user:   {question}

Chunks are added best first while the whole prompt, plus the tokens reserved for the
answer, fits the model's window; a chunk that does not fit whole is cut at a token
boundary (and marked "..."), and the rest are left out and reported. The assembled
prompt therefore never exceeds the window (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from glassbox.errors import GlassboxError
from glassbox.infer.generate import generate_text
from glassbox.infer.sampling import SamplingParams
from glassbox.model import Transformer
from glassbox.rag.index import Embedder, Hit, Index, Mode
from glassbox.tokenizer import Tokenizer

INSTRUCTION = 'Answer from the sources, citing them as [n]. If they lack it, say "I don\'t know."'


@dataclass
class RagPrompt:
    messages: list[dict[str, str]]
    ids: list[int]
    used: list[Hit]  # chunks in the prompt, in citation order ([1] first)
    cut: list[Hit] = field(default_factory=list)  # shortened to fit
    dropped: list[Hit] = field(default_factory=list)  # left out for lack of room


@dataclass
class RagAnswer:
    text: str
    prompt: RagPrompt
    finish_reason: str

    def citations(self) -> list[str]:
        """Ids of the chunks the answer cites (by their [n] markers)."""
        return [h.chunk.id for n, h in enumerate(self.prompt.used, 1) if f"[{n}]" in self.text]


def rag_messages(question: str, sources: list[str]) -> list[dict[str, str]]:
    """The RAG prompt: the instruction and numbered sources in the system turn, the
    question from the user. ``sources`` are "(chunk id) text" strings."""
    system = INSTRUCTION + "".join(f"\n[{n}] {s}" for n, s in enumerate(sources, 1))
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def assemble_prompt(
    tokenizer: Tokenizer, question: str, hits: list[Hit], window: int, reserve: int
) -> RagPrompt:
    """The chat prompt with as many of ``hits`` as fit in ``window - reserve`` tokens."""
    budget = window - reserve
    bare = tokenizer.encode_chat(rag_messages(question, []))
    if len(bare) > budget:
        raise GlassboxError(
            f"The question alone takes {len(bare)} tokens, but the window is {window} with "
            f"{reserve} reserved for the answer; shorten the question or lower --max-tokens."
        )
    sources: list[str] = []
    prompt = RagPrompt(rag_messages(question, []), bare, [])
    for i, hit in enumerate(hits):
        text = f"({hit.chunk.id}) {hit.chunk.text}"
        ids = tokenizer.encode_chat(rag_messages(question, [*sources, text]))
        if len(ids) > budget:  # cut this chunk to the room left, then stop
            room = budget - len(prompt.ids) - 8  # the marker, the "..." and a token of slack
            chunk_ids = tokenizer.encode(text)
            while room > 0:
                short = tokenizer.decode(chunk_ids[:room]).rstrip("\ufffd") + "..."
                ids = tokenizer.encode_chat(rag_messages(question, [*sources, short]))
                if len(ids) <= budget:
                    sources.append(short)
                    prompt = RagPrompt(
                        rag_messages(question, sources), ids, [*prompt.used, hit], [hit]
                    )
                    break
                room -= max(1, len(ids) - budget)
            prompt.dropped = [h for h in hits[i:] if h not in prompt.used]
            return prompt
        sources.append(text)
        prompt = RagPrompt(rag_messages(question, sources), ids, [*prompt.used, hit])
    return prompt


def answer(
    model: Transformer,
    tokenizer: Tokenizer,
    index: Index,
    question: str,
    k: int = 5,
    mode: Mode = "hybrid",
    max_tokens: int = 64,
    params: SamplingParams | None = None,
    embedder: Embedder | None = None,
    on_text=None,
) -> RagAnswer:
    """Retrieve ``k`` chunks, assemble the prompt within the window, and generate."""
    if not question.strip():
        raise GlassboxError("The question is empty.")
    window = model.cfg.context_length
    if not 1 <= max_tokens < window:
        raise GlassboxError(f"max_tokens={max_tokens} is out of range; use 1..{window - 1}.")
    hits = index.search(question, k, mode, embedder)
    prompt = assemble_prompt(tokenizer, question, hits, window, max_tokens)
    gen = generate_text(model, tokenizer, prompt.ids, max_tokens, params, on_text=on_text)
    return RagAnswer(gen.text.strip(), prompt, gen.finish_reason)
