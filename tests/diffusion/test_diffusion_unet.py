"""The U-Net, the text encoder and the EMA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glassbox.diffusion.model import Denoiser, DiffusionConfig, TextConfig
from glassbox.diffusion.text import Vocabulary
from glassbox.diffusion.unet import EMA, UNet, UNetConfig, timestep_embedding


def test_output_shape_and_conditioning_changes_the_output(text_model):
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 500, 999])
    ids = text_model.vocab.batch(["a red circle", "a blue square", "a green triangle"])
    out = text_model(x, t, ids)
    assert out.shape == x.shape
    other = text_model(x, t, text_model.vocab.batch(["a blue circle"] * 3))
    assert not torch.allclose(out, other)
    null = text_model(x, t, text_model.null_condition(3))
    assert not torch.allclose(out, null)


def test_class_conditioning_and_null_class(class_model):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 10])
    a = class_model(x, t, torch.tensor([1, 1]))
    b = class_model(x, t, torch.tensor([2, 2]))
    assert not torch.allclose(a, b)
    assert class_model.null_condition(2).tolist() == [10, 10]


def test_a_prompt_means_the_same_alone_or_in_a_batch(text_model):
    """Padding is masked: a short prompt next to a long one gives the same output."""
    ids = text_model.vocab.batch(["a red circle", "a small blue square at the top"])
    x, t = torch.randn(1, 3, 8, 8).repeat(2, 1, 1, 1), torch.tensor([300, 300])
    together = text_model(x, t, ids)
    alone = text_model(x[:1], t[:1], ids[:1])
    assert torch.allclose(together[:1], alone, atol=1e-5)
    states, mask = text_model.text(ids[:1])
    assert mask.sum() == 4 and states.shape == (1, 8, 16)


def test_timestep_embedding_is_distinct_per_step():
    e = timestep_embedding(torch.arange(1000), 32)
    assert e.shape == (1000, 32)
    assert torch.cdist(e, e).add(torch.eye(1000) * 10).min() > 1e-3


def test_a_tiny_unet_overfits_one_batch():
    """Fixed (x_t, t, target): the loss must fall by 20x; a broken net cannot do that."""
    torch.manual_seed(0)
    vocab = Vocabulary.build(["a red circle", "a blue square"], max_length=6)
    cfg = DiffusionConfig(
        unet=UNetConfig(
            image_size=8, channels=16, channel_mults=(1, 2), attn_resolutions=(4,), heads=2,
            context_dim=16,
        ),
        text=TextConfig(dim=16, layers=1, heads=2, max_length=6),
        vocab=vocab.tokens,
    )  # fmt: skip
    model = Denoiser(cfg)
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([10, 200, 500, 900])
    ids = vocab.batch(["a red circle", "a blue square"] * 2)
    target = torch.randn(4, 3, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = F.mse_loss(model(x, t, ids), target).item()
    for _ in range(150):
        loss = F.mse_loss(model(x, t, ids), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 20, (first, loss.item())


def test_unet_config_validation_is_clear():
    import pytest

    from glassbox.errors import GlassboxError

    with pytest.raises(GlassboxError, match="divisible"):
        UNet(UNetConfig(image_size=18, channel_mults=(1, 2, 2)))
    with pytest.raises(GlassboxError, match="groups"):
        UNet(UNetConfig(channels=12, groups=8))


def test_ema_tracks_the_weights():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 2/11) = 2/11
    expected = before + (1 - 2 / 11) * 1.0
    assert torch.allclose(ema.shadow["weight"], expected)
