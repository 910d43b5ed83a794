"""The trainable whole: U-Net + (text encoder or class labels), its config, and its files.

A run directory holds ``config.json`` (this module's :class:`DiffusionConfig`, the
vocabulary, the class names) and ``model.safetensors`` (EMA weights, which sampling
uses). Both are written atomically by :mod:`glassbox.checkpoint`.

The prompt encoder is either the model's own (:class:`TextConfig`, trained with the
U-Net) or the text encoder of a contrastive run (:class:`ClipTextConfig`, ``--text-encoder
clip:RUN``), whose weights and vocabulary are copied into the diffusion run so that it
loads without the contrastive run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from glassbox.checkpoint import (
    Loaded,
    load_checkpoint,
    load_json,
    load_tensors,
    load_weights,
    register_loader,
)
from glassbox.diffusion.schedulers import SchedulerConfig
from glassbox.diffusion.text import ClipTextEncoder, TextEncoder, Vocabulary, words
from glassbox.diffusion.unet import UNet, UNetConfig
from glassbox.errors import GlassboxError


@dataclass
class TextConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 16


@dataclass
class ClipTextConfig:
    """A contrastive run's text encoder as the prompt encoder (the shape of its
    Transformer, its vocabulary, and whether it learns with the U-Net)."""

    source: str  # the clip run the weights were copied from (a record; never read again)
    vocab: list[str]
    dim: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 32  # the contrastive run's max_text_len, <bos> and prefix included
    prefix: str = ""  # words read before every prompt ("a photo of" for builtin:scenes)
    frozen: bool = True


@dataclass
class DiffusionConfig:
    """Model + forward process + conditioning. Saved as config.json in every checkpoint."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    text: TextConfig | None = field(default_factory=TextConfig)  # None: class-conditioned
    vocab: list[str] | None = None  # the word list when text-conditioned
    class_names: list[str] | None = None  # the label names when class-conditioned
    data: str = "builtin:shapes"
    clip_text: ClipTextConfig | None = None  # set: a contrastive run's text encoder

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet"] = self.unet.to_dict()
        d["scheduler"] = self.scheduler.to_dict()
        if self.clip_text is None:
            del d["clip_text"]  # configs of own-encoder runs are unchanged
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
            clip_text=ClipTextConfig(**d["clip_text"]) if d.get("clip_text") else None,
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
        if config.clip_text is not None:
            c = config.clip_text
            n_prefix = len(words(c.prefix))
            known = f"the text encoder (from the contrastive run {c.source}) does not know"
            self.vocab = Vocabulary(c.vocab, max_length=c.max_length - n_prefix, known=known)
            self.text = ClipTextEncoder(c.vocab, c.max_length, c.dim, c.layers, c.heads, c.prefix)
            self.text.requires_grad_(not c.frozen)
        elif config.text is not None:
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
            ids = torch.zeros(batch, self.vocab.max_length, dtype=torch.long)
            ids[:, 0] = 1  # just <bos>: the empty prompt
            return ids
        return torch.full((batch,), self.num_classes, dtype=torch.long)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.text is not None:
            states, mask = self.text(cond)  # (B, L, D), (B, L)
            return self.unet(x, t, context=states, context_mask=mask)
        return self.unet(x, t, class_labels=cond)


# ---------------------------------------------------------------------------------------
# A contrastive run's text encoder
# ---------------------------------------------------------------------------------------

CLIP_PREFIXES = {"builtin:scenes": "a photo of"}  # how the built-in captions begin


def _clip_run(spec: str) -> tuple[Path, dict]:
    """``clip:RUN`` -> (RUN, its config.json), checked to be a contrastive run."""
    kind, sep, path = spec.partition(":")
    if kind != "clip" or not sep or not path:
        raise GlassboxError(
            f"--text-encoder {spec!r}: write clip:RUN with RUN a directory made by "
            "`glassbox clip train`, or leave it out to train the model's own text encoder."
        )
    run_dir = Path(path)
    if not (run_dir / "config.json").is_file():
        raise GlassboxError(
            f"--text-encoder {spec!r}: {run_dir} has no config.json; train a contrastive "
            f"model first with `glassbox clip train --out {run_dir}`."
        )
    record = load_json(run_dir / "config.json")
    if record.get("architecture") != "clip":
        raise GlassboxError(
            f"--text-encoder {spec!r}: {run_dir} holds a {record.get('stage', 'unknown')!r} "
            "checkpoint, not a contrastive one; point at a `glassbox clip train` run."
        )
    return run_dir, record


def clip_text_config(spec: str, captions: list[str], frozen: bool = True) -> ClipTextConfig:
    """The prompt encoder config for ``clip:RUN``. Every word of the training
    ``captions`` must be in RUN's vocabulary: its encoder has no vector for other words."""
    from glassbox.vision.clip import clip_config_from_record

    run_dir, record = _clip_run(spec)
    clip = clip_config_from_record(record, run_dir)
    vocab = set(clip.vocab)
    unknown = sorted({w for c in captions for w in words(c)} - vocab)
    if unknown:
        raise GlassboxError(
            f"The captions use words that the text encoder of {run_dir} does not know: "
            f"{', '.join(repr(w) for w in unknown)} (it knows {len(vocab) - 2}: "
            f"{' '.join(clip.vocab[2:])}). Train the contrastive run on captions with these "
            "words, or drop --text-encoder to train the model's own encoder."
        )
    return ClipTextConfig(
        source=str(run_dir), vocab=list(clip.vocab), dim=clip.text_dim,
        layers=clip.text_layers, heads=clip.text_heads, max_length=clip.max_text_len,
        prefix=CLIP_PREFIXES.get(record.get("data", ""), ""), frozen=frozen,
    )  # fmt: skip


def load_clip_text(model: Denoiser, spec: str) -> None:
    """Copy the text encoder weights of ``clip:RUN`` into ``model`` (before training)."""
    run_dir, _ = _clip_run(spec)
    weights = load_tensors(run_dir / "model.safetensors")
    text = {k.removeprefix("text."): v for k, v in weights.items() if k.startswith("text.")}
    model.text.transformer.load_state_dict(text, strict=True)


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
