"""The sampling loop: guidance, determinism, trajectories, clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

from glassbox.diffusion.pipeline import DiffusionPipeline, guided_prediction, to_pil
from glassbox.errors import GlassboxError


def test_guidance_scale_one_equals_the_conditional_prediction(text_model):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([400, 400])
    cond = text_model.vocab.batch(["a red circle", "a blue square"])
    null = text_model.null_condition(2)
    with torch.no_grad():
        direct = text_model(x, t, cond)
        batched = guided_prediction(text_model, x, t, cond, null, 1.0, always_batch=True)
        fast = guided_prediction(text_model, x, t, cond, null, 1.0)
        uncond = guided_prediction(text_model, x, t, cond, null, 0.0, always_batch=True)
        strong = guided_prediction(text_model, x, t, cond, null, 3.0)
    assert torch.allclose(batched, direct, atol=1e-5)
    assert torch.allclose(fast, direct, atol=1e-6)
    assert torch.allclose(uncond, text_model(x, t, null), atol=1e-5)
    # scale 3 extrapolates: uncond + 3 (cond - uncond)
    assert torch.allclose(strong, uncond + 3 * (direct - uncond), atol=1e-4)
    assert not torch.allclose(strong, direct, atol=1e-3)


def test_guidance_with_class_labels(class_model):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([100, 100])
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        out = guided_prediction(class_model, x, t, labels, class_model.null_condition(2), 1.0,
                                always_batch=True)  # fmt: skip
        assert torch.allclose(out, class_model(x, t, labels), atol=1e-5)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_sampling_is_deterministic_for_a_seed(text_model, sampler, eta):
    pipe = DiffusionPipeline(text_model)
    prompts = ["a red circle", "a blue square at the top", "a green triangle"]
    a = pipe(prompts, steps=5, sampler=sampler, eta=eta, guidance=3.0, seed=7).images
    b = pipe(prompts, steps=5, sampler=sampler, eta=eta, guidance=3.0, seed=7).images
    c = pipe(prompts, steps=5, sampler=sampler, eta=eta, guidance=3.0, seed=8).images
    assert a.shape == (3, 3, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_ddim_images_do_not_depend_on_the_batch_size(text_model):
    pipe = DiffusionPipeline(text_model)
    prompts = ["a red circle", "a blue square", "a green triangle", "a red circle"]
    a = pipe(prompts, steps=4, guidance=2.0, seed=1, batch_size=4).images
    b = pipe(prompts, steps=4, guidance=2.0, seed=1, batch_size=3).images
    assert torch.allclose(a, b, atol=1e-5)


def test_trajectory_records_the_chosen_steps(class_model):
    pipe = DiffusionPipeline(class_model)
    s = pipe([1, 2], steps=10, guidance=3.0, trajectory_points=4)
    ts = [t for t, _, _ in s.trajectory]
    assert ts[0] == 999 and ts[-1] == -1 and len(ts) == 5  # 4 points + the final image
    assert s.trajectory[0][1].shape == (2, 3, 8, 8)


def test_bad_prompts_and_arguments_raise_clear_errors(text_model, class_model):
    pipe = DiffusionPipeline(text_model)
    with pytest.raises(GlassboxError, match="'dragon'.*Use only these words"):
        pipe(["a red dragon"], steps=2)
    with pytest.raises(GlassboxError, match="at most 7"):
        pipe(["a red circle " * 4], steps=2)
    with pytest.raises(GlassboxError, match="guidance"):
        pipe(["a red circle"], steps=2, guidance=-1)
    with pytest.raises(GlassboxError, match="1 to 1000"):
        pipe(["a red circle"], steps=5000)
    with pytest.raises(GlassboxError, match="Unknown sampler"):
        pipe(["a red circle"], steps=2, sampler="euler")
    with pytest.raises(GlassboxError, match="text-conditioned"):
        pipe([3], steps=2)
    with pytest.raises(GlassboxError, match="Nothing to generate"):
        pipe([], steps=2)
    cpipe = DiffusionPipeline(class_model)
    with pytest.raises(GlassboxError, match="out of range"):
        cpipe([12], steps=2)
    with pytest.raises(GlassboxError, match="not one of its classes"):
        cpipe(["cat"], steps=2)
    assert cpipe(["7"], steps=2).images.shape == (1, 3, 8, 8)  # a class name works too


def test_grid_picture_size():
    img = to_pil(torch.rand(6, 1, 8, 8), nrow=3, cell=32, pad=2)
    assert img.size == (3 * 34 + 2, 2 * 34 + 2)
