"""Shared fixtures: a tokenizer trained in-process and tiny random models."""

from __future__ import annotations

import pytest
import torch

from glassbox.config import ModelConfig
from glassbox.data.corpus import pydoc_topics
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GLASSBOX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def small_text() -> str:
    return "".join(d.text for d in pydoc_topics()[:20])


@pytest.fixture(scope="session")
def tokenizer(small_text) -> Tokenizer:
    return Tokenizer.train([small_text], vocab_size=400, show_progress=False)


@pytest.fixture
def tiny_cfg(tokenizer) -> ModelConfig:
    return ModelConfig.from_name("test", vocab_size=tokenizer.vocab_size)


@pytest.fixture
def tiny_model(tiny_cfg) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_cfg).eval()
