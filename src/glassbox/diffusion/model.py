"""The trainable whole: U-Net + (text encoder or class labels), its config, and its files.

A run directory holds ``config.json`` (this module's :class:`DiffusionConfig`, the
vocabulary, the class names) and ``model.safetensors`` (EMA weights, which sampling
uses). Both are written atomically by :mod:`glassbox.checkpoint`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from glassbox.checkpoint import Loaded, load_checkpoint, load_weights, register_loader
from glassbox.diffusion.schedulers import SchedulerConfig
from glassbox.diffusion.text import TextEncoder, Vocabulary
from glassbox.diffusion.unet import UNet, UNetConfig
from glassbox.errors import GlassboxError


@dataclass
class TextConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 16


@dataclass
class DiffusionConfig:
    """Model + forward process + conditioning. Saved as config.json in every checkpoint."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    text: TextConfig | None = field(default_factory=TextConfig)  # None: class-conditioned
    vocab: list[str] | None = None  # the word list when text-conditioned
    class_names: list[str] | None = None  # the label names when class-conditioned
    data: str = "builtin:shapes"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet"] = self.unet.to_dict()
        d["scheduler"] = self.scheduler.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        return cls(
            unet=UNetConfig.from_dict(d["unet"]),
            scheduler=SchedulerConfig.from_dict(d["scheduler"]),
            text=TextConfig(**d["text"]) if d.get("text") else None,
            vocab=d.get("vocab"),
            class_names=d.get("class_names"),
            data=d.get("data", ""),
        )


class Denoiser(nn.Module):
    """U-Net plus its conditioning front end; ``forward(x_t, t, cond)`` -> eps or v.

    ``cond`` is a token-id tensor (B, L) for text models (all-padding-but-BOS = the
    empty prompt = unconditional), or a label tensor (B,) for class models (label
    ``num_classes`` = unconditional).
    """

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        if config.text is not None:
            if not config.vocab:
                raise GlassboxError("A text-conditioned model needs a vocabulary in its config.")
            self.vocab = Vocabulary(config.vocab, max_length=config.text.max_length)
            t = config.text
            self.text = TextEncoder(len(self.vocab), t.max_length, t.dim, t.layers, t.heads)
        else:
            self.vocab = None
            self.text = None
        self.unet = UNet(config.unet)

    @property
    def num_classes(self) -> int:
        return self.config.unet.num_classes

    def null_condition(self, batch: int) -> torch.Tensor:
        """The unconditional input used for guidance and conditioning dropout."""
        if self.text is not None:
            ids = torch.zeros(batch, self.config.text.max_length, dtype=torch.long)
            ids[:, 0] = 1  # just <bos>: the empty prompt
            return ids
        return torch.full((batch,), self.num_classes, dtype=torch.long)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.text is not None:
            states, mask = self.text(cond)  # (B, L, D), (B, L)
            return self.unet(x, t, context=states, context_mask=mask)
        return self.unet(x, t, class_labels=cond)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(run_dir: str | Path, device: torch.device | str = "cpu") -> Denoiser:
    """Load a trained model (EMA weights) from a run directory, in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GlassboxError(
            f"Run directory {run_dir} does not exist; train one first with "
            f"`glassbox diffuse train --out {run_dir}`."
        )
    loaded = load_checkpoint(run_dir, device)
    if loaded.architecture != "denoiser":
        raise GlassboxError(
            f"{run_dir} holds a {loaded.record.get('stage', 'unknown')!r} checkpoint, not a "
            "diffusion model; point at a directory made by `glassbox diffuse train`."
        )
    return loaded.model


@register_loader("denoiser")
def _load_denoiser(path: Path, record: dict, device: torch.device) -> Loaded:
    """A diffusion checkpoint: config.json (DiffusionConfig) + model.safetensors (EMA)."""
    config = DiffusionConfig.from_dict(record["model"])
    model = Denoiser(config)
    load_weights(model, path / "model.safetensors", torch.device("cpu"), tied=False)
    return Loaded(model.to(device).eval(), model.vocab, record, "denoiser")
