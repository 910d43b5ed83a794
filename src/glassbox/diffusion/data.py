"""Image data that ships with the project, and the user's own folders.

* ``builtin:shapes`` -- coloured shapes drawn with Pillow on a black canvas (4x
  supersampled, then box-filtered down, so edges are anti-aliased). Every image has
  a shape, colour, size and position, and captions such as "a small green triangle at
  the top". Nothing is downloaded: the set is a function of its seed.
* ``builtin:shapes-holdout`` -- the same, except that three colour+shape pairs (red
  cross, blue triangle, yellow square: ``builtin:scenes``' held-out pairs) never appear,
  so ``diffuse eval --prompts combos`` can ask for combinations the model never saw.
* ``builtin:digits`` -- scikit-learn's 1797 handwritten 8x8 digits (they ship inside
  the package), upsampled bilinearly; class-conditioned on the digit.
* a folder (``path`` or ``folder:path``) with ``captions.jsonl`` or ``captions.csv``:
  rows of ``file`` plus ``caption`` (text-conditioned) or ``label`` (class-conditioned).

Images are float tensors in [-1, 1], shape (N, C, H, W).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from glassbox.errors import GlassboxError

SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 210),
}
SIZES = ["small", "large"]
POSITIONS = {  # name -> (phrase, centre as a fraction of the canvas)
    "left": ("on the left", (0.30, 0.50)),
    "right": ("on the right", (0.70, 0.50)),
    "top": ("at the top", (0.50, 0.30)),
    "bottom": ("at the bottom", (0.50, 0.70)),
    "center": ("in the center", (0.50, 0.50)),
}
# builtin:shapes-holdout leaves these colour+shape pairs out (the pairs builtin:scenes
# holds out, so a contrastive run on scenes has not seen them either).
HELDOUT_COMBOS = (("red", "cross"), ("blue", "triangle"), ("yellow", "square"))
SHAPE_ATTRIBUTES = {
    "shape": SHAPES,
    "colour": list(COLOURS),
    "size": SIZES,
    "position": list(POSITIONS),
}


@dataclass
class ImageSet:
    """Images plus what they are conditioned on (captions or labels) and what they show."""

    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    captions: list[list[str]] | None = None  # per image, one or more caption variants
    labels: torch.Tensor | None = None  # (N,) class ids, class-conditioned sets
    class_names: list[str] | None = None
    # Ground truth for the evaluation classifier: (N, A) ids, one column per attribute.
    attributes: torch.Tensor | None = None
    attribute_names: dict[str, list[str]] = field(default_factory=dict)
    heldout_combos: tuple[tuple[str, str], ...] = ()  # (colour, shape) pairs never shown

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def conditioning(self) -> str:
        return "text" if self.captions is not None else "class"


# ---------------------------------------------------------------------------------------
# builtin:shapes
# ---------------------------------------------------------------------------------------


def shape_caption(shape: str, colour: str, size: str | None, position: str | None) -> str:
    """'a small green triangle at the top'; size and position are optional."""
    words = ["a"] + ([size] if size else []) + [colour, shape]
    if position:
        words.append(POSITIONS[position][0])
    return " ".join(words)


def render_shape(
    shape: str,
    rgb: tuple[int, int, int],
    size_px: float,
    centre: tuple[float, float],
    image_size: int,
    supersample: int = 4,
) -> Image.Image:
    """Draw one shape (diameter ``size_px`` canvas pixels, centred at ``centre``) on black."""
    s = supersample
    big = Image.new("RGB", (image_size * s, image_size * s), (0, 0, 0))
    draw = ImageDraw.Draw(big)
    cx, cy, r = centre[0] * s, centre[1] * s, size_px * s / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        q = r * 0.9  # a square looks bigger than a circle of the same width
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=rgb)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
    else:
        raise GlassboxError(f"Unknown shape {shape!r}; use one of {', '.join(SHAPES)}.")
    return big.resize((image_size, image_size), Image.Resampling.BOX)


def make_shapes(
    n: int, image_size: int = 16, seed: int = 0, exclude: tuple[tuple[str, str], ...] = ()
) -> ImageSet:
    """``n`` random shapes with four caption variants each (size/position said or not);
    no image shows a (colour, shape) pair of ``exclude`` (they are redrawn)."""
    if n < 1:
        raise GlassboxError(f"The shapes data set needs at least 1 image, got n={n}.")
    rng = random.Random(seed)
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    attrs = torch.zeros(n, 4, dtype=torch.long)
    captions = []
    for i in range(n):
        a = [rng.randrange(len(v)) for v in SHAPE_ATTRIBUTES.values()]
        while (list(COLOURS)[a[1]], SHAPES[a[0]]) in exclude:
            a = [rng.randrange(len(v)) for v in SHAPE_ATTRIBUTES.values()]
        shape, colour = SHAPES[a[0]], list(COLOURS)[a[1]]
        size, position = SIZES[a[2]], list(POSITIONS)[a[3]]
        frac = (0.30, 0.36) if size == "small" else (0.52, 0.60)
        size_px = image_size * rng.uniform(*frac)
        fx, fy = POSITIONS[position][1]
        jitter = 0.05 * image_size
        centre = (
            fx * image_size + rng.uniform(-jitter, jitter),
            fy * image_size + rng.uniform(-jitter, jitter),
        )
        rgb = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
        images[i] = np.asarray(render_shape(shape, rgb, size_px, centre, image_size))
        attrs[i] = torch.tensor(a)
        captions.append(
            [
                shape_caption(shape, colour, size, position),
                shape_caption(shape, colour, None, position),
                shape_caption(shape, colour, size, None),
                shape_caption(shape, colour, None, None),
            ]
        )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W)
    return ImageSet(x, captions=captions, attributes=attrs, attribute_names=SHAPE_ATTRIBUTES,
                    heldout_combos=tuple(exclude))  # fmt: skip


# ---------------------------------------------------------------------------------------
# builtin:digits
# ---------------------------------------------------------------------------------------


def make_digits(split: str, image_size: int = 16, heldout_fraction: float = 0.2) -> ImageSet:
    """scikit-learn's 8x8 digits upsampled to ``image_size``; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    n_held = int(len(y) * heldout_fraction)
    idx = perm[:n_held] if split == "heldout" else perm[n_held:]
    names = [str(i) for i in range(10)]
    return ImageSet(
        x[idx],
        labels=y[idx],
        class_names=names,
        attributes=y[idx][:, None],
        attribute_names={"digit": names},
    )


# ---------------------------------------------------------------------------------------
# User folders
# ---------------------------------------------------------------------------------------


def _read_rows(folder: Path) -> list[dict]:
    if (folder / "captions.jsonl").is_file():
        path = folder / "captions.jsonl"
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise GlassboxError(f"{path} line {n} is not valid JSON ({e}).") from e
    elif (folder / "captions.csv").is_file():
        with open(folder / "captions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise GlassboxError(
            f"{folder} has no captions.jsonl or captions.csv. Add one with a row per image: "
            '{"file": "cat.png", "caption": "a black cat"} (or "label" instead of "caption").'
        )
    if not rows:
        raise GlassboxError(f"The caption file in {folder} has no rows; add one per image.")
    return rows


def load_folder(folder: Path, image_size: int, split: str, channels: int = 3) -> ImageSet:
    """Images listed in the folder's caption file, centre-cropped and resized; 10% held out."""
    rows = _read_rows(folder)
    key = "caption" if all(r.get("caption") for r in rows) else "label"
    if key == "label" and not all(r.get("label") not in (None, "") for r in rows):
        raise GlassboxError(
            f"Every row of the caption file in {folder} needs a 'file' and either a "
            "'caption' (all rows) or a 'label' (all rows)."
        )
    n_held = max(1, len(rows) // 10) if len(rows) >= 10 else 0
    chosen = rows[len(rows) - n_held :] if split == "heldout" else rows[: len(rows) - n_held]
    if not chosen:
        raise GlassboxError(f"{folder} has too few images ({len(rows)}) for a held-out split.")
    images = []
    for r in chosen:
        path = folder / str(r.get("file", ""))
        if not path.is_file():
            raise GlassboxError(f"Image {path} listed in the caption file of {folder} is missing.")
        try:
            img = Image.open(path).convert("RGB" if channels == 3 else "L")
        except OSError as e:
            raise GlassboxError(f"Cannot read image {path} ({e}).") from e
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
        arr = np.asarray(img, dtype=np.float32).reshape(image_size, image_size, channels)
        images.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1)
    x = torch.stack(images)
    if key == "caption":
        return ImageSet(x, captions=[[str(r["caption"])] for r in chosen])
    names = sorted({str(r["label"]) for r in rows})
    y = torch.tensor([names.index(str(r["label"])) for r in chosen])
    return ImageSet(
        x, labels=y, class_names=names, attributes=y[:, None], attribute_names={"label": names}
    )


def load_data(spec: str, split: str = "train", image_size: int = 16, n: int = 20000) -> ImageSet:
    """``builtin:shapes[-holdout]``, ``builtin:digits``, or a folder; ``split`` is train
    or heldout."""
    if split not in ("train", "heldout"):
        raise GlassboxError(f"split must be 'train' or 'heldout', got {split!r}.")
    if spec in ("builtin:shapes", "builtin:shapes-holdout"):
        # Held-out shapes come from a different seed: new images, same distribution.
        return make_shapes(
            n if split == "train" else max(1, n // 10),
            image_size,
            seed=0 if split == "train" else 1,
            exclude=HELDOUT_COMBOS if spec.endswith("-holdout") else (),
        )
    if spec == "builtin:digits":
        return make_digits(split, image_size)
    if spec.startswith("builtin:"):
        raise GlassboxError(
            f"Unknown data set {spec!r}; use builtin:shapes, builtin:shapes-holdout, "
            "builtin:digits, or a folder with "
            "captions.jsonl / captions.csv."
        )
    folder = Path(spec.removeprefix("folder:"))
    if not folder.is_dir():
        raise GlassboxError(
            f"Data {spec!r} is neither builtin:shapes, builtin:digits nor an existing folder."
        )
    return load_folder(folder, image_size, split)
