"""A tiny starting checkpoint shared by the fine-tuning stage tests (built in-process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glassbox.checkpoint import save_model_dir
from glassbox.config import ModelConfig
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer

TEXT = (
    "What is 47 + 85? 132. Which is larger: 41 or 29? 41. Sort ascending: 5, 2, 9 -> 2, 5, 9. "
    'def add(a, b):\n    return a + b\n{"name": "Alice", "age": 34} banana apple river\n'
) * 20


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A `pretrain`-like run directory: a 'test'-preset model and a small tokenizer."""
    out = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train([TEXT], vocab_size=320, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("test", vocab_size=tok.vocab_size))
    save_model_dir(out, model, tok, stage="pretrain")
    return out
