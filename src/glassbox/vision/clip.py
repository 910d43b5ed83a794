"""A contrastive image-text model (CLIP), small enough to train on two CPU cores.

    image (B, 3, 48, 48) -> ViT: 6x6 patches -> 64 patch tokens + [CLS] -> blocks
        -> [CLS] state -> image_proj -> L2-normalize -> u (B, E)
    caption -> word ids (B, L) -> glassbox Transformer (causal) -> state at the last
        word -> text_proj -> L2-normalize -> v (B, E)
    logits = exp(t) * u @ v^T (B, B),  t learnable, exp(t) clamped to <= 100 as in CLIP
    loss = (CE(logits, diag) + CE(logits^T, diag)) / 2              symmetric InfoNCE

**Why a ViT.** Patch embedding is to pixels what the token embedding is to text, so the
image side reads like the language model; its per-patch outputs are the image tokens
the vision-language model (:mod:`glassbox.vision.vlm`) splices into a prompt, in
LLaVA's manner, with their positions intact. On 48x48 scenes with 6x6 patches that is
64 tokens, cheap enough for a CPU; shapes span 1-3 patches, so attention over patches
has to relate neighbours, which four blocks do.

**Captions naming some attributes.** A built-in caption names a random subset of the
attributes ("a photo of a red shape", "a photo of two shapes"), so one caption fits
many images of a batch. Those are positives too: the loss's target for a caption is
spread evenly over every image it truly describes (computed from the scenes' ground
truth), which is plain InfoNCE when each caption fits only its own image.

**Zero-shot classification** compares an image with one prompt per class ("a photo of
a red shape", "a photo of a shape on the left" ...) and picks the nearest.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.checkpoint import Loaded, load_weights, register_loader
from glassbox.config import ModelConfig
from glassbox.diffusion.text import Vocabulary
from glassbox.errors import GlassboxError
from glassbox.model import Transformer
from glassbox.vision.scenes import (
    ATTRIBUTES,
    IMAGE_SIZE,
    NUMBERS,
    SceneSet,
    sample_caption,
    zero_shot_prompts,
)

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class ClipConfig:
    """The shape of a contrastive model (saved in config.json)."""

    image_size: int = IMAGE_SIZE
    patch: int = 8
    vision_dim: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_text_len: int = 32
    embed_dim: int = 64
    vocab: tuple[str, ...] = ()
    stem: str = "conv"  # conv (two stride-2 3x3 convolutions, then patches) or patch
    pool: str = "cls"  # the image vector: the [CLS] state, or the mean of all states

    def validate(self) -> None:
        if self.stem not in ("conv", "patch"):
            raise GlassboxError(f"--stem {self.stem!r}: use conv or patch.")
        if self.stem == "conv" and self.patch % 4:
            raise GlassboxError(f"--patch {self.patch} must be a multiple of 4 with --stem conv.")
        if self.image_size % self.patch:
            raise GlassboxError(
                f"--image-size {self.image_size} is not a multiple of --patch {self.patch}."
            )
        for name in ("vision_dim", "text_dim"):
            if getattr(self, name) % getattr(self, name.replace("dim", "heads")):
                raise GlassboxError(f"--{name.replace('_', '-')} must divide by its heads.")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


class ViT(nn.Module):
    """Patch embedding, learned positions, a [CLS] token, pre-norm encoder blocks.
    ``forward`` gives every token's final state (B, 1 + N, dim).

    The patch embedding is a strided convolution (``stem="patch"``, the original ViT)
    or a convolutional stem (``"conv"``: two stride-2 3x3 convolutions, then patches of
    patch/4): "early convolutions help transformers see better" (Xiao et al., 2021);
    here it is what lifts zero-shot shape accuracy, as edges inside a patch are found
    by the convolutions rather than by one linear map."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        d = cfg.vision_dim
        if cfg.stem == "conv":
            self.patch_embed = nn.Sequential(
                nn.Conv2d(3, d // 2, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(d // 2, d, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(d, d, cfg.patch // 4, stride=cfg.patch // 4),
            )  # fmt: skip
        else:
            self.patch_embed = nn.Conv2d(3, d, cfg.patch, stride=cfg.patch)
        n = cfg.grid**2
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.vision_dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, cfg.vision_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.vision_dim, cfg.vision_heads, 4 * cfg.vision_dim, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, cfg.vision_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.vision_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1 + N, dim): the blocks' input ([CLS] and the
        stem's patch vectors, plus positions). Each patch vector sees only its own pixels."""
        p = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        return torch.cat([self.cls.expand(p.shape[0], -1, -1), p], dim=1) + self.pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1 + N, dim): [CLS] first, then patches row-major."""
        return self.norm(self.blocks(self.embed(x)))


class ClipModel(nn.Module):
    """Image and text encoders projected into one space, with a learnable temperature."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.vocab = Vocabulary(list(config.vocab), config.max_text_len)
        self.vision = ViT(config)
        text_cfg = ModelConfig(
            vocab_size=len(config.vocab), context_length=config.max_text_len,
            n_layer=config.text_layers, n_head=config.text_heads, d_model=config.text_dim,
            tie_embeddings=False,
        )  # fmt: skip
        self.text = Transformer(text_cfg)
        self.text.lm_head = nn.Identity()  # an encoder: hidden states are what we read
        self.image_proj = nn.Linear(config.vision_dim, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(config.text_dim, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> unit vectors (B, E)."""
        h = self.vision(x)  # (B, 1 + N, dim)
        h = h[:, 0] if self.config.pool == "cls" else h.mean(1)
        return F.normalize(self.image_proj(h), dim=-1)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Right-padded word ids (B, L) -> unit vectors (B, E), read at the last word."""
        h = self.text.hidden(ids)  # (B, L, C)
        last = (ids != 0).sum(1).clamp(min=1) - 1  # (B,)
        return F.normalize(self.text_proj(h[torch.arange(ids.shape[0]), last]), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Captions -> unit vectors (B, E); unknown words raise GlassboxError."""
        ids = self.vocab.batch(texts)  # (B, max_text_len), right-padded
        ids = ids[:, : int((ids != 0).sum(1).max())]  # causal: trailing padding changes nothing
        return self.encode_ids(ids.to(self.logit_scale.device))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


def info_nce(
    u: torch.Tensor,  # (B, E) image vectors, unit length
    v: torch.Tensor,  # (B, E) text vectors, unit length
    scale: torch.Tensor | float,
    positives: torch.Tensor | None = None,  # (B, B) bool: text j describes image i
) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of image->text and text->image cross-entropy over
    ``scale * u @ v^T``. Targets are the diagonal, or spread evenly over ``positives``."""
    logits = scale * u @ v.T  # (B, B)
    if positives is None:
        target = torch.arange(u.shape[0], device=u.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    p = positives.float()
    i2t = -(p / p.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    t2i = -(p.T / p.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (i2t + t2i) / 2


# ---------------------------------------------------------------------------------------
# Captions for a batch
# ---------------------------------------------------------------------------------------


def batch_captions(
    data: SceneSet, idx: list[int], rng: random.Random
) -> tuple[list[str], torch.Tensor | None]:
    """A caption per image and the (B, B) positives mask (None: one positive each)."""
    if data.scenes is None:
        texts = [data.captions[i] for i in idx]  # type: ignore[index]
        same = torch.tensor([[a == b for b in texts] for a in texts])
        return texts, same
    pairs = [sample_caption(data.scenes[i], rng) for i in idx]
    texts = [t for t, _ in pairs]
    pos = torch.zeros(len(idx), len(idx), dtype=torch.bool)
    for j, (_, key) in enumerate(pairs):
        attrs = key[1]
        for i, s in enumerate(idx):
            pos[i, j] = data.scenes[s].key(attrs) == key
    return texts, pos


def builtin_vocabulary() -> list[str]:
    """Every word a built-in caption or prompt can use, sorted (pad and bos first)."""
    words = {"a", "photo", "of", "shape", "shapes", "and", *NUMBERS}
    words |= {w for a in ATTRIBUTES for p in zero_shot_prompts(a) for w in p.split()}
    return Vocabulary.build([" ".join(sorted(words))]).tokens


# ---------------------------------------------------------------------------------------
# Evaluation: zero-shot, retrieval, the picture of the space
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def embed_images(model: ClipModel, data: SceneSet, batch_size: int = 256) -> torch.Tensor:
    device = model.logit_scale.device
    out = [
        model.encode_image(data.floats(slice(i, i + batch_size)).to(device))
        for i in range(0, len(data), batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def zero_shot(model: ClipModel, data: SceneSet, u: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy per attribute on the single-object scenes of ``data`` (prompt per value)."""
    if data.scenes is None:
        raise GlassboxError("Zero-shot accuracy needs scenes with ground truth (builtin:scenes).")
    u = embed_images(model, data) if u is None else u
    single = [i for i, s in enumerate(data.scenes) if len(s.objects) == 1]
    out: dict[str, float] = {}
    for attr, values in ATTRIBUTES.items():
        v = model.encode_text(zero_shot_prompts(attr))  # (K, E)
        pred = (u[single] @ v.T).argmax(1).tolist()
        truth = [values.index(getattr(data.scenes[i].objects[0], attr)) for i in single]
        out[attr] = sum(p == t for p, t in zip(pred, truth, strict=True)) / max(1, len(single))
    out["n_single"] = len(single)
    return out


@torch.no_grad()
def retrieval(model: ClipModel, data: SceneSet, ks=(1, 5), u=None) -> dict[str, float]:
    """Recall@k both ways between images and their full captions. A hit is any of the
    top k whose caption text equals the image's (identical scenes share a caption)."""
    texts = [s.caption() for s in data.scenes] if data.scenes else list(data.captions or [])
    if not texts:
        raise GlassboxError("Retrieval needs captions: builtin:scenes or a captions.jsonl.")
    u = embed_images(model, data) if u is None else u
    full = ["a photo of " + t for t in texts] if data.scenes else texts
    v = torch.cat([model.encode_text(full[i : i + 256]) for i in range(0, len(full), 256)])
    sim = u @ v.T  # (N, N)
    same = torch.tensor([[a == b for b in texts] for a in texts])  # (N, N)
    out: dict[str, float] = {}
    for k in ks:
        i2t = same.gather(1, sim.topk(k, dim=1).indices).any(1).float().mean().item()
        t2i = same.T.gather(1, sim.T.topk(k, dim=1).indices).any(1).float().mean().item()
        out[f"i2t_recall@{k}"], out[f"t2i_recall@{k}"] = i2t, t2i
    return out


@torch.no_grad()
def plot_space(model: ClipModel, data: SceneSet, path: Path, n: int = 400) -> Path:
    """PNG: image embeddings (dots) and prompt embeddings (stars, "a photo of a red
    circle" for every colour+shape) projected together by PCA, coloured by attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glassbox.diffusion.data import COLOURS, SHAPES

    single = [i for i, s in enumerate(data.scenes or []) if len(s.objects) == 1][:n]
    if not single:
        raise GlassboxError("The embedding picture needs single-object builtin:scenes.")
    u = embed_images(model, SceneSet(data.images[single]))
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    v = model.encode_text([f"a photo of a {c} {s}" for c, s in combos])
    both = torch.cat([u, v]).float().cpu()
    centred = both - both.mean(0)
    proj = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:2].T  # (N+K, 2)
    pu, pv = proj[: len(u)], proj[len(u) :]
    objs = [data.scenes[i].objects[0] for i in single]  # type: ignore[index]
    markers = {"circle": "o", "square": "s", "triangle": "^", "cross": "P"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, attr in zip(axes, ("colour", "shape"), strict=True):
        for (c, s), (x, y) in zip(combos, pv.tolist(), strict=True):
            face = [ch / 255 for ch in COLOURS[c]] if attr == "colour" else "black"
            ax.scatter(x, y, marker="*", s=260, c=[face], edgecolors="black", zorder=3)
            if attr == "shape":
                ax.annotate(s, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        for o, (x, y) in zip(objs, pu.tolist(), strict=True):
            face = [ch / 255 for ch in COLOURS[o.colour]] if attr == "colour" else "grey"
            ax.scatter(x, y, marker=markers[o.shape] if attr == "shape" else "o", s=14,
                       c=[face], alpha=0.6)  # fmt: skip
        ax.set_title(f"coloured by {attr}: dots = images, stars = prompts")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("The shared space (PCA of image and text embeddings together)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def clip_config_from_record(record: dict, path: Path) -> ClipConfig:
    try:
        d = dict(record["clip"])
        d["vocab"] = tuple(d["vocab"])
        return ClipConfig(**d)
    except (KeyError, TypeError) as e:
        raise GlassboxError(f"{path / 'config.json'} has no valid 'clip' section ({e}).") from e


@register_loader("clip")
def _load_clip(path: Path, record: dict, device: torch.device) -> Loaded:
    """A contrastive run: config.json (architecture clip) + model.safetensors."""
    cfg = clip_config_from_record(record, path)
    with torch.device(device):
        model = ClipModel(cfg)
    load_weights(model, path / "model.safetensors", device, tied=False)
    return Loaded(model.eval(), model.vocab, record, "clip")


def clip_record(cfg: ClipConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a contrastive run ('model' keeps the generic loader checks happy)."""
    from glassbox import __version__

    d = asdict(cfg) | {"vocab": list(cfg.vocab)}
    head = {"architecture": "clip", "stage": "clip", "glassbox_version": __version__}
    return head | {"model": {"name": "clip"}, "clip": d} | (extra or {})
