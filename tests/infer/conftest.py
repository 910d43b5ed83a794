"""A tiny tokenizer and model shared by the engine tests (trained and built in-process)."""

from __future__ import annotations

import pytest
import torch

from glassbox.config import ModelConfig
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer

TEXT = (
    "hello world, a small test of the glassbox engine 0123456789. "
    "faults stay with their request; the others finish 0123456789. "
) * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    """Random weights with a large init, so greedy outputs vary from prompt to prompt."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("test", vocab_size=tok.vocab_size, init_std=0.2)
    return Transformer(cfg).eval()
