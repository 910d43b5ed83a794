"""Scenes of 1-4 coloured shapes with their ground truth, captions and questions.

``builtin:scenes`` reuses the diffusion set's vocabulary and Pillow drawing
(:mod:`glassbox.diffusion.data`: shapes, colours, sizes, positions), on a 48x48
canvas:

* single-object scenes (40%): one shape at a named position (left, right, top, bottom,
  center, with jitter), small or large -- what zero-shot classification is measured on;
* multi-object scenes (2-4 objects, 20% each): shapes in distinct cells of a 3x3 grid,
  never touching (so the object count is the number of connected components).

Every scene carries its objects (shape, colour, size, centre), so captions ("a photo of
a small red circle on the left", "a photo of a red shape, a blue cross and a green
square", "a photo of three shapes") and question/answer pairs of five types (colour,
shape, existence, count, relation) are computed from the truth, never guessed.

Splits are fixed by seed: ``train`` (seed 0), ``heldout`` (seed 1, new scenes from the
same distribution) and ``combos`` (seed 2): scenes that contain at least one of the
colour+shape pairs in :data:`HELDOUT_COMBOS`, which the other two splits never show, to
test composition (a model that has seen red things and crosses, but never a red cross).

A user folder holds images plus ``captions.jsonl`` (``{"file", "caption"}`` rows) and/or
``qa.jsonl`` (``{"file", "question", "answer"}`` rows); images are checked by
:func:`load_image` (unreadable, odd mode or too many pixels: a GlassboxError naming the
file).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glassbox.diffusion.data import COLOURS, POSITIONS, SHAPES, SIZES, render_shape
from glassbox.errors import GlassboxError

IMAGE_SIZE = 48
HELDOUT_COMBOS = frozenset({("red", "cross"), ("blue", "triangle"), ("yellow", "square")})
"""(colour, shape) pairs that the train and heldout splits never contain."""
ATTRIBUTES = {"shape": SHAPES, "colour": list(COLOURS), "size": SIZES, "position": list(POSITIONS)}
QUESTION_TYPES = ("colour", "shape", "exist", "count", "relation", "cell")
CELL_NAMES = {
    (0, 0): "in the top left corner", (1, 0): "at the top", (2, 0): "in the top right corner",
    (0, 1): "on the left", (1, 1): "in the center", (2, 1): "on the right",
    (0, 2): "in the bottom left corner", (1, 2): "at the bottom",
    (2, 2): "in the bottom right corner",
}  # fmt: skip
"""The cells of the 3x3 layout grid of multi-object scenes, (column, row) -> name."""
COUNT_WEIGHTS = (0.4, 0.2, 0.2, 0.2)  # scenes with 1, 2, 3, 4 objects
SIZE_FRACTION = {"small": (0.16, 0.19), "large": (0.26, 0.28)}  # diameter / canvas
NUMBERS = ["no", "one", "two", "three", "four"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SPLIT_SEEDS = {"train": 0, "heldout": 1, "combos": 2}
FULL_CAPTION_P = 0.4
"""Share of captions naming every attribute; the others name a random subset."""
CAPTION_ATTRIBUTE_P = {"shape": 0.75, "colour": 0.5, "size": 0.5, "position": 0.5}
"""How often a partial caption names each attribute. Shape is named more often: colour
and position are learned from few examples, shape (edges inside a patch) needs the most
contrast (docs/multimodal.md)."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest image (width x height) a user folder or a request may hold."""
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "YCbCr")
"""Pillow modes converted to RGB; others (16-bit, float) are refused by name."""


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: attributes plus its centre as fractions of the canvas."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    position: str | None = None  # named position (single-object scenes only)

    def phrase(self, attrs: Sequence[str] = ("size", "colour", "shape")) -> str:
        """'a small red circle' with only the attributes named (no shape: 'shape')."""
        words = ["a"]
        words += [self.size] if "size" in attrs else []
        words += [self.colour] if "colour" in attrs else []
        words.append(self.shape if "shape" in attrs else "shape")
        if "position" in attrs and self.position:
            words.append(POSITIONS[self.position][0])
        return " ".join(words)


@dataclass(frozen=True)
class QA:
    """A question about a scene, its one right answer and its type."""

    kind: str  # one of QUESTION_TYPES, or "caption"
    question: str
    answer: str


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image: its objects, left to right."""

    objects: tuple[SceneObject, ...]

    def caption(self) -> str:
        """The full description, objects left to right: 'a small red circle on the left'."""
        if len(self.objects) == 1:
            return self.objects[0].phrase(("size", "colour", "shape", "position"))
        return join_phrases([o.phrase() for o in self.objects])

    def key(self, attrs: Sequence[str]) -> tuple:
        """The scene seen through ``attrs`` only: what a caption naming just those fixes."""
        proj = sorted(tuple(str(getattr(o, a)) for a in attrs) for o in self.objects)
        return (len(self.objects), tuple(attrs), tuple(proj))


def join_phrases(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------


def _random_object(rng: random.Random, single: bool, cell: tuple[int, int] | None) -> SceneObject:
    shape, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES)
    if single:
        position = rng.choice(list(POSITIONS))
        fx, fy = POSITIONS[position][1]
        x, y = fx + rng.uniform(-0.05, 0.05), fy + rng.uniform(-0.05, 0.05)
        return SceneObject(shape, colour, size, x, y, position)
    col, row = cell  # type: ignore[misc]
    j = 0.8 / IMAGE_SIZE  # less than a pixel: neighbours never touch
    x, y = (2 * col + 1) / 6 + rng.uniform(-j, j), (2 * row + 1) / 6 + rng.uniform(-j, j)
    return SceneObject(shape, colour, size, x, y)


def random_scene(rng: random.Random, split: str = "train") -> Scene:
    """A scene for ``split``: train/heldout avoid HELDOUT_COMBOS, combos contains one."""
    while True:
        n = rng.choices([1, 2, 3, 4], weights=COUNT_WEIGHTS)[0]
        cells = rng.sample([(c, r) for c in range(3) for r in range(3)], n)
        objs = [_random_object(rng, n == 1, None if n == 1 else cell) for cell in cells]
        has_combo = any((o.colour, o.shape) in HELDOUT_COMBOS for o in objs)
        if has_combo == (split == "combos"):
            return Scene(tuple(sorted(objs, key=lambda o: (round(o.x, 2), o.y))))


def draw_scene(scene: Scene, rng: random.Random, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as (H, W, 3) uint8: each shape drawn by the diffusion set's renderer."""
    canvas = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    for o in scene.objects:
        size_px = image_size * rng.uniform(*SIZE_FRACTION[o.size])
        rgb = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[o.colour])
        centre = (o.x * image_size, o.y * image_size)
        layer = np.asarray(render_shape(o.shape, rgb, size_px, centre, image_size))
        np.maximum(canvas, layer, out=canvas)  # black background: shapes never overlap
    return canvas


# ---------------------------------------------------------------------------------------
# Captions (for the contrastive model) and questions (for the VLM)
# ---------------------------------------------------------------------------------------


def sample_caption(scene: Scene, rng: random.Random) -> tuple[str, tuple]:
    """A caption naming a random subset of attributes, and the key of what it fixes
    (two scenes fit the caption exactly when their ``key``s for those attributes match)."""
    names = ["shape", "colour", "size"] + (["position"] if len(scene.objects) == 1 else [])
    if rng.random() < FULL_CAPTION_P:
        attrs = names
    else:
        attrs = [a for a in names if rng.random() < CAPTION_ATTRIBUTE_P[a]]
    n = len(scene.objects)
    if not attrs:
        text = "a shape" if n == 1 else f"{NUMBERS[n]} shapes"
    else:
        text = join_phrases([o.phrase(attrs) for o in scene.objects])
    return "a photo of " + text, scene.key(attrs)


def zero_shot_prompts(attribute: str) -> list[str]:
    """One prompt per value of ``attribute``, phrased as training captions phrase it."""
    if attribute not in ATTRIBUTES:
        raise GlassboxError(f"Unknown attribute {attribute!r}; use one of {list(ATTRIBUTES)}.")
    out = []
    for v in ATTRIBUTES[attribute]:
        obj = SceneObject(v if attribute == "shape" else "circle", v, v, 0.5, 0.5, v)
        out.append("a photo of " + obj.phrase([attribute]))
    return out


def _relation(scene: Scene, target: SceneObject, side: str) -> str | None:
    """What is on ``side`` of ``target``: one object's phrase, 'nothing', or None (several)."""
    sign = -1 if side == "left" else 1
    others = [o for o in scene.objects if sign * (o.x - target.x) > 0.15]
    if len(others) > 1:
        return None
    return others[0].phrase(("colour", "shape")) if others else "nothing"


def scene_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """One question of each type that the scene can answer unambiguously, plus a caption."""
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    out = [QA("caption", "Describe the image.", scene.caption())]
    unique_shapes = [s for s in SHAPES if shapes.count(s) == 1]
    if unique_shapes:
        s = rng.choice(unique_shapes)
        c = objs[shapes.index(s)].colour
        out.append(QA("colour", f"What colour is the {s}?", c))
    unique_colours = [c for c in COLOURS if colours.count(c) == 1]
    if unique_colours:
        c = rng.choice(unique_colours)
        out.append(QA("shape", f"What shape is the {c} object?", objs[colours.index(c)].shape))
    present = {(o.colour, o.shape) for o in objs}
    if rng.random() < 0.5:
        c, s = rng.choice(sorted(present))
    else:
        c, s = rng.choice([(c, s) for c in COLOURS for s in SHAPES])
    out.append(QA("exist", f"Is there a {c} {s}?", "yes" if (c, s) in present else "no"))
    what = rng.choice(["shape", "colour", "all"])
    if what == "shape":
        s = rng.choice(SHAPES)
        out.append(QA("count", f"How many {PLURAL[s]} are there?", str(shapes.count(s))))
    elif what == "colour":
        c = rng.choice(list(COLOURS))
        out.append(QA("count", f"How many {c} shapes are there?", str(colours.count(c))))
    else:
        out.append(QA("count", "How many shapes are there?", str(len(objs))))
    if unique_colours and len(objs) > 1:
        c = rng.choice(unique_colours)
        side = rng.choice(["left", "right"])
        answer = _relation(scene, objs[colours.index(c)], side)
        if answer is not None:
            out.append(QA("relation", f"What is {side} of the {c} shape?", answer))
    return out


def cell_question(scene: Scene, rng: random.Random) -> QA | None:
    """'What is in the top left corner?' -> 'a red square' or 'nothing', for scenes of 2-4
    objects (one per cell of the 3x3 grid; a cell with an object 3 times in 4). It asks
    for one place's object, so the model learns to read each image token on its own."""
    if len(scene.objects) < 2:
        return None
    by_cell = {(min(2, int(o.x * 3)), min(2, int(o.y * 3))): o for o in scene.objects}
    cell = rng.choice(sorted(by_cell) if rng.random() < 0.75 else sorted(CELL_NAMES))
    obj = by_cell.get(cell)
    answer = obj.phrase(("colour", "shape")) if obj else "nothing"
    return QA("cell", f"What is {CELL_NAMES[cell]}?", answer)


# ---------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------


@dataclass
class SceneSet:
    """Images (N, 3, H, W) uint8 with their captions and questions.

    Built-in scenes have ``scenes`` (the ground truth; captions are sampled from it);
    user folders have fixed ``captions`` and ``qa`` lists instead.
    """

    images: torch.Tensor  # (N, 3, H, W) uint8
    scenes: list[Scene] | None = None
    captions: list[str] | None = None
    qa: list[list[QA]] = field(default_factory=list)  # per image

    def __len__(self) -> int:
        return self.images.shape[0]

    def floats(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images ``idx`` as float (B, 3, H, W) in [-1, 1]."""
        x = self.images if idx is None else self.images[idx]
        return x.float() / 127.5 - 1


def make_scenes(n: int, split: str = "train", seed: int | None = None) -> SceneSet:
    """``n`` scenes of ``split`` (train, heldout or combos), the same for the same seed."""
    if split not in SPLIT_SEEDS:
        raise GlassboxError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}.")
    if n < 1:
        raise GlassboxError(f"The scenes data set needs at least 1 image, got n={n}.")
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    scenes = [random_scene(rng, split) for _ in range(n)]
    images = np.stack([draw_scene(s, rng) for s in scenes])  # (N, H, W, 3)
    qa = [scene_questions(s, rng) for s in scenes]
    cell_rng = random.Random(f"cells-{split}-{seed}")  # the other questions stay as they were
    for q, s in zip(qa, scenes, strict=True):
        q += [c] if (c := cell_question(s, cell_rng)) is not None else []
    return SceneSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), scenes, qa=qa)


def load_image(
    source: str | Path | bytes,
    image_size: int = IMAGE_SIZE,
    name: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """An image file (or its bytes) as (3, image_size, image_size) uint8: converted to
    RGB, centre-cropped to a square, resized. Unreadable files, unsupported modes and
    images over ``max_pixels`` raise GlassboxError naming ``name`` and the limit."""
    import io

    name = name or str(source)
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise GlassboxError(f"Cannot read image {name}: not a PNG/JPEG/... file ({e}).") from e
    if img.width * img.height > max_pixels:
        raise GlassboxError(
            f"Image {name} is {img.width}x{img.height} = {img.width * img.height} pixels; the "
            f"limit is {max_pixels}. Downscale it first."
        )
    if img.mode not in IMAGE_MODES:
        raise GlassboxError(
            f"Image {name} has mode {img.mode!r}, which is not converted to RGB; save it as an "
            f"8-bit image (modes {', '.join(IMAGE_MODES)})."
        )
    try:
        img = img.convert("RGB")
    except (OSError, ValueError) as e:
        raise GlassboxError(f"Cannot decode image {name}: the file is truncated ({e}).") from e
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GlassboxError(f"{path} line {n} is not valid JSON ({e}).") from e
            if not isinstance(row, dict) or not isinstance(row.get("file"), str):
                raise GlassboxError(f"{path} line {n} needs a 'file' (the image's name).")
            rows.append(row)
    return rows


def load_folder(folder: Path, split: str, image_size: int = IMAGE_SIZE) -> SceneSet:
    """A folder with captions.jsonl and/or qa.jsonl; the last 10% of files are held out."""
    cap_path, qa_path = folder / "captions.jsonl", folder / "qa.jsonl"
    if not cap_path.is_file() and not qa_path.is_file():
        raise GlassboxError(
            f"{folder} has neither captions.jsonl nor qa.jsonl. Add rows like "
            '{"file": "a.png", "caption": "a red circle"} or '
            '{"file": "a.png", "question": "What colour is it?", "answer": "red"}.'
        )
    captions: dict[str, str] = {}
    questions: dict[str, list[QA]] = {}
    for row in _jsonl(cap_path) if cap_path.is_file() else []:
        if not isinstance(row.get("caption"), str):
            raise GlassboxError(f"{cap_path}: the row for {row['file']} has no 'caption'.")
        captions[row["file"]] = row["caption"]
    for row in _jsonl(qa_path) if qa_path.is_file() else []:
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise GlassboxError(f"{qa_path}: the row for {row['file']} needs question and answer.")
        qa = QA(str(row.get("type", "qa")), row["question"], row["answer"])
        questions.setdefault(row["file"], []).append(qa)
    files = sorted(set(captions) | set(questions))
    n_held = len(files) // 10
    if split != "train" and n_held == 0:
        raise GlassboxError(f"{folder} has {len(files)} images; a held-out split needs >= 10.")
    chosen = files[len(files) - n_held :] if split != "train" else files[: len(files) - n_held]
    images = []
    for f in chosen:
        path = folder / f
        if not path.is_file():
            raise GlassboxError(f"Image {path}, listed in {folder}, does not exist.")
        images.append(load_image(path, image_size))
    return SceneSet(
        torch.stack(images),
        captions=[captions.get(f, "") for f in chosen] if captions else None,
        qa=[questions.get(f, []) for f in chosen],
    )


def load_scenes(spec: str, split: str = "train", n: int = 20000) -> SceneSet:
    """``builtin:scenes`` (``n`` train scenes, n/10 held out) or a folder."""
    if spec == "builtin:scenes":
        return make_scenes(n if split == "train" else max(1, n // 10), split)
    if spec.startswith("builtin:"):
        raise GlassboxError(f"Unknown data set {spec!r}; use builtin:scenes or a folder.")
    folder = Path(spec.removeprefix("folder:"))
    if not folder.is_dir():
        raise GlassboxError(f"Data {spec!r} is neither builtin:scenes nor an existing folder.")
    return load_folder(folder, "train" if split == "train" else "heldout")
