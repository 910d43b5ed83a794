"""The contrastive model: InfoNCE by hand, zero-shot learning, checkpoints, eval."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from glassbox import checkpoint as ckpt
from glassbox.cli import app
from glassbox.vision.clip import info_nce


def test_info_nce_equals_hand_computation():
    u = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    v = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    s = 2.0
    sim = [
        [s * sum(a * b for a, b in zip(ui, vj, strict=True)) for vj in v.tolist()]
        for ui in u.tolist()
    ]

    def ce(rows):  # mean over rows of -log softmax at the diagonal
        return sum(math.log(sum(math.exp(x) for x in r)) - r[i] for i, r in enumerate(rows)) / 2

    cols = [list(c) for c in zip(*sim, strict=True)]
    expected = (ce(sim) + ce(cols)) / 2
    assert info_nce(u, v, s).item() == pytest.approx(expected, rel=1e-6)
    # Multi-positive targets reduce to the plain loss when only the diagonal is positive.
    eye = torch.eye(2, dtype=torch.bool)
    assert info_nce(u, v, s, eye).item() == pytest.approx(expected, rel=1e-6)


def test_zero_shot_learns_a_separable_set(tmp_path, tiny_clip_options):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(40):
        colour = ["red", "blue"][i % 2]
        rgb = (230, 40, 40) if colour == "red" else (50, 90, 240)
        Image.new("RGB", (48, 48), rgb).save(data / f"{i}.png")
        rows.append({"file": f"{i}.png", "caption": f"a photo of a {colour} shape"})
    (data / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    args = ["clip", "train", "--data", str(data), "--out", str(out), "--max-steps", "15"]
    args += ["--lr", "3e-3", "--warmup-steps", "2"]
    for k, v in tiny_clip_options.items():
        if k != "num_images":
            args += [f"--{k.replace('_', '-')}", str(v)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model = ckpt.load_checkpoint(out).model
    with torch.no_grad():
        prompts = model.encode_text(["a photo of a red shape", "a photo of a blue shape"])
        x = torch.stack([torch.tensor([0.8, -0.7, -0.7]), torch.tensor([-0.6, -0.3, 0.9])])
        u = model.encode_image(x[:, :, None, None].expand(2, 3, 48, 48))
    assert (u @ prompts.T).argmax(1).tolist() == [0, 1]


def test_checkpoint_resume_and_eval(clip_run, tmp_path):
    loaded = ckpt.load_checkpoint(clip_run)
    assert loaded.architecture == "clip"
    u = loaded.model.encode_text(["a photo of a red circle", "a photo of two shapes"])
    assert u.shape == (2, 16) and torch.allclose(u.norm(dim=-1), torch.ones(2))
    result = CliRunner().invoke(app, ["clip", "eval", clip_run, "--num", "40", "--out",
                                      str(tmp_path / "ev")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| heldout |" in result.output and (tmp_path / "ev" / "space.png").is_file()
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(report) == {"heldout", "combos"}
    assert 0 <= report["heldout"]["zero_shot"]["colour"] <= 1


def test_unknown_prompt_words_are_named(clip_run):
    from glassbox.errors import GlassboxError

    model = ckpt.load_checkpoint(clip_run).model
    with pytest.raises(GlassboxError, match="'zebra'"):
        model.encode_text(["a photo of a zebra"])


def test_resume_is_exact(tmp_path, tiny_clip_options, resumed_weights):
    from glassbox.vision.train import ClipTrainConfig, train_clip

    settings = tiny_clip_options | {"checkpoint_interval": 2, "eval_interval": 10, "max_steps": 4}
    resumed_weights(train_clip, ClipTrainConfig, tmp_path, settings)
