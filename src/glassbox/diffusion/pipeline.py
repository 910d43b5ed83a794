"""Text- or class-to-image: the denoising loop written out, plus grids and trajectories.

    x_T ~ N(0, I)
    for t in scheduler.timesteps:               # e.g. 999, 979, ..., 19 for 50 DDIM steps
        pred = guided(model, x_t, t, cond)      # classifier-free guidance
        x_t  = scheduler.step(pred, t, x_t)     # DDIM or DDPM
    image = (x_0 + 1) / 2

Classifier-free guidance (Ho & Salimans 2022) runs the model with and without the
condition and extrapolates: ``pred = uncond + s * (cond - uncond)``; s = 0 is the
unconditional model, s = 1 the conditional one, s > 1 trades diversity for fidelity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glassbox.checkpoint import atomic_write_bytes
from glassbox.device import autocast, resolve_device
from glassbox.diffusion.model import Denoiser, load_model
from glassbox.diffusion.schedulers import DDIMScheduler, DDPMScheduler, make_sampler
from glassbox.errors import GlassboxError
from glassbox.track import save_figure

MAX_GUIDANCE = 50.0


def guided_prediction(
    model: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    null: torch.Tensor,
    scale: float,
    always_batch: bool = False,
) -> torch.Tensor:
    """uncond + scale * (cond - uncond); scales 0 and 1 skip the branch they do not need."""
    if not always_batch and scale == 0:
        return model(x, t, null)
    if not always_batch and scale == 1:
        return model(x, t, cond)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, cond]))  # (2B, ...)
    uncond, conditional = both.float().chunk(2)
    return uncond + scale * (conditional - uncond)


@dataclass
class Samples:
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    trajectory: list[tuple[int, torch.Tensor, torch.Tensor]]  # (t, x_t, predicted x_0)


class DiffusionPipeline:
    """A trained :class:`Denoiser` plus a sampler: prompts or labels in, images out."""

    def __init__(self, model: Denoiser, device: torch.device | str = "cpu"):
        self.model = model.eval()
        self.device = torch.device(device)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | None = None) -> DiffusionPipeline:
        dev = resolve_device(device)
        return cls(load_model(run_dir, dev), dev)

    # --- conditions ------------------------------------------------------------------

    def encode(self, conditions: list[str] | list[int]) -> torch.Tensor:
        """Prompts -> token ids (B, L), or labels / label names -> ids (B,), validated."""
        m = self.model
        if m.text is not None:
            bad = [c for c in conditions if not isinstance(c, str)]
            if bad:
                raise GlassboxError(
                    f"This model is text-conditioned; give a --prompt, not a class ({bad[0]!r})."
                )
            return m.vocab.batch(list(conditions))  # type: ignore[arg-type]
        names = m.config.class_names or [str(i) for i in range(m.num_classes)]
        ids = []
        for c in conditions:
            if isinstance(c, str):
                key = c.strip().lower()
                if key not in [n.lower() for n in names]:
                    raise GlassboxError(
                        f"This model is class-conditioned; {c!r} is not one of its classes: "
                        f"{', '.join(names)}. Use --class with a number 0-{len(names) - 1}."
                    )
                ids.append([n.lower() for n in names].index(key))
            else:
                if not 0 <= int(c) < len(names):
                    raise GlassboxError(
                        f"Class {c} is out of range: this model has classes 0-{len(names) - 1} "
                        f"({', '.join(names)})."
                    )
                ids.append(int(c))
        return torch.tensor(ids, dtype=torch.long)

    # --- the loop --------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        conditions: list[str] | list[int],
        steps: int = 50,
        sampler: str = "ddim",
        eta: float = 0.0,
        guidance: float = 3.0,
        seed: int = 0,
        batch_size: int = 64,
        trajectory_points: int = 0,
    ) -> Samples:
        """Generate one image per entry of ``conditions``.

        The initial noise for all images is drawn up front from ``seed``, so image i
        does not depend on the batch size for DDIM with eta = 0.
        """
        if not conditions:
            raise GlassboxError("Nothing to generate: give at least one prompt or class.")
        if not 0 <= guidance <= MAX_GUIDANCE:
            raise GlassboxError(
                f"guidance={guidance} is out of range [0, {MAX_GUIDANCE}]: 0 is unconditional, "
                "1 conditional, 3-5 is typical."
            )
        if batch_size < 1:
            raise GlassboxError(f"batch size {batch_size} must be at least 1.")
        if sampler == "ddpm" and eta != 0:
            raise GlassboxError("eta applies to the DDIM sampler only; drop --eta for ddpm.")
        sched = make_sampler(sampler, self.model.config.scheduler)
        sched.set_timesteps(steps)
        cond_all = self.encode(conditions)
        c = self.model.config.unet
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(
            len(conditions), c.in_channels, c.image_size, c.image_size, generator=gen
        )
        keep = _trajectory_indices(len(sched.timesteps), trajectory_points)

        images, trajectory = [], []
        for start in range(0, len(conditions), batch_size):
            x = noise[start : start + batch_size].to(self.device)  # (B, C, H, W) = x_T
            cond = cond_all[start : start + batch_size].to(self.device)
            null = self.model.null_condition(len(cond)).to(self.device)
            for i, t in enumerate(sched.timesteps):
                tt = torch.full((len(x),), int(t), device=self.device)
                with autocast(self.device):
                    pred = guided_prediction(self.model, x, tt, cond, null, guidance).float()
                out = _step(sched, pred, t, x, eta, gen)
                if start == 0 and i in keep:
                    trajectory.append((int(t), x.cpu(), out.pred_original_sample.cpu()))
                x = out.prev_sample
            images.append(((x.clamp(-1, 1) + 1) / 2).cpu())
        if trajectory_points:
            trajectory.append((-1, images[0], images[0]))  # the final image
        return Samples(torch.cat(images), trajectory)


def _step(sched: DDPMScheduler | DDIMScheduler, pred, t, x, eta: float, gen: torch.Generator):
    if isinstance(sched, DDIMScheduler):
        # Guidance extrapolates the prediction, so the implied x_0 often leaves [-1, 1] and
        # is clipped; eps must then be recomputed from the clipped x_0, or DDIM walks along
        # an inconsistent direction and the images fill with coloured noise at guidance 3.
        return sched.step(pred, t, x, eta=eta, generator=gen, use_clipped_model_output=True)
    return sched.step(pred, t, x, generator=gen)


def _trajectory_indices(num_steps: int, points: int) -> set[int]:
    if points <= 0:
        return set()
    return {int(round(i)) for i in np.linspace(0, num_steps - 1, min(points, num_steps))}


# ---------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------


def to_pil(
    images: torch.Tensor, nrow: int | None = None, cell: int = 64, pad: int = 2
) -> Image.Image:
    """(N, C, H, W) in [0, 1] -> one grid image, each cell upscaled to ``cell`` pixels."""
    n, ch, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    scale = max(1, cell // max(h, w))
    H, W = h * scale, w * scale
    grid = Image.new("RGB", (nrow * (W + pad) + pad, rows * (H + pad) + pad), (255, 255, 255))
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        a = arr[i] if ch == 3 else np.repeat(arr[i], 3, axis=2)
        tile = Image.fromarray(a).resize((W, H), Image.Resampling.NEAREST)
        grid.paste(tile, (pad + (i % nrow) * (W + pad), pad + (i // nrow) * (H + pad)))
    return grid


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def save_trajectory(samples: Samples, path: str | Path, rows: int = 4, title: str = "") -> Path:
    """Rows of images; columns x_t at chosen steps (top of each pair) and predicted x_0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traj = samples.trajectory
    if not traj:
        raise GlassboxError("No trajectory was recorded; sample with trajectory_points > 0.")
    rows = min(rows, traj[0][1].shape[0])
    cols = len(traj)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(1.1 * cols, 2.3 * rows), dpi=110)
    axes = np.atleast_2d(axes)
    for j, (t, xt, x0) in enumerate(traj):
        for r in range(rows):
            for k, img in enumerate((xt[r], x0[r])):
                ax = axes[2 * r + k, j]
                shown = ((img + 1) / 2 if t >= 0 else img).clamp(0, 1)
                ax.imshow(shown.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 and k == 0:
                    ax.set_title("final" if t < 0 else f"t={t}", fontsize=8)
                if j == 0:
                    ax.set_ylabel("x_t" if k == 0 else "pred x_0", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
