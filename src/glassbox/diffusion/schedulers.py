"""Noise schedules and samplers: the forward process q(x_t | x_0), DDPM and DDIM steps.

The scheduler is separate from the model (the diffusers discipline): the model maps
``(x_t, t, condition)`` to a prediction; the scheduler owns every coefficient.

Forward process (Ho et al. 2020), with ``abar_t = prod_{s<=t} (1 - beta_s)``::

    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,        eps ~ N(0, I)

The network predicts either ``eps`` ("epsilon") or the velocity
``v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x_0`` ("v_prediction", Salimans & Ho 2022).
Either one determines ``x_0`` and ``eps`` given ``x_t``, which is all a sampler needs:

* :class:`DDPMScheduler` draws ``x_{t'} ~ q(x_{t'} | x_t, x_0)`` (ancestral sampling);
* :class:`DDIMScheduler` moves deterministically along the predicted noise direction
  (``eta = 0``) or adds a chosen fraction of the DDPM noise (``eta > 0``), with any
  number of steps.

Both follow diffusers' ``DDPMScheduler``/``DDIMScheduler`` formulas and configuration
names, so the tests can check them against diffusers to 1e-5.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from glassbox.errors import GlassboxError

BetaSchedule = Literal["linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction"]
Spacing = Literal["leading", "trailing"]


@dataclass
class SchedulerConfig:
    """Everything that defines the forward process and how samplers walk back along it."""

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "squaredcos_cap_v2"
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    prediction_type: PredictionType = "v_prediction"
    clip_sample: bool = True  # clamp the predicted x_0 to [-clip_sample_range, +range]
    clip_sample_range: float = 1.0
    timestep_spacing: Spacing = "trailing"  # "trailing" starts few-step sampling at t = T-1
    set_alpha_to_one: bool = True  # DDIM: abar before t = 0 is exactly 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SchedulerConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def validate(self) -> None:
        if self.num_train_timesteps < 2:
            raise GlassboxError(
                f"num_train_timesteps={self.num_train_timesteps} is too small; use at least 2 "
                "(1000 is usual)."
            )
        if self.beta_schedule not in ("linear", "squaredcos_cap_v2"):
            raise GlassboxError(
                f"Unknown beta_schedule {self.beta_schedule!r}; use 'linear' or "
                "'squaredcos_cap_v2' (cosine)."
            )
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise GlassboxError(
                f"Unknown prediction_type {self.prediction_type!r}; use 'epsilon' or "
                "'v_prediction'."
            )
        if self.timestep_spacing not in ("leading", "trailing"):
            raise GlassboxError(
                f"Unknown timestep_spacing {self.timestep_spacing!r}; use 'leading' or 'trailing'."
            )


def make_betas(config: SchedulerConfig) -> torch.Tensor:
    """beta_t for t = 0 .. T-1, float32, computed exactly as diffusers does."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)

    # Cosine schedule (Nichol & Dhariwal 2021): abar(t) = cos^2((t + s) / (1 + s) * pi / 2),
    # turned into betas with beta <= 0.999 so the last step stays invertible.
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


class NoiseSchedule:
    """The forward process: betas, cumulative alphas, noising and the training target."""

    def __init__(self, config: SchedulerConfig):
        config.validate()
        self.config = config
        self.betas = make_betas(config)  # (T,)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) abar_t

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t gathered per batch item and shaped to broadcast against ``like``."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        if t.min() < 0 or t.max() >= self.num_train_timesteps:
            raise GlassboxError(
                f"timestep out of range [0, {self.num_train_timesteps - 1}]: got "
                f"{t.min().item()}..{t.max().item()}."
            )
        a = self.alphas_cumprod[t].to(device=like.device, dtype=like.dtype)
        return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; x0, noise (B, C, H, W)."""
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        a = self._abar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """What the network must output for this prediction type."""
        if self.config.prediction_type == "epsilon":
            return noise
        return self.velocity(x0, noise, t)


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_{t'} for the next (smaller) timestep t'
    pred_original_sample: torch.Tensor  # the model's current estimate of x_0


def _spaced_timesteps(T: int, n: int, spacing: Spacing) -> torch.Tensor:
    """n integer timesteps in [0, T), descending, as diffusers spaces them."""
    if not isinstance(n, int) or n < 1 or n > T:
        raise GlassboxError(
            f"num_inference_steps={n} is out of range: use 1 to {T} (the number of training "
            "timesteps)."
        )
    if spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64)
    else:  # trailing: the first step is always t = T - 1, i.e. pure noise
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    return torch.from_numpy(ts)


class _Sampler:
    """Shared by DDPM and DDIM: the schedule, the inference timesteps, x_0 / eps from output."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.schedule = NoiseSchedule(config)
        self.alphas_cumprod = self.schedule.alphas_cumprod
        self.timesteps: torch.Tensor = torch.arange(config.num_train_timesteps).flip(0)
        self.num_inference_steps: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the descending timesteps the sampler visits (``self.timesteps``)."""
        self.num_inference_steps = num_inference_steps
        self.timesteps = _spaced_timesteps(
            self.config.num_train_timesteps, num_inference_steps, self.config.timestep_spacing
        )

    def previous_timestep(self, t: int) -> int:
        """The next entry of ``self.timesteps`` after t, or -1 after the last one."""
        idx = (self.timesteps == t).nonzero()
        if idx.numel() == 0:
            raise GlassboxError(f"timestep {t} is not one of this scheduler's timesteps.")
        i = int(idx[0, 0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def _split(
        self, model_output: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) implied by the model output at a point with abar = a_t."""
        if self.config.prediction_type == "epsilon":
            x0 = (sample - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
            eps = model_output
        else:  # v_prediction
            x0 = a_t**0.5 * sample - (1 - a_t) ** 0.5 * model_output
            eps = a_t**0.5 * model_output + (1 - a_t) ** 0.5 * sample
        return x0, eps

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        r = self.config.clip_sample_range
        return x0.clamp(-r, r) if self.config.clip_sample else x0


class DDPMScheduler(_Sampler):
    """Ancestral sampling: x_{t'} ~ N(mu(x_t, x_0), sigma_t^2) with the "fixed small" variance."""

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """One reverse step from ``timestep`` to the previous entry of ``self.timesteps``.

        ``noise`` (same shape as ``sample``) replaces the draw from ``generator`` when given.
        """
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        alpha_t = a_t / a_prev  # the one-step alpha between the two visited timesteps
        beta_t = 1 - alpha_t

        x0, _ = self._split(model_output, sample, a_t)
        x0 = self._clip(x0)

        # Posterior mean of q(x_{t'} | x_t, x_0), eq. (7) of Ho et al.
        coef_x0 = a_prev**0.5 * beta_t / (1 - a_t)
        coef_xt = alpha_t**0.5 * (1 - a_prev) / (1 - a_t)
        prev = coef_x0 * x0 + coef_xt * sample

        if t > 0:
            if noise is None:
                noise = torch.randn(
                    model_output.shape, generator=generator, dtype=model_output.dtype
                ).to(model_output.device)
            variance = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
            prev = prev + variance**0.5 * noise
        return StepOutput(prev, x0)


class DDIMScheduler(_Sampler):
    """DDIM (Song et al. 2021): eta = 0 is deterministic; eta = 1 matches DDPM's noise level."""

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        use_clipped_model_output: bool = False,
    ) -> StepOutput:
        """One DDIM step from ``timestep`` to the previous entry of ``self.timesteps``.

        ``use_clipped_model_output`` recomputes eps from the clipped x_0, so that x_0 and
        eps stay consistent when clipping bites (as it does under strong guidance).
        """
        if eta < 0:
            raise GlassboxError(f"eta={eta} must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like).")
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        a_t = self.alphas_cumprod[t]
        if prev_t >= 0:
            a_prev = self.alphas_cumprod[prev_t]
        else:
            a_prev = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

        x0, eps = self._split(model_output, sample, a_t)
        x0 = self._clip(x0)

        # sigma_t of eq. (16) in Song et al.; eta scales it.
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * variance**0.5
        if use_clipped_model_output:
            eps = (sample - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        direction = (1 - a_prev - std**2) ** 0.5 * eps  # "direction pointing to x_t"
        prev = a_prev**0.5 * x0 + direction
        if eta > 0:
            if noise is None:
                noise = torch.randn(
                    model_output.shape, generator=generator, dtype=model_output.dtype
                ).to(model_output.device)
            prev = prev + std * noise
        return StepOutput(prev, x0)


def make_sampler(name: str, config: SchedulerConfig) -> DDPMScheduler | DDIMScheduler:
    """``"ddpm"`` or ``"ddim"`` for this forward process."""
    if name == "ddpm":
        return DDPMScheduler(config)
    if name == "ddim":
        return DDIMScheduler(config)
    raise GlassboxError(f"Unknown sampler {name!r}; use 'ddim' or 'ddpm'.")
