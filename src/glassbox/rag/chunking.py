"""Token-aware chunking: documents -> chunks of at most ``size`` tokens, ``overlap``
tokens shared between neighbours, never crossing a document and preferring to end at a
paragraph, then a line, a sentence, then a word boundary.

A chunk is a span ``[start, end)`` of its document's token ids, so sizes and overlaps are
exact in tokens; its text is the document's characters those tokens cover. A cut is only
made before a token that starts a new character, so no chunk splits a UTF-8 character
(byte-level BPE can spread one character over two tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from glassbox.data.corpus import Document
from glassbox.errors import GlassboxError
from glassbox.tokenizer import Tokenizer

# How good a cut is, by the whitespace around it: a blank line, a line end, a sentence
# end, any space, or inside a word.
_PARAGRAPH, _LINE, _SENTENCE, _WORD, _ANYWHERE = range(5)


@dataclass(frozen=True)
class Chunk:
    """``doc`` name, index of the chunk in the document, token span, and text."""

    doc: str
    index: int
    start: int  # first token (inclusive) in the document's ids
    end: int  # last token (exclusive)
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}#{self.index}"


def check_sizes(size: int, overlap: int) -> None:
    if size < 1:
        raise GlassboxError(f"chunk size={size} must be >= 1 token.")
    if not 0 <= overlap < size:
        raise GlassboxError(
            f"chunk overlap={overlap} is out of range; use 0..{size - 1} (less than the size)."
        )


def _break_rank(text: str, p: int) -> int:
    """How good a cut at character ``p`` is (lower is better)."""
    a, b = p, p
    while a > 0 and text[a - 1].isspace():
        a -= 1
    while b < len(text) and text[b].isspace():
        b += 1
    gap = text[a:b]
    if "\n\n" in gap:
        return _PARAGRAPH
    if "\n" in gap:
        return _LINE
    if gap and a > 0 and text[a - 1] in ".?!":
        return _SENTENCE
    return _WORD if gap else _ANYWHERE


def _cut_points(text: str, offsets: list[tuple[int, int]]) -> tuple[list[bool], list[int]]:
    """For each token index i (0..n): may a chunk start at i (token i starts a new
    character), and how good a cut before it is."""
    n = len(offsets)
    safe = [True] * (n + 1)
    rank = [_PARAGRAPH] * (n + 1)
    for i in range(1, n):
        # a token that starts inside the previous token's characters continues a character
        safe[i] = offsets[i][0] >= offsets[i - 1][1]
        rank[i] = _break_rank(text, offsets[i][0])
    return safe, rank


def chunk_document(
    doc: Document, tokenizer: Tokenizer, size: int = 256, overlap: int = 32
) -> list[Chunk]:
    """Split one document into chunks (see the module docstring)."""
    check_sizes(size, overlap)
    ids, offsets = tokenizer.encode_with_offsets(doc.text)
    n = len(ids)
    if n == 0:
        return []
    safe, rank = _cut_points(doc.text, offsets)
    chunks: list[Chunk] = []
    start = 0
    while True:
        limit = min(start + size, n)
        if limit == n:
            end = n
        else:
            # the best-ranked safe cut in the second half of the window, latest on ties;
            # no safe cut at all (one huge character run) -> the latest safe one
            lo = start + max(1, size // 2)
            cands = [i for i in range(lo, limit + 1) if safe[i]] or [
                i for i in range(start + 1, limit + 1) if safe[i]
            ]
            if not cands:
                raise GlassboxError(
                    f"{doc.name}: no character boundary within {size} tokens of token {start}; "
                    "raise the chunk size."
                )
            end = min(cands, key=lambda i: (rank[i], -i))
        text = doc.text[offsets[start][0] : offsets[end - 1][1]]
        chunks.append(Chunk(doc.name, len(chunks), start, end, text))
        if end == n:
            return chunks
        nxt = max(end - overlap, start + 1)  # always move forward
        while not safe[nxt]:  # snap forward to a character start: overlap <= requested
            nxt += 1
        start = nxt


def chunk_documents(
    docs: list[Document], tokenizer: Tokenizer, size: int = 256, overlap: int = 32
) -> list[Chunk]:
    """Chunks of every document, in order."""
    check_sizes(size, overlap)
    return [c for d in docs for c in chunk_document(d, tokenizer, size, overlap)]
