"""`glassbox rag index|search|ask` and `glassbox summarize`, driven as a user would."""

import subprocess
import sys

import pytest
import torch

from glassbox.checkpoint import save_model_dir
from glassbox.config import ModelConfig
from glassbox.data.world import make_world
from glassbox.model import Transformer


def glassbox(*args, cwd):
    cmd = [sys.executable, "-m", "glassbox.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def ok(proc):
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def home(tmp_path_factory, tokenizer):
    home = tmp_path_factory.mktemp("rag")
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("test", vocab_size=tokenizer.vocab_size, context_length=256)
    save_model_dir(home / "m", Transformer(cfg), tokenizer, "sft")
    return home


def test_index_search_ask_summarize(home):
    event = make_world(0).by_split("news")[0]
    out = ok(glassbox("rag", "index", "builtin:world-news", "--out", "news", cwd=home)).stdout
    assert "BM25" in out and (home / "news" / "index.json").is_file()
    out = ok(glassbox("rag", "search", "news", f"When did {event.name} take place?",
                      "--mode", "bm25", "--k", "2", cwd=home)).stdout  # fmt: skip
    assert out.startswith("1. world/event/" + event.name)
    ok(glassbox("rag", "index", "builtin:world-news", "--model", "m", "--size", "32",
                "--out", "dense", cwd=home))  # fmt: skip
    proc = ok(glassbox("rag", "ask", "m", f"When did {event.name} take place?", "--index",
                       "dense", "--max-tokens", "8", cwd=home))  # fmt: skip
    assert "[1] world/event/" in proc.stderr and "tokens, " in proc.stderr
    (home / "long.txt").write_text("A sentence about the lighthouse. " * 300)
    proc = ok(glassbox("summarize", "m", "long.txt", "--max-tokens", "8", cwd=home))
    assert "round 1:" in proc.stderr and "round(s)" in proc.stderr
    proc = ok(glassbox("probe", "sampling", "m", "--limit", "2", "--out", "p", cwd=home))
    assert "entropy" in proc.stdout and (home / "p" / "sampling.png").is_file()


def test_errors_are_clean(home):
    for args, needle in [
        (("rag", "search", "nowhere", "q"), "not a retrieval index"),
        (("rag", "index", "missing.txt", "--out", "x"), "does not exist"),
        (("rag", "index", "builtin:world", "--out", "x", "--overlap", "200"), "overlap=200"),
        (("summarize", "m", "missing.txt"), "Cannot read missing.txt"),
        (("probe", "vibes", "m"), "Unknown probe 'vibes'"),
        (("probe", "scale", "m"), "trains its own runs"),
    ]:
        proc = glassbox(*args, cwd=home)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert needle in proc.stderr, proc.stderr
