"""RAG prompts fit the window; map-reduce summaries terminate on any length."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glassbox.config import ModelConfig
from glassbox.errors import GlassboxError
from glassbox.infer.sampling import SamplingParams
from glassbox.model import Transformer
from glassbox.rag.answer import answer, assemble_prompt
from glassbox.rag.chunking import Chunk
from glassbox.rag.index import Hit, Index
from glassbox.rag.summarize import summarize


def _hits(texts):
    return [Hit(Chunk(f"d{i}", 0, 0, 1, t), 1.0, i) for i, t in enumerate(texts)]


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 400), min_size=1, max_size=6),
       window=st.integers(80, 400), reserve=st.integers(1, 40))  # fmt: skip
def test_prompt_never_exceeds_the_window(tokenizer, sizes, window, reserve):
    hits = _hits(["lighthouse keeper " * (n // 2 + 1) for n in sizes])
    bare = assemble_prompt(tokenizer, "Who keeps the key?", [], 10_000, 1).ids
    if len(bare) > window - reserve:
        with pytest.raises(GlassboxError, match="for the answer"):
            assemble_prompt(tokenizer, "Who keeps the key?", hits, window, reserve)
        return
    p = assemble_prompt(tokenizer, "Who keeps the key?", hits, window, reserve)
    assert len(p.ids) <= window - reserve
    assert p.ids == tokenizer.encode_chat(p.messages)
    assert len(p.used) + len(p.dropped) == len(hits)
    assert set(p.cut) <= set(p.used)
    assert [h.rank for h in p.used] == list(range(len(p.used)))  # best first, in order


def test_question_too_long_for_the_window_is_a_clear_error(tokenizer):
    with pytest.raises(GlassboxError, match="window is 40"):
        assemble_prompt(tokenizer, "why " * 100, [], window=40, reserve=8)


def test_answer_uses_the_index_and_reports_citations(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("test", vocab_size=tokenizer.vocab_size, context_length=256)
    tiny_model = Transformer(cfg).eval()
    idx = Index([Chunk("a", 0, 0, 1, "The lighthouse key is kept by Vask."),
                 Chunk("b", 0, 0, 1, "Unrelated text about cats.")])  # fmt: skip
    res = answer(tiny_model, tokenizer, idx, "lighthouse key", k=2, mode="bm25", max_tokens=4,
                 params=SamplingParams(temperature=0.0))  # fmt: skip
    assert res.prompt.used and res.prompt.used[0].chunk.doc == "a"
    assert len(res.prompt.ids) + 4 <= tiny_model.cfg.context_length
    assert all(c in ("a#0", "b#0") for c in res.citations())


@pytest.mark.parametrize("chars", [1, 300, 3000])
def test_map_reduce_terminates_on_any_length(tokenizer, tiny_model, chars):
    text = ("The quick brown fox jumps over the lazy dog. " * 200)[:chars]
    rounds = []
    res = summarize(tiny_model, tokenizer, text, max_tokens=6,
                    params=SamplingParams(temperature=1.0, seed=0),
                    on_round=lambda r, n: rounds.append(n))  # fmt: skip
    assert res.rounds == rounds and res.rounds[-1] == 1
    assert len(res.rounds) <= 9
    if chars > 1000:
        assert res.rounds[0] > 1  # it had to map first


def test_summarize_refuses_a_window_too_small_and_empty_text(tokenizer, tiny_model):
    with pytest.raises(GlassboxError, match="Lower --max-tokens"):
        summarize(tiny_model, tokenizer, "text", max_tokens=30)
    with pytest.raises(GlassboxError, match="empty"):
        summarize(tiny_model, tokenizer, "  ", max_tokens=4)
