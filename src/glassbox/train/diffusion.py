"""Diffusion training recipe, top to bottom: noise the data, learn to predict the noise.

One step::

    x_0, cond  <- a batch of images and their captions / labels
    cond       <- the empty prompt (or null class) for ``cond_dropout`` of the batch,
                  so the same network also learns the unconditional model (guidance)
    t ~ U{0..T-1},  eps ~ N(0, I)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps            (scheduler.add_noise)
    loss = || model(x_t, t, cond) - target ||^2                (target = eps or v)

AdamW, gradient clipping, an EMA of the weights for sampling, metrics JSONL, a loss
PNG, sample grids every ``sample_interval`` steps. The run directory, snapshots,
resume rules and the training clock come from ``glassbox.train.run``: the same
``--out --max-steps --max-minutes --resume --checkpoint-interval`` as pretraining.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from glassbox import __version__
from glassbox.checkpoint import (
    json_bytes,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    tensors_bytes,
)
from glassbox.device import autocast
from glassbox.diffusion.data import ImageSet, load_data
from glassbox.diffusion.model import (
    Denoiser,
    DiffusionConfig,
    TextConfig,
    clip_text_config,
    load_clip_text,
    num_parameters,
)
from glassbox.diffusion.pipeline import DiffusionPipeline, save_png, to_pil
from glassbox.diffusion.schedulers import NoiseSchedule, SchedulerConfig
from glassbox.diffusion.text import Vocabulary
from glassbox.diffusion.unet import EMA, UNetConfig
from glassbox.errors import GlassboxError
from glassbox.track import progress_bar
from glassbox.train.distributed import setup_distributed
from glassbox.train.optim import build_optimizers, set_lr
from glassbox.train.run import Run


@dataclass
class DiffusionTrainConfig:
    """Everything a diffusion run needs; saved in config.yaml and in every snapshot."""

    out: str = "runs/diffusion"
    """Run directory to write (must be empty or new unless --resume)."""
    data: str = "builtin:shapes"
    """builtin:shapes, builtin:digits, or a folder with captions.jsonl / captions.csv."""
    image_size: int = 16
    """Canvas size in pixels."""
    num_images: int = 20000
    """Training images rendered for builtin:shapes."""
    max_steps: int = 2000
    """Optimizer steps (the --max-minutes cap usually ends a 2-core CPU run first)."""
    max_minutes: float | None = 15.0
    """Training-time budget in minutes, summed over resumes (snapshots and grids excluded)."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 2e-3
    """AdamW learning rate (after a linear warmup)."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this."""
    cond_dropout: float = 0.1
    """Fraction of each batch trained unconditionally (for classifier-free guidance)."""
    ema_decay: float = 0.999
    """Decay of the weights' moving average that sampling uses."""
    log_interval: int = 25
    """Steps between metrics rows."""
    sample_interval: int = 500
    """Steps between sample grids in samples/ (0 = only at the end, none for tiny runs)."""
    checkpoint_interval: int = 250
    """Steps between snapshots."""
    keep_last: int = 2
    """Snapshots kept in checkpoints/."""
    seed: int = 0
    """Seed for initialisation, batches and noise."""
    compile: bool = False
    """torch.compile the denoiser."""
    device: str = "auto"
    """auto, cpu, cuda ..."""
    resume: bool = False
    """Continue the run in --out from its newest snapshot."""
    unet: dict = field(default_factory=dict)
    """Overrides of the preset's U-Net, as JSON: '{"channels": 16}'."""
    text_encoder: str = ""
    """Prompt encoder: empty = its own, trained with it; clip:RUN = a clip run's text encoder."""
    freeze_text_encoder: bool = True
    """With --text-encoder clip:RUN: keep its weights fixed (the U-Net learns to read them)."""

    def validate(self) -> None:
        checks = [
            (self.max_steps >= 1, f"--max-steps={self.max_steps} must be at least 1"),
            (self.batch_size >= 1, f"--batch-size={self.batch_size} must be at least 1"),
            (self.lr > 0, f"--lr={self.lr} must be positive"),
            (0 <= self.cond_dropout < 1, f"--cond-dropout={self.cond_dropout} must be in [0, 1)"),
            (
                self.max_minutes is None or self.max_minutes > 0,
                f"--max-minutes={self.max_minutes} must be positive",
            ),
            (
                self.checkpoint_interval >= 1,
                f"--checkpoint-interval={self.checkpoint_interval} must be at least 1",
            ),
            (self.log_interval >= 1, f"--log-interval={self.log_interval} must be at least 1"),
            (self.keep_last >= 1, f"--keep-last={self.keep_last} must be at least 1"),
            (4 <= self.image_size <= 256, f"--image-size={self.image_size} must be in [4, 256]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise GlassboxError(msg + ".")


PRESETS: dict[str, dict] = {
    # Measured on 2 shared CPU cores; see benchmarks/RESULTS.md.
    "default": dict(unet=dict(channels=32, channel_mults=[1, 2], attn_resolutions=[8])),
    # For tests: seconds per run.
    "tiny": dict(
        unet=dict(channels=8, channel_mults=[1, 2], attn_resolutions=[4], heads=2, groups=4),
        num_images=64,
        max_steps=4,
        batch_size=8,
        log_interval=1,
        sample_interval=0,
        checkpoint_interval=2,
    ),
}


def preset(name: str, data: str = "builtin:shapes", **overrides) -> DiffusionTrainConfig:
    """A named config for ``data``, with explicit keyword overrides applied."""
    if name not in PRESETS:
        raise GlassboxError(f"Unknown preset {name!r}; use one of {', '.join(PRESETS)}.")
    base = PRESETS[name] | {"data": data}
    return DiffusionTrainConfig(**(base | {k: v for k, v in overrides.items() if v is not None}))


def build_model_config(cfg: DiffusionTrainConfig, data: ImageSet) -> DiffusionConfig:
    """Model config for this data: text encoder + vocabulary, or class labels."""
    channels = data.images.shape[1]
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.unet.items()}
    try:
        unet = UNetConfig(image_size=cfg.image_size, in_channels=channels, **overrides)
    except TypeError as e:
        raise GlassboxError(f"--unet {cfg.unet}: {e}; see UNetConfig for the fields.") from e
    if data.conditioning == "text" and cfg.text_encoder:
        captions = [c for caps in data.captions for c in caps]
        clip_text = clip_text_config(cfg.text_encoder, captions, cfg.freeze_text_encoder)
        unet.context_dim = clip_text.dim  # cross-attention reads its states directly
        return DiffusionConfig(
            unet=unet, scheduler=SchedulerConfig(), text=None, data=cfg.data, clip_text=clip_text
        )
    if cfg.text_encoder:
        raise GlassboxError(
            f"--text-encoder applies to captioned data; {cfg.data} is class-conditioned."
        )
    if data.conditioning == "text":
        text = TextConfig()
        vocab = Vocabulary.build([c for caps in data.captions for c in caps], text.max_length)
        unet.context_dim = text.dim
        return DiffusionConfig(
            unet=unet, scheduler=SchedulerConfig(), text=text, vocab=vocab.tokens, data=cfg.data
        )
    unet.num_classes = len(data.class_names)
    return DiffusionConfig(
        unet=unet, scheduler=SchedulerConfig(), text=None, class_names=data.class_names,
        data=cfg.data,
    )  # fmt: skip


def _condition_table(model: Denoiser, data: ImageSet) -> torch.Tensor:
    """Per image, the conditioning ids: (N, variants, L) token ids or (N, 1) labels."""
    if model.text is not None:
        n_var = max(len(c) for c in data.captions)
        rows = [[caps[v % len(caps)] for v in range(n_var)] for caps in data.captions]
        ids = model.vocab.batch([c for r in rows for c in r])  # (N * variants, L)
        return ids.view(len(rows), n_var, -1)
    return data.labels[:, None]


def preview_conditions(model: Denoiser, data: ImageSet) -> list[str] | list[int]:
    """What the sample grids show: every shape in four colours for builtin:shapes, else
    up to 16 of the training captions (so every word is in the vocabulary), or classes."""
    if model.text is None:
        return [i % model.num_classes for i in range(2 * model.num_classes)]
    if model.config.data.startswith("builtin:shapes"):
        return [
            f"a {c} {s}"
            for c in ("red", "green", "blue", "yellow")
            for s in ("circle", "square", "triangle", "cross")
        ]
    firsts = list(dict.fromkeys(caps[0] for caps in data.captions))
    step = max(1, len(firsts) // 16)
    return firsts[::step][:16]


# --------------------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------------------


def save_snapshot(run: Run, model, ema, opt, gen, step: int, record: dict) -> None:
    """EMA weights + config.json at top level (what sampling loads); the raw weights,
    optimizer, EMA count and both RNGs under trainer/ for an exact resume."""
    opt_tensors, opt_meta = optimizer_state_to_tensors(opt.state_dict())
    files = {
        "model.safetensors": tensors_bytes(ema.state_dict()),
        "config.json": json_bytes(record),
    }
    trainer = {
        "model": model.state_dict(),
        "optimizer0": opt_tensors,
        # uint8 states: batches, timesteps, noise, dropout / dropout layers, if any
        "rng": {"generator": gen.get_state(), "torch": torch.get_rng_state()},
    }
    run.save(step, files, trainer, {"optimizers": [opt_meta], "ema_updates": ema.num_updates})


def restore_snapshot(run: Run, model, ema, opt, gen, device) -> int:
    snap = run.snapshot
    t = snap.tensors
    model.load_state_dict(t["trainer/model.safetensors"])
    ema.shadow = {k: v.to(device) for k, v in t["model.safetensors"].items()}
    ema.num_updates = snap.state["ema_updates"]
    opt.load_state_dict(
        optimizer_state_from_tensors(
            t["trainer/optimizer0.safetensors"], snap.state["optimizers"][0]
        )
    )
    gen.set_state(t["trainer/rng.safetensors"]["generator"])
    torch.set_rng_state(t["trainer/rng.safetensors"]["torch"])
    return snap.step


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def train(cfg: DiffusionTrainConfig, explicit: set[str] | None = None, quiet: bool = False) -> Run:
    """Train (or resume, ``cfg.resume``) a diffusion model into ``cfg.out``."""
    cfg.validate()
    d, dev = setup_distributed(cfg.device)
    if d.world > 1:
        raise GlassboxError("diffuse train runs in one process; start it without torchrun.")
    run = Run.open(cfg, "diffusion", d, explicit)
    cfg = run.cfg
    cfg.validate()

    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, "train", cfg.image_size, cfg.num_images)
    mcfg = build_model_config(cfg, data)
    model = Denoiser(mcfg)
    if mcfg.clip_text is not None:
        load_clip_text(model, cfg.text_encoder)
    model = model.to(dev)
    ema = EMA(model, cfg.ema_decay)
    (opt,) = build_optimizers(
        model, "adamw", cfg.lr, (0.9, 0.99), cfg.weight_decay, hidden_prefix="unet."
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    step = restore_snapshot(run, model, ema, opt, gen, dev) if run.snapshot else 0
    train_model = torch.compile(model) if cfg.compile else model

    record = {
        "architecture": "denoiser",
        "stage": "diffusion",
        "glassbox_version": __version__,
        "model": mcfg.to_dict(),
        "train": dataclasses.asdict(cfg),  # what `diffuse eval` reloads the data with
    }
    schedule = NoiseSchedule(mcfg.scheduler)
    images = data.images.to(dev)
    table = _condition_table(model, data).to(dev)
    null = model.null_condition(cfg.batch_size).to(dev)
    if run.snapshot is None:
        run.log({"event": "start", "params": num_parameters(model), "images": len(data),
                 "device": str(dev)})  # fmt: skip

    def preview(step: int) -> None:
        ema_model = copy.deepcopy(model)
        ema_model.load_state_dict(ema.state_dict())
        pipe = DiffusionPipeline(ema_model, dev)
        samples = pipe(preview_conditions(model, data), steps=20, guidance=3.0, seed=0)
        nrow = 4 if model.text is not None else model.num_classes
        save_png(to_pil(samples.images, nrow=nrow), run.out / "samples" / f"step_{step:06d}.png")

    model.train()
    clock = run.clock
    loss_sum, loss_n, elapsed_log = 0.0, 0, clock.elapsed()
    with progress_bar() if not quiet else _NoBar() as bar:
        task = bar.add_task("diffuse train", total=cfg.max_steps, completed=step, info="")
        while step < cfg.max_steps:
            # --- one training step --------------------------------------------------
            idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
            variant = torch.randint(0, table.shape[1], (cfg.batch_size,), generator=gen)
            drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_dropout
            t = torch.randint(0, schedule.num_train_timesteps, (cfg.batch_size,), generator=gen)
            noise = torch.randn((cfg.batch_size, *images.shape[1:]), generator=gen).to(dev)
            idx, variant, drop, t = idx.to(dev), variant.to(dev), drop.to(dev), t.to(dev)

            x0 = images[idx]  # (B, C, H, W)
            cond = table[idx, variant]  # (B, L) ids or (B,) labels
            drop_mask = drop.view(-1, *([1] * (cond.ndim - 1)))
            cond = torch.where(drop_mask, null, cond)  # conditioning dropout
            x_t = schedule.add_noise(x0, noise, t)
            target = schedule.training_target(x0, noise, t)

            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            set_lr([opt], lr)
            with autocast(dev):
                pred = train_model(x_t, t, cond)
            loss = F.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(model)
            step += 1

            # --- bookkeeping (off the training clock) --------------------------------
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            elapsed = clock.elapsed()
            out_of_time = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
            last = step == cfg.max_steps or out_of_time
            with clock.paused():
                if step % cfg.log_interval == 0 or last:
                    ips = loss_n * cfg.batch_size / max(elapsed - elapsed_log, 1e-9)
                    run.log({
                        "step": step, "train_loss": loss_sum / loss_n, "lr": lr,
                        "img_per_s": ips, "elapsed_s": elapsed, "wall_s": clock.wall(),
                    })  # fmt: skip
                    bar.update(task, info=f"{ips:.0f} img/s loss {loss_sum / loss_n:.4f}")
                    loss_sum, loss_n, elapsed_log = 0.0, 0, elapsed
                bar.update(task, advance=1)
                if step % cfg.checkpoint_interval == 0 or last:
                    save_snapshot(run, model, ema, opt, gen, step, record)
                if cfg.sample_interval and (step % cfg.sample_interval == 0 or last):
                    preview(step)
                    model.train()
            if out_of_time:
                run.log({"event": "time_budget", "step": step, "max_minutes": cfg.max_minutes})
                break
    run.plot(keys=("train_loss",), title="loss")
    return run


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, *a, **k) -> None:
        return None
