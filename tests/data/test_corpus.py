import json

import numpy as np
import pytest

from glassbox.data.corpus import load_corpus, split_documents
from glassbox.data.tokens import tokenize_corpus
from glassbox.errors import GlassboxError


def test_builtin_corpora_are_real_python():
    py = load_corpus("builtin:python")
    assert len(py) > 300 and any(d.name.endswith("json/__init__.py") for d in py)
    docs = load_corpus("builtin:pydoc")
    assert len(docs) > 50 and any("for" in d.name for d in docs)


def test_user_files_dirs_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta text")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"body": "gamma"}) + "\n\n" + json.dumps({"body": "delta"}) + "\n"
    )
    assert [d.text for d in load_corpus(str(tmp_path / "a.txt"))] == ["alpha text"]
    assert len(load_corpus(str(tmp_path / "sub"))) == 1
    assert len(load_corpus(str(tmp_path / "**" / "*.md"))) == 1
    assert [d.text for d in load_corpus(str(tmp_path / "c.jsonl"), "body")] == ["gamma", "delta"]


def test_clear_errors(tmp_path):
    with pytest.raises(GlassboxError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(GlassboxError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(GlassboxError, match="bad.jsonl:2"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    with pytest.raises(GlassboxError, match="text-field"):
        load_corpus(str(tmp_path / "bad.jsonl").replace("bad", "bad"), "missing")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(GlassboxError, match="not UTF-8"):
        load_corpus(str(tmp_path / "bin.txt"))
    with pytest.raises(GlassboxError, match="Unknown built-in"):
        load_corpus("builtin:nothing")


def test_split_by_document_or_by_position():
    from glassbox.data.corpus import Document

    docs = [Document(str(i), f"doc {i}") for i in range(40)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 4 and not {d.name for d in train} & {d.name for d in val}
    one = [Document("play", "x" * 1000)]
    train, val = split_documents(one, 0.1)
    assert len(train[0].text) == 900 and len(val[0].text) == 100


def test_tokenized_memmap_has_boundaries_and_is_cached(tokenizer, tmp_path, monkeypatch):
    import glassbox.data.tokens as tokens

    docs = load_corpus("builtin:pydoc")[:30]
    a = tokenize_corpus(tokenizer, docs, 0.1, seq_len=32, cache_dir=tmp_path)
    assert int((a.train == tokenizer.eot_id).sum()) == a.meta["train_docs"]
    calls = []
    real = tokens._tokenize
    monkeypatch.setattr(tokens, "_tokenize", lambda *a: calls.append(1) or real(*a))
    b = tokenize_corpus(tokenizer, docs, 0.1, seq_len=32, cache_dir=tmp_path)
    assert calls == []  # read from the cache, not tokenized again
    assert (a.train == b.train).all()
    import torch

    x, y = a.get_batch(4, 32, torch.Generator().manual_seed(0))
    assert x.shape == (4, 32) and (x[:, 1:] == y[:, :-1]).all()
    with pytest.raises(GlassboxError, match="fewer than one sequence"):
        tokenize_corpus(tokenizer, docs[:10], 0.1, seq_len=100_000, cache_dir=tmp_path)


def test_truncated_token_cache_is_rebuilt(tokenizer, tmp_path, monkeypatch):
    """A cache file cut short (a crash, a full disk) is rebuilt, not trusted or fatal."""
    import glassbox.data.tokens as tokens

    docs = load_corpus("builtin:pydoc")[:30]
    expected = np.array(tokenize_corpus(tokenizer, docs, 0.1, 32, tmp_path).train)
    calls = []
    real = tokens._tokenize
    monkeypatch.setattr(tokens, "_tokenize", lambda *a: calls.append(1) or real(*a))
    entry = next(p for p in (tmp_path / "tokens").iterdir() if not p.name.startswith("."))
    data = (entry / "train.bin").read_bytes()
    (entry / "train.bin").write_bytes(data[: len(data) // 2])
    c = tokenize_corpus(tokenizer, docs, 0.1, seq_len=32, cache_dir=tmp_path)
    assert calls == [1, 1] and (c.train == expected).all()
