"""Incremental detokenization: the pieces always add up to decoding everything at once,
characters are never split, and the work per token does not grow with the length."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glassbox.infer.detokenize import IncrementalDetokenizer

MIXED = "héllo wörld, naïve café — 日本語のテキスト 🙂🚀 ok. Ünïcödé ∑∫√ end\n"


def stream(tok, ids: list[int]) -> list[str]:
    det = IncrementalDetokenizer(tok)
    pieces = [det.push(i) for i in ids]
    return [*pieces, det.flush()]


@given(ids=st.lists(st.integers(0, 399), max_size=60))
@settings(max_examples=200, deadline=None)
def test_pieces_concatenate_to_full_decode_for_random_ids(tokenizer, ids):
    ids = [i % tokenizer.vocab_size for i in ids]
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


@given(text=st.text(max_size=40))
@settings(max_examples=150, deadline=None)
def test_pieces_of_real_text_are_whole_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text
    if "\ufffd" not in text:  # a split UTF-8 character would show up as U+FFFD
        assert all("\ufffd" not in p for p in pieces)


def test_multibyte_characters_split_across_tokens(tokenizer):
    ids = tokenizer.encode(MIXED)
    assert len(ids) > len(MIXED.encode()) // 4  # byte-level tokens: characters are split
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == MIXED and all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # some tokens were held back until their character completed


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.ids_decoded = tok, 0

    def decode(self, ids):
        self.ids_decoded += len(ids)
        return self.tok.decode(ids)


@pytest.mark.parametrize("copies", [1, 20])
def test_work_per_token_does_not_grow_with_length(tokenizer, copies):
    ids = tokenizer.encode(MIXED * copies)
    counter = CountingTokenizer(tokenizer)
    det = IncrementalDetokenizer(counter)
    text = "".join(det.push(i) for i in ids) + det.flush()
    assert text == MIXED * copies
    assert counter.ids_decoded / len(ids) < 8  # a window of a few ids, not the history
    assert len(det.window) < 8
