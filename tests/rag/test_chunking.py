"""Chunks: exact token spans and overlaps, document and paragraph boundaries, no split
UTF-8 characters."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glassbox.data.corpus import Document
from glassbox.errors import GlassboxError
from glassbox.rag.chunking import chunk_document, chunk_documents


def _check(doc, chunks, tok, size, overlap):
    ids, offsets = tok.encode_with_offsets(doc.text)
    assert chunks[0].start == 0 and chunks[-1].end == len(ids)
    for c in chunks:
        assert 0 < c.end - c.start <= size
        assert c.text == doc.text[offsets[c.start][0] : offsets[c.end - 1][1]]
        assert "\ufffd" not in c.text
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.start < b.start <= a.end  # moves forward, nothing skipped
        assert a.end - b.start <= overlap  # overlap exact or less (snapped to a character)


def test_sizes_and_overlaps_are_exact_in_tokens(tokenizer, small_text):
    doc = Document("d", small_text[:20000].encode("ascii", "ignore").decode())
    chunks = chunk_document(doc, tokenizer, size=50, overlap=10)
    _check(doc, chunks, tokenizer, 50, 10)
    # ASCII text: every cut is a character boundary, so overlaps are exactly 10 tokens
    assert all(a.end - b.start == 10 for a, b in zip(chunks, chunks[1:-1], strict=False))


def test_prefers_paragraph_ends(tokenizer):
    para = "This is one sentence of the paragraph. " * 3
    doc = Document("d", "\n\n".join([para.strip()] * 6))
    chunks = chunk_document(doc, tokenizer, size=80, overlap=0)
    assert len(chunks) > 1
    # every cut at a paragraph end, though a cut inside a paragraph would fill more
    assert all(c.text.rstrip().endswith("paragraph.") for c in chunks)
    assert all(c.text.startswith("This") for c in chunks)


@settings(max_examples=40, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from([*"aé✓日本 \n.", "😀"]), min_size=1, max_size=300),
    size=st.integers(2, 40),
    overlap=st.integers(0, 10),
)
def test_never_splits_a_character(tokenizer, text, size, overlap):
    if overlap >= size:
        overlap = size - 1
    doc = Document("d", text)
    try:
        chunks = chunk_document(doc, tokenizer, size=size, overlap=overlap)
    except GlassboxError as e:  # a character longer than the chunk: a clear error
        assert "raise the chunk size" in str(e)
        return
    if chunks:
        _check(doc, chunks, tokenizer, size, overlap)


def test_documents_are_never_mixed_and_bad_sizes_are_errors(tokenizer):
    docs = [Document("a", "alpha " * 40), Document("b", "beta " * 40), Document("c", "")]
    chunks = chunk_documents(docs, tokenizer, size=16, overlap=4)
    assert {c.doc for c in chunks} == {"a", "b"}
    assert all(("alpha" in c.text) != ("beta" in c.text) for c in chunks)
    with pytest.raises(GlassboxError, match="overlap=16"):
        chunk_documents(docs, tokenizer, size=16, overlap=16)
    with pytest.raises(GlassboxError, match="size=0"):
        chunk_documents(docs, tokenizer, size=0, overlap=0)
