"""Retrieval: BM25 equals Lucene's formula, the planted chunk is found, files round-trip."""

import math

import numpy as np
import pytest
import torch

from glassbox.data.corpus import Document
from glassbox.data.world import make_world
from glassbox.errors import GlassboxError
from glassbox.rag.chunking import Chunk, chunk_documents
from glassbox.rag.index import Embedder, Index, bm25_tokens, build_index


def _chunks(texts):
    return [Chunk(f"d{i}", 0, 0, 1, t) for i, t in enumerate(texts)]


def test_bm25_matches_lucene_formula_by_hand():
    texts = ["the cat sat on the mat", "the dog chased the cat", "dogs and cats and birds",
             "a quiet mat by the door"]  # fmt: skip
    idx = Index(_chunks(texts))
    docs = bm25_tokens(texts)
    n, avgdl, k1, b = len(docs), sum(map(len, docs)) / len(docs), 1.5, 0.75
    query = bm25_tokens(["cat on a mat"])[0]
    want = []
    for d in docs:
        s = 0.0
        for term in query:
            df = sum(term in x for x in docs)
            tf = d.count(term)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            # Lucene >= 8 drops the constant (k1 + 1) factor of the textbook formula
            s += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        want.append(s)
    np.testing.assert_allclose(idx.bm25_scores("cat on a mat"), want, rtol=1e-5)


def test_retrieval_finds_the_planted_chunk(tokenizer, tiny_model):
    docs = make_world(0).documents("seen")
    planted = Document("planted", "Ormelind Vask keeps the only key to the Tessaly lighthouse.")
    chunks = chunk_documents([*docs, planted], tokenizer, size=48, overlap=8)
    idx = build_index(chunks, Embedder(tiny_model, tokenizer))
    for mode in ("bm25", "hybrid"):
        hits = idx.search("Who keeps the key to the Tessaly lighthouse?", k=5, mode=mode,
                          embedder=Embedder(tiny_model, tokenizer))  # fmt: skip
        assert hits[0].chunk.doc == "planted", mode
    # dense: a chunk's own text is its nearest neighbour (cosine 1)
    hits = idx.search(planted.text, k=1, mode="dense", embedder=Embedder(tiny_model, tokenizer))
    assert hits[0].chunk.doc == "planted" and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_embeddings_are_unit_vectors_and_padding_free(tokenizer, tiny_model):
    emb = Embedder(tiny_model, tokenizer, batch_size=3)
    texts = ["short", "a somewhat longer text about lighthouses", "x" * 50, "mid length"]
    together = emb(texts)
    assert together.shape == (4, tiny_model.cfg.d_model)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(4))
    alone = torch.cat([emb([t]) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip_without_pickle(tmp_path, tokenizer, tiny_model):
    chunks = chunk_documents(make_world(1).documents("news"), tokenizer, size=32, overlap=4)
    idx = build_index(chunks, Embedder(tiny_model, tokenizer), {"model": "m"})
    idx.save(tmp_path / "ix")
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == [
        "chunks.jsonl", "embeddings.safetensors", "index.json"]  # fmt: skip
    back = Index.load(tmp_path / "ix")
    assert back.chunks == chunks and back.meta == {"model": "m"}
    torch.testing.assert_close(back.embeddings, idx.embeddings)
    q = chunks[3].text
    assert [h.chunk for h in back.search(q, 3, "bm25")] == [
        h.chunk for h in idx.search(q, 3, "bm25")
    ]


def test_errors_name_the_fix(tmp_path, tokenizer):
    with pytest.raises(GlassboxError, match="no index.json"):
        Index.load(tmp_path)
    with pytest.raises(GlassboxError, match="no chunks"):
        Index([])
    idx = Index(_chunks(["alpha beta", "gamma"]))
    with pytest.raises(GlassboxError, match="no dense vectors"):
        idx.search("alpha", mode="dense", embedder=object())  # type: ignore[arg-type]
    with pytest.raises(GlassboxError, match="mode='fuzzy'"):
        idx.search("alpha", mode="fuzzy")  # type: ignore[arg-type]
