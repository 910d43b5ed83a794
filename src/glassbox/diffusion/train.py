"""Training a diffusion model, top to bottom: noise the data, learn to predict the noise.

One step::

    x_0, cond  <- a batch of images and their captions / labels
    cond       <- the empty prompt (or null class) for ``cond_dropout`` of the batch,
                  so the same network also learns the unconditional model (guidance)
    t ~ U{0..T-1},  eps ~ N(0, I)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps            (scheduler.add_noise)
    loss = || model(x_t, t, cond) - target ||^2                (target = eps or v)

AdamW, gradient clipping, an EMA of the weights for sampling, metrics JSONL, a loss
PNG, sample grids every ``sample_every`` steps, and atomic snapshots that resume
exactly (weights, EMA, optimizer and both random-number generators are saved).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from glassbox import __version__
from glassbox.checkpoint import (
    json_bytes,
    latest_snapshot,
    load_json,
    load_tensors,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_json,
    save_tensors,
    tensors_bytes,
    write_snapshot,
)
from glassbox.device import autocast, resolve_device
from glassbox.diffusion.data import ImageSet, load_data
from glassbox.diffusion.model import Denoiser, DiffusionConfig, TextConfig, num_parameters
from glassbox.diffusion.pipeline import DiffusionPipeline, save_png, to_pil
from glassbox.diffusion.schedulers import NoiseSchedule, SchedulerConfig
from glassbox.diffusion.text import Vocabulary
from glassbox.diffusion.unet import EMA, UNetConfig
from glassbox.errors import GlassboxError
from glassbox.track import MetricsLog, plot_curves, progress_bar


@dataclass
class TrainConfig:
    data: str = "builtin:shapes"
    image_size: int = 16
    num_images: int = 20000  # builtin:shapes only
    steps: int = 2000  # the 15-minute cap usually ends a 2-core CPU run first
    max_minutes: float | None = 15.0  # cap on training wall time, summed over resumes
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    cond_dropout: float = 0.1  # fraction of the batch trained unconditionally
    ema_decay: float = 0.999
    log_every: int = 25
    sample_every: int = 500
    ckpt_every: int = 250
    keep_last: int = 2
    seed: int = 0
    unet: dict = field(default_factory=dict)  # overrides of the preset UNetConfig


PRESETS = {
    # Measured on 2 shared CPU cores; see benchmarks/RESULTS.md.
    "default": dict(unet=dict(channels=32, channel_mults=(1, 2), attn_resolutions=(8,))),
    # For tests: seconds per run.
    "tiny": dict(
        unet=dict(channels=8, channel_mults=(1, 2), attn_resolutions=(4,), heads=2, groups=4),
        num_images=64,
        steps=4,
        batch_size=8,
        log_every=1,
        sample_every=0,
        ckpt_every=2,
    ),
}


def preset(name: str, data: str, **overrides) -> TrainConfig:
    """A named TrainConfig for ``data``, with explicit keyword overrides applied."""
    if name not in PRESETS:
        raise GlassboxError(f"Unknown preset {name!r}; use one of {', '.join(PRESETS)}.")
    base = dict(PRESETS[name])
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(data=data, **base)


def build_model_config(cfg: TrainConfig, data: ImageSet) -> DiffusionConfig:
    """Model config for this data: text encoder + vocabulary, or class labels."""
    channels = data.images.shape[1]
    unet = UNetConfig(image_size=cfg.image_size, in_channels=channels, **cfg.unet)
    if data.conditioning == "text":
        text = TextConfig()
        vocab = Vocabulary.build([c for caps in data.captions for c in caps], text.max_length)
        unet.context_dim = text.dim
        return DiffusionConfig(
            unet=unet, scheduler=SchedulerConfig(), text=text, vocab=vocab.tokens, data=cfg.data
        )
    unet.num_classes = len(data.class_names)
    return DiffusionConfig(
        unet=unet,
        scheduler=SchedulerConfig(),
        text=None,
        class_names=data.class_names,
        data=cfg.data,
    )


def _condition_table(model: Denoiser, data: ImageSet) -> torch.Tensor:
    """Per image, the conditioning ids: (N, variants, L) token ids or (N, 1) labels."""
    if model.text is not None:
        n_var = max(len(c) for c in data.captions)
        rows = [[caps[v % len(caps)] for v in range(n_var)] for caps in data.captions]
        ids = model.vocab.batch([c for r in rows for c in r])  # (N * variants, L)
        return ids.view(len(rows), n_var, -1)
    return data.labels[:, None]


def preview_conditions(model: Denoiser) -> list[str] | list[int]:
    """What the sample grids show during training."""
    if model.text is not None:
        if "triangle" in model.vocab.index:  # builtin:shapes: every shape in two colours
            return [
                f"a {c} {s}"
                for c in ("red", "green", "blue", "yellow")
                for s in ("circle", "square", "triangle", "cross")
            ]
        return [""] * 16
    return [i % model.num_classes for i in range(2 * model.num_classes)]


def _snapshot_files(
    model: Denoiser,
    ema: EMA,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    step: int,
    config_json: dict,
    elapsed: float,
) -> dict[str, bytes]:
    opt_tensors, opt_meta = optimizer_state_to_tensors(opt)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state |= {f"opt.{k}": v for k, v in opt_tensors.items()}
    state["rng.generator"] = gen.get_state()  # uint8: batches, timesteps, noise, dropout
    state["rng.torch"] = torch.get_rng_state()  # uint8: dropout layers, if any
    meta = {
        "step": step,
        "optimizer": opt_meta,
        "ema_updates": ema.num_updates,
        "elapsed_s": elapsed,
    }
    return {
        "model.safetensors": tensors_bytes(ema.state_dict()),
        "config.json": json_bytes(config_json),
        "trainer/state.safetensors": tensors_bytes(state),
        "trainer/state.json": json_bytes(meta),
    }


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    device: str | None = None,
    quiet: bool = False,
) -> Path:
    """Train (or resume) a diffusion model into run directory ``out``; returns ``out``."""
    out = Path(out)
    dev = resolve_device(device)
    snap = latest_snapshot(out) if resume else None
    if resume and snap is None:
        raise GlassboxError(f"--resume was given but {out} has no checkpoints/step_N snapshot.")
    if not resume and (out / "config.json").exists():
        raise GlassboxError(
            f"{out} already holds a trained run. Pass --resume to continue it, or choose a new "
            "--out directory."
        )
    if snap is not None:  # the run's own settings win, except how long to go on
        saved = load_json(snap / "config.json")["train"]
        saved["unet"] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in saved["unet"].items()
        }
        cfg = TrainConfig(**{**saved, "steps": cfg.steps, "max_minutes": cfg.max_minutes})
    _validate(cfg)

    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, "train", cfg.image_size, cfg.num_images)
    mcfg = build_model_config(cfg, data)
    model = Denoiser(mcfg).to(dev)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    start, elapsed_before = 0, 0.0
    if snap is not None:
        state = load_tensors(snap / "trainer/state.safetensors")
        meta = load_json(snap / "trainer/state.json")
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        ema.shadow = {k: v.to(dev) for k, v in load_tensors(snap / "model.safetensors").items()}
        ema.num_updates = meta["ema_updates"]
        opt_t = {k[4:]: v for k, v in state.items() if k.startswith("opt.")}
        opt.load_state_dict(optimizer_state_from_tensors(opt_t, meta["optimizer"]))
        gen.set_state(state["rng.generator"])
        torch.set_rng_state(state["rng.torch"])
        start, elapsed_before = meta["step"], meta.get("elapsed_s", 0.0)

    config_json = {
        "stage": "diffusion",
        "glassbox_version": __version__,
        "model": mcfg.to_dict(),
        "train": asdict(cfg),
    }
    schedule = NoiseSchedule(mcfg.scheduler)
    images = data.images.to(dev)
    table = _condition_table(model, data).to(dev)
    null = model.null_condition(cfg.batch_size).to(dev)
    log = MetricsLog(out / "metrics.jsonl", truncate_after_step=start if snap else None)
    if snap is None:
        log.write(
            {
                "event": "start",
                "params": num_parameters(model),
                "images": len(data),
                "device": str(dev),
                "config": asdict(cfg),
            }
        )

    def checkpoint(step: int, elapsed: float) -> None:
        files = _snapshot_files(model, ema, opt, gen, step, config_json, elapsed)
        write_snapshot(out, step, files, keep_last=cfg.keep_last)
        save_tensors(ema.state_dict(), out / "model.safetensors")  # the latest, for sampling
        save_json(config_json, out / "config.json")

    def preview(step: int) -> None:
        ema_model = copy.deepcopy(model)
        ema_model.load_state_dict(ema.state_dict())
        pipe = DiffusionPipeline(ema_model, dev)
        conds = preview_conditions(model)
        samples = pipe(conds, steps=20, guidance=3.0, seed=0)
        nrow = 4 if model.text is not None else model.num_classes
        save_png(to_pil(samples.images, nrow=nrow), out / "samples" / f"step_{step:06d}.png")
        model.train()

    model.train()
    t0 = time.perf_counter()
    loss_sum, loss_n, t_log, step = 0.0, 0, time.perf_counter(), start
    with progress_bar() if not quiet else _NoBar() as bar:
        task = bar.add_task("diffuse train", total=cfg.steps, completed=start, info="")
        while step < cfg.steps:
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
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast(dev):
                pred = model(x_t, t, cond)
            loss = F.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(model)
            step += 1

            # --- bookkeeping ---------------------------------------------------------
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            elapsed = time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                ips = loss_n * cfg.batch_size / max(now - t_log, 1e-9)
                log.write(
                    {
                        "step": step,
                        "train_loss": loss_sum / loss_n,
                        "lr": lr,
                        "img_per_s": ips,
                        "elapsed_s": elapsed_before + elapsed,
                        "cpu_s": time.process_time(),  # this process, all threads
                    }
                )
                bar.update(task, info=f"{ips:.0f} img/s loss {loss_sum / loss_n:.4f}")
                loss_sum, loss_n, t_log = 0.0, 0, now
            bar.update(task, advance=1)
            total = elapsed_before + elapsed  # across resumes
            out_of_time = cfg.max_minutes is not None and total > cfg.max_minutes * 60
            if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
                checkpoint(step, elapsed_before + elapsed)
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                preview(step)
            if out_of_time:
                log.write({"event": "time_budget", "step": step, "max_minutes": cfg.max_minutes})
                break
    if cfg.sample_every and step % cfg.sample_every and step != cfg.steps:
        preview(step)
    plot_curves(out / "metrics.jsonl", out / "loss.png", keys=("train_loss",), title="loss")
    return out


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, *a, **k) -> None:
        return None


def _validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.steps >= 1, f"steps={cfg.steps} must be at least 1"),
        (cfg.batch_size >= 1, f"batch size {cfg.batch_size} must be at least 1"),
        (cfg.lr > 0, f"learning rate {cfg.lr} must be positive"),
        (0 <= cfg.cond_dropout < 1, f"cond_dropout={cfg.cond_dropout} must be in [0, 1)"),
        (
            cfg.max_minutes is None or cfg.max_minutes > 0,
            f"max_minutes={cfg.max_minutes} must be positive",
        ),
        (cfg.ckpt_every >= 1, f"ckpt_every={cfg.ckpt_every} must be at least 1"),
        (4 <= cfg.image_size <= 256, f"image size {cfg.image_size} must be in [4, 256]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise GlassboxError(msg + ".")
