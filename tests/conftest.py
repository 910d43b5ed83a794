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


TINY_CLIP = dict(
    vision_dim=32, vision_layers=1, text_dim=32, text_layers=1, embed_dim=16, num_images=64,
    batch_size=16, log_interval=2, eval_interval=4, checkpoint_interval=4, device="cpu",
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_clip_options() -> dict:
    """`glassbox clip train` options of a tiny contrastive model (seconds to train)."""
    return dict(TINY_CLIP)


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory) -> str:
    """A tiny contrastive run on builtin:scenes, trained for 4 steps (vision, diffusion
    and server tests share it)."""
    from glassbox.vision.train import ClipTrainConfig, train_clip

    out = tmp_path_factory.mktemp("clip") / "run"
    train_clip(ClipTrainConfig(out=str(out), max_steps=4, **TINY_CLIP))
    return str(out)
