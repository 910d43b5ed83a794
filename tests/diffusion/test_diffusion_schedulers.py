"""Schedulers: parity with diffusers, the forward process at its ends, clear errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from glassbox.diffusion.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    NoiseSchedule,
    SchedulerConfig,
    make_betas,
    make_sampler,
)
from glassbox.errors import GlassboxError

diffusers = pytest.importorskip("diffusers")

BETAS = ["linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "v_prediction"]
SPACINGS = ["leading", "trailing"]


def fake_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for a network, so both schedulers see the same outputs."""
    return 0.7 * x + 0.1 * math.sin(t / 37.0) + 0.05 * torch.cos(x * 3)


def configs(beta: str, pred: str, spacing: str, T: int = 1000):
    ours = SchedulerConfig(
        num_train_timesteps=T,
        beta_schedule=beta,
        prediction_type=pred,
        timestep_spacing=spacing,
        clip_sample=True,
    )
    theirs = dict(
        num_train_timesteps=T,
        beta_schedule=beta,
        beta_start=ours.beta_start,
        beta_end=ours.beta_end,
        prediction_type=pred,
        timestep_spacing=spacing,
        clip_sample=True,
    )
    return ours, theirs


@pytest.mark.parametrize("beta", BETAS)
def test_betas_and_alphas_match_diffusers(beta):
    ours, theirs = configs(beta, "epsilon", "leading")
    ref = diffusers.DDPMScheduler(**theirs)
    assert torch.allclose(make_betas(ours), ref.betas, atol=1e-7, rtol=0)
    assert torch.allclose(NoiseSchedule(ours).alphas_cumprod, ref.alphas_cumprod, atol=1e-7)


@pytest.mark.parametrize(
    "beta,pred,spacing,steps",
    [(*c, s) for c in itertools.product(BETAS, PREDICTIONS, SPACINGS) for s in (10, 50)],
)
def test_ddpm_step_matches_diffusers(beta, pred, spacing, steps):
    ours_cfg, theirs_cfg = configs(beta, pred, spacing)
    ours, ref = DDPMScheduler(ours_cfg), diffusers.DDPMScheduler(**theirs_cfg)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    g_ours, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_ours = x_ref = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        a = ours.step(fake_model(x_ours, int(t)), t, x_ours, generator=g_ours)
        b = ref.step(fake_model(x_ref, int(t)), t, x_ref, generator=g_ref)
        assert torch.allclose(a.prev_sample, b.prev_sample, atol=1e-5, rtol=0), int(t)
        assert torch.allclose(a.pred_original_sample, b.pred_original_sample, atol=1e-5, rtol=0)
        x_ours, x_ref = a.prev_sample, b.prev_sample


def test_ddpm_full_chain_matches_diffusers():
    """All 1000 ancestral steps, noise drawn from equal generators, end within 1e-5."""
    ours_cfg, theirs_cfg = configs("linear", "epsilon", "leading")
    ours, ref = DDPMScheduler(ours_cfg), diffusers.DDPMScheduler(**theirs_cfg)
    ours.set_timesteps(1000)
    ref.set_timesteps(1000)
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x_ours = x_ref = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        x_ours = ours.step(fake_model(x_ours, int(t)), t, x_ours, generator=g_ours).prev_sample
        x_ref = ref.step(fake_model(x_ref, int(t)), t, x_ref, generator=g_ref).prev_sample
    assert torch.allclose(x_ours, x_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "beta,pred,spacing,eta",
    list(itertools.product(BETAS, PREDICTIONS, SPACINGS, (0.0, 0.5, 1.0))),
)
def test_ddim_step_matches_diffusers(beta, pred, spacing, eta):
    ours_cfg, theirs_cfg = configs(beta, pred, spacing)
    ours, ref = DDIMScheduler(ours_cfg), diffusers.DDIMScheduler(**theirs_cfg)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    assert torch.equal(ours.timesteps, ref.timesteps)
    g_ours, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x_ours = x_ref = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        a = ours.step(fake_model(x_ours, int(t)), t, x_ours, eta=eta, generator=g_ours)
        b = ref.step(fake_model(x_ref, int(t)), t, x_ref, eta=eta, generator=g_ref)
        assert torch.allclose(a.prev_sample, b.prev_sample, atol=1e-5, rtol=0), int(t)
        assert torch.allclose(a.pred_original_sample, b.pred_original_sample, atol=1e-5, rtol=0)
        x_ours, x_ref = a.prev_sample, b.prev_sample


@pytest.mark.parametrize(
    "pred,eta", [("epsilon", 0.0), ("v_prediction", 0.0), ("v_prediction", 0.5)]
)
def test_ddim_with_clipped_model_output_matches_diffusers(pred, eta):
    """The pipeline's mode: eps recomputed from the clipped x_0 (large outputs force clipping)."""
    ours_cfg, theirs_cfg = configs("squaredcos_cap_v2", pred, "trailing")
    ours, ref = DDIMScheduler(ours_cfg), diffusers.DDIMScheduler(**theirs_cfg)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    g_ours, g_ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    x_ours = x_ref = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        out_o, out_r = 3 * fake_model(x_ours, int(t)), 3 * fake_model(x_ref, int(t))
        a = ours.step(out_o, t, x_ours, eta=eta, generator=g_ours, use_clipped_model_output=True)
        b = ref.step(out_r, t, x_ref, eta=eta, generator=g_ref, use_clipped_model_output=True)
        assert torch.allclose(a.prev_sample, b.prev_sample, atol=1e-5, rtol=0), int(t)
        x_ours, x_ref = a.prev_sample, b.prev_sample


def test_ddim_explicit_noise_matches_diffusers_variance_noise():
    ours_cfg, theirs_cfg = configs("squaredcos_cap_v2", "v_prediction", "leading")
    ours, ref = DDIMScheduler(ours_cfg), diffusers.DDIMScheduler(**theirs_cfg)
    ours.set_timesteps(7)  # 7 does not divide 1000
    ref.set_timesteps(7)
    x = torch.randn(1, 3, 4, 4)
    noise = torch.randn(1, 3, 4, 4)
    t = ours.timesteps[0]
    a = ours.step(fake_model(x, int(t)), t, x, eta=0.8, noise=noise)
    b = ref.step(fake_model(x, int(t)), t, x, eta=0.8, variance_noise=noise)
    # Leading spacing is even, so "the next listed timestep" equals diffusers' t - T // n.
    assert ours.previous_timestep(int(t)) == int(t) - 1000 // 7
    assert torch.allclose(a.prev_sample, b.prev_sample, atol=1e-5, rtol=0)


def test_ddim_eta_zero_is_deterministic_and_ddpm_is_not():
    cfg = SchedulerConfig()
    x = torch.randn(1, 1, 4, 4)
    ddim = DDIMScheduler(cfg)
    ddim.set_timesteps(10)
    t = ddim.timesteps[3]
    a = ddim.step(fake_model(x, int(t)), t, x, generator=torch.Generator().manual_seed(0))
    b = ddim.step(fake_model(x, int(t)), t, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.prev_sample, b.prev_sample)
    ddpm = DDPMScheduler(cfg)
    ddpm.set_timesteps(10)
    a = ddpm.step(fake_model(x, int(t)), t, x, generator=torch.Generator().manual_seed(0))
    b = ddpm.step(fake_model(x, int(t)), t, x, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.prev_sample, b.prev_sample)


@pytest.mark.parametrize("beta", BETAS)
def test_noising_at_t0_keeps_the_image_and_at_T_is_pure_noise(beta):
    cfg = SchedulerConfig(beta_schedule=beta)
    sched = NoiseSchedule(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(256, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    T = cfg.num_train_timesteps
    first = sched.add_noise(x0, noise, torch.zeros(256, dtype=torch.long))
    last = sched.add_noise(x0, noise, torch.full((256,), T - 1))
    # t = 0: one tiny step of noise (beta_0 <= 1e-4, so the noise weight is <= 1e-2)
    assert (first - x0).abs().max() < 0.05
    assert (1 - sched.alphas_cumprod[0]) ** 0.5 <= 0.01 + 1e-6
    # t = T - 1: the image is gone; what is left is the noise, unit variance
    assert sched.alphas_cumprod[-1] < 1e-4
    assert (last - noise).abs().max() < 0.02
    assert abs(last.std().item() - 1) < 0.02
    assert abs(torch.corrcoef(torch.stack([last.flatten(), x0.flatten()]))[0, 1]) < 0.02


def test_closed_form_equals_iterating_the_markov_chain():
    """q(x_t | x_0) in one jump has the mean and std of t one-step noisings."""
    cfg = SchedulerConfig(num_train_timesteps=50, beta_schedule="linear", beta_end=0.2)
    sched = NoiseSchedule(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.full((40000,), 0.7)
    for beta in sched.betas[:30]:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g)
    abar = sched.alphas_cumprod[29]
    assert abs(x.mean().item() - 0.7 * abar.sqrt().item()) < 0.01
    assert abs(x.std().item() - (1 - abar).sqrt().item()) < 0.01


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_the_prediction_recovers_x0_exactly(pred):
    cfg = SchedulerConfig(prediction_type=pred, clip_sample=False)
    ddim = DDIMScheduler(cfg)
    x0, noise = torch.randn(4, 3, 8, 8).clamp(-1, 1), torch.randn(4, 3, 8, 8)
    t = torch.full((4,), 600)
    x_t = ddim.schedule.add_noise(x0, noise, t)
    target = ddim.schedule.training_target(x0, noise, t)
    rec_x0, rec_eps = ddim._split(target, x_t, ddim.alphas_cumprod[600])
    assert torch.allclose(rec_x0, x0, atol=1e-5)
    assert torch.allclose(rec_eps, noise, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    sched = DDIMScheduler(SchedulerConfig())
    with pytest.raises(GlassboxError, match="1 to 1000"):
        sched.set_timesteps(0)
    with pytest.raises(GlassboxError, match="1 to 1000"):
        sched.set_timesteps(1001)
    with pytest.raises(GlassboxError, match="Unknown sampler"):
        make_sampler("euler", SchedulerConfig())
    with pytest.raises(GlassboxError, match="beta_schedule"):
        NoiseSchedule(SchedulerConfig(beta_schedule="quadratic"))
    with pytest.raises(GlassboxError, match="eta"):
        sched.set_timesteps(10)
        sched.step(torch.zeros(1), sched.timesteps[0], torch.zeros(1), eta=-1)
    with pytest.raises(GlassboxError, match="out of range"):
        NoiseSchedule(SchedulerConfig()).add_noise(
            torch.zeros(1), torch.zeros(1), torch.tensor([1000])
        )
