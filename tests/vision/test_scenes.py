"""builtin:scenes: ground truth matches the pixels; captions and questions follow it."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from glassbox.diffusion.data import COLOURS
from glassbox.errors import GlassboxError
from glassbox.vision.scenes import (
    CELL_NAMES,
    HELDOUT_COMBOS,
    QUESTION_TYPES,
    load_image,
    load_scenes,
    make_scenes,
    sample_caption,
    zero_shot_prompts,
)


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(300, "train")


def test_object_count_is_connected_components(scenes):
    for img, scene in zip(scenes.images, scenes.scenes, strict=True):
        lit = img.numpy().max(0) > 60  # (H, W): shape pixels on a black canvas
        _, n = ndimage.label(lit)
        assert n == len(scene.objects)


def test_colours_and_positions_match_pixels(scenes):
    from glassbox.diffusion.data import COLOURS

    for img, scene in zip(scenes.images[:100], scenes.scenes[:100], strict=True):
        arr = img.numpy().transpose(1, 2, 0).astype(int)  # (H, W, 3)
        for o in scene.objects:
            y, x = int(o.y * arr.shape[0]), int(o.x * arr.shape[1])
            centre = arr[y, x]  # every shape covers its centre
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - centre).sum())
            assert nearest == o.colour


def test_splits_are_fixed_and_combos_held_out(scenes):
    again = make_scenes(300, "train")
    assert (again.images == scenes.images).all() and again.scenes == scenes.scenes
    for split in ("train", "heldout"):
        data = scenes if split == "train" else make_scenes(200, split)
        pairs = {(o.colour, o.shape) for s in data.scenes for o in s.objects}
        assert not pairs & HELDOUT_COMBOS
    combos = make_scenes(50, "combos")
    assert all(any((o.colour, o.shape) in HELDOUT_COMBOS for o in s.objects) for s in combos.scenes)


def test_questions_are_true_of_the_scene(scenes):
    kinds = {q.kind for qa in scenes.qa for q in qa}
    assert set(QUESTION_TYPES) <= kinds
    for scene, qa in zip(scenes.scenes, scenes.qa, strict=True):
        for q in qa:
            if q.kind == "count" and q.question == "How many shapes are there?":
                assert q.answer == str(len(scene.objects))
            if q.kind == "colour":
                shape = q.question.removeprefix("What colour is the ").removesuffix("?")
                assert [o.colour for o in scene.objects if o.shape == shape] == [q.answer]
            if q.kind == "exist":
                c, s = q.question.removeprefix("Is there a ").removesuffix("?").split()
                assert (q.answer == "yes") == any(
                    (o.colour, o.shape) == (c, s) for o in scene.objects
                )


def test_cell_questions_match_the_pixels(scenes):
    asked = 0
    for img, qa in zip(scenes.images, scenes.qa, strict=True):
        for q in (q for q in qa if q.kind == "cell"):
            phrase = q.question.removeprefix("What is ").removesuffix("?")
            col, row = next(c for c, name in CELL_NAMES.items() if name == phrase)
            block = img[:, 16 * row : 16 * row + 16, 16 * col : 16 * col + 16]  # (3, 16, 16)
            if q.answer == "nothing":
                assert block.max() == 0
            else:
                centre = block[:, 8, 8].numpy().astype(int)
                nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - centre).sum())
                assert q.answer.split()[1] == nearest
            asked += 1
    assert asked > 100  # every scene of 2-4 objects has one


def test_caption_keys_match_what_captions_say(scenes):
    rng = random.Random(0)
    for scene in scenes.scenes[:50]:
        text, key = sample_caption(scene, rng)
        assert text.startswith("a photo of ")
        assert scene.key(key[1]) == key
    assert zero_shot_prompts("colour")[0] == "a photo of a red shape"
    assert zero_shot_prompts("shape")[2] == "a photo of a triangle"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_give_clear_errors(tmp_path):
    with pytest.raises(GlassboxError, match="Cannot read image x.png"):
        load_image(b"not an image", name="x.png")
    with pytest.raises(GlassboxError, match="limit is 100"):
        load_image(_png(Image.new("RGB", (20, 20))), name="big.png", max_pixels=100)
    with pytest.raises(GlassboxError, match="mode 'I;16'"):
        load_image(_png(Image.new("I;16", (8, 8))), name="deep.png")
    truncated = _png(Image.effect_noise((64, 64), 50).convert("RGB"))[:200]
    with pytest.raises(GlassboxError, match="t.png"):
        load_image(truncated, name="t.png")
    rgba = load_image(_png(Image.new("RGBA", (30, 20), (255, 0, 0, 128))), image_size=16)
    assert rgba.shape == (3, 16, 16) and rgba[0].min() == 255


def test_user_folder(tmp_path):
    rows = []
    for i in range(10):
        Image.new("RGB", (40, 40), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append({"file": f"{i}.png", "caption": f"red {i}"})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "qa.jsonl").write_text(
        json.dumps({"file": "0.png", "question": "q", "answer": "a"})
    )
    train, held = load_scenes(str(tmp_path), "train"), load_scenes(str(tmp_path), "heldout")
    assert len(train) == 9 and len(held) == 1 and train.captions[0] == "red 0"
    assert train.qa[0][0].answer == "a"
    (tmp_path / "bad.png").write_bytes(b"junk")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "bad.png", "caption": "x"}))
    with pytest.raises(GlassboxError, match="bad.png"):
        load_scenes(str(tmp_path), "train")
    with pytest.raises(GlassboxError, match="builtin:scenes"):
        load_scenes(str(tmp_path / "missing"), "train")
