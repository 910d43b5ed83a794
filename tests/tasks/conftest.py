"""A tokenizer trained on task text and tiny models, built in-process."""

from __future__ import annotations

import pytest
import torch

from glassbox.config import ModelConfig
from glassbox.model import Transformer
from glassbox.tasks import builtin_tasks
from glassbox.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The machine's cores are shared: one intra-op thread is ~30x faster for these tiny
    models than two threads spinning against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def task_tok() -> Tokenizer:
    text = " ".join(f"{t.prompt} {t.reference}" for t in builtin_tasks("train", train_size=60))
    return Tokenizer.train([text], vocab_size=400, show_progress=False)


def tiny_model(tok: Tokenizer, seed: int = 0) -> Transformer:
    """A random 2-layer model with a 128-token context."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("test", vocab_size=tok.vocab_size, context_length=128)
    return Transformer(cfg).eval()
