"""Shared tiny models for the diffusion tests (random weights, seconds to build)."""

from __future__ import annotations

import pytest
import torch

from glassbox.diffusion.model import Denoiser, DiffusionConfig, TextConfig
from glassbox.diffusion.text import Vocabulary
from glassbox.diffusion.unet import UNetConfig

CAPTIONS = ["a red circle on the left", "a small blue square at the top", "a green triangle"]


def make_tiny(text: bool = True, seed: int = 0) -> Denoiser:
    """A tiny Denoiser whose zero-initialised layers are randomised, so outputs differ."""
    torch.manual_seed(seed)
    unet = UNetConfig(
        image_size=8,
        in_channels=3,
        channels=8,
        channel_mults=(1, 2),
        attn_resolutions=(4,),
        heads=2,
        groups=4,
        num_classes=0 if text else 10,
        context_dim=16 if text else 0,
    )
    if text:
        vocab = Vocabulary.build(CAPTIONS, max_length=8)
        cfg = DiffusionConfig(
            unet=unet, text=TextConfig(dim=16, layers=1, heads=2, max_length=8), vocab=vocab.tokens
        )
    else:
        cfg = DiffusionConfig(unet=unet, text=None, class_names=[str(i) for i in range(10)])
    model = Denoiser(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture
def text_model() -> Denoiser:
    return make_tiny(text=True)


@pytest.fixture
def class_model() -> Denoiser:
    return make_tiny(text=False)


@pytest.fixture
def tiny_factory():
    return make_tiny
