"""Training: checkpoints round-trip, resume is exact, data sets load, errors are clear."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from glassbox.checkpoint import latest_snapshot, load_tensors
from glassbox.diffusion.data import SHAPE_ATTRIBUTES, load_data, make_shapes
from glassbox.diffusion.model import load_model
from glassbox.diffusion.pipeline import DiffusionPipeline
from glassbox.errors import GlassboxError
from glassbox.train.diffusion import preset, train


def tiny(out, data: str = "builtin:shapes", **kw):
    return preset("tiny", data, image_size=8, out=str(out), **kw)


def fit(cfg):
    return train(cfg, quiet=True).out


def test_checkpoint_round_trip(tmp_path):
    run = fit(tiny(tmp_path / "run", max_steps=3))
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["stage"] == "diffusion" and "circle" in cfg["model"]["vocab"]
    model = load_model(run)
    saved = load_tensors(run / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # Loaded twice, the model samples the same images.
    a = DiffusionPipeline(model)(["a red circle"], steps=3, seed=0).images
    b = DiffusionPipeline(load_model(run))(["a red circle"], steps=3, seed=0).images
    assert torch.equal(a, b)


def test_training_changes_the_weights_and_lowers_the_loss(tmp_path):
    run = fit(tiny(tmp_path / "run", max_steps=30, lr=3e-3, checkpoint_interval=30))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.parametrize("data", ["builtin:shapes", "builtin:digits"])
def test_resume_is_exact(tmp_path, data):
    straight = fit(tiny(tmp_path / "a", data, max_steps=4, checkpoint_interval=2))
    fit(tiny(tmp_path / "b", data, max_steps=2, checkpoint_interval=2))
    resumed = fit(tiny(tmp_path / "b", data, max_steps=4, checkpoint_interval=2, resume=True))
    for name in ("model", "optimizer0", "rng"):
        sa = load_tensors(latest_snapshot(straight) / f"trainer/{name}.safetensors")
        sb = load_tensors(latest_snapshot(resumed) / f"trainer/{name}.safetensors")
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    assert torch.equal(
        load_tensors(straight / "model.safetensors")["unet.conv_out.weight"],
        load_tensors(resumed / "model.safetensors")["unet.conv_out.weight"],
    )
    steps = [
        json.loads(x).get("step") for x in (resumed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps.count(3) == 1  # metrics after the snapshot are not duplicated


def test_train_refuses_to_overwrite_and_resume_needs_a_snapshot(tmp_path):
    fit(tiny(tmp_path / "run", max_steps=2))
    with pytest.raises(GlassboxError, match="already holds a run"):
        fit(tiny(tmp_path / "run", max_steps=2))
    with pytest.raises(GlassboxError, match="no snapshot"):
        fit(tiny(tmp_path / "empty", max_steps=2, resume=True))
    with pytest.raises(GlassboxError, match="--max-steps=0"):
        fit(tiny(tmp_path / "x", max_steps=0))
    with pytest.raises(GlassboxError, match="Unknown preset"):
        preset("huge", "builtin:shapes")


def test_shapes_are_rendered_with_matching_captions():
    s = make_shapes(40, image_size=16, seed=3)
    assert s.images.shape == (40, 3, 16, 16)
    assert s.images.min() >= -1 and s.images.max() <= 1
    for caps, attrs in zip(s.captions, s.attributes.tolist(), strict=True):
        shape, colour = SHAPE_ATTRIBUTES["shape"][attrs[0]], SHAPE_ATTRIBUTES["colour"][attrs[1]]
        assert all(shape in c and colour in c for c in caps)
        assert SHAPE_ATTRIBUTES["size"][attrs[2]] in caps[0]
    # Red shapes are red: their brightest channel is R.
    red = [i for i, a in enumerate(s.attributes.tolist()) if a[1] == 0]
    for i in red:
        img = (s.images[i] + 1) / 2
        assert img[0].max() > 0.8 and img[2].max() < 0.4
    assert torch.equal(make_shapes(5, 16, seed=9).images, make_shapes(5, 16, seed=9).images)


def test_digits_split_is_disjoint_and_complete():
    tr, ho = load_data("builtin:digits", "train"), load_data("builtin:digits", "heldout")
    assert len(tr) + len(ho) == 1797
    assert tr.images.shape[1:] == (1, 16, 16)
    assert set(tr.labels.tolist()) == set(range(10))
    assert torch.equal(tr.images, load_data("builtin:digits", "train").images)  # fixed split


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_user_folder_with_captions(tmp_path, fmt):
    rows = []
    for i, colour in enumerate(["red", "blue", "green"] * 4):
        rgb = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}[colour]
        Image.new("RGB", (20, 12), rgb).save(tmp_path / f"{i}.png")
        rows.append({"file": f"{i}.png", "caption": f"a {colour} box"})
    if fmt == "jsonl":
        (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    else:
        body = "file,caption\n" + "".join(f"{r['file']},{r['caption']}\n" for r in rows)
        (tmp_path / "captions.csv").write_text(body)
    data = load_data(str(tmp_path), "train", image_size=8)
    assert data.images.shape == (11, 3, 8, 8) and data.captions[0] == ["a red box"]
    assert torch.allclose(data.images[0, 0], torch.ones(8, 8))  # red channel at full
    run = fit(tiny(tmp_path / "run", str(tmp_path), max_steps=2))
    assert load_model(run).vocab.encode("a blue box")


def test_bad_data_specs_give_clear_errors(tmp_path):
    with pytest.raises(GlassboxError, match="Unknown data set"):
        load_data("builtin:cifar")
    with pytest.raises(GlassboxError, match="neither"):
        load_data(str(tmp_path / "missing"))
    with pytest.raises(GlassboxError, match="captions.jsonl or captions.csv"):
        load_data(str(tmp_path))
    (tmp_path / "captions.jsonl").write_text('{"file": "nope.png", "caption": "x"}\n')
    with pytest.raises(GlassboxError, match="missing"):
        load_data(str(tmp_path))


def test_sample_grids_use_words_the_model_knows(tmp_path):
    """A user's captions may share a word with the built-in preview ("triangle") but not
    its colours: the grid must come from the user's own captions, not crash."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (8, 8), (255, 128 * (i % 2), 0)).save(data / f"{i}.png")
        rows.append({"file": f"{i}.png", "caption": f"an orange triangle number {i}"})
    (data / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run = fit(tiny(tmp_path / "run", str(data), max_steps=2, sample_interval=2))
    with Image.open(run / "samples" / "step_000002.png") as im:
        assert im.size[0] > 8
