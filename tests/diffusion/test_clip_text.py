"""A diffusion model conditioned on a contrastive run's text encoder (--text-encoder clip:RUN):
trains, samples, round-trips without the contrastive run, and rejects words it cannot read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from glassbox.checkpoint import load_tensors
from glassbox.diffusion.data import HELDOUT_COMBOS, load_data
from glassbox.diffusion.evaluate import eval_conditions
from glassbox.diffusion.model import DiffusionConfig, load_model
from glassbox.diffusion.pipeline import DiffusionPipeline
from glassbox.errors import GlassboxError
from glassbox.train.diffusion import preset, train


def clip_text_weights(clip_run: str) -> dict[str, torch.Tensor]:
    w = load_tensors(f"{clip_run}/model.safetensors")
    return {k.removeprefix("text."): v for k, v in w.items() if k.startswith("text.")}


def tiny(out, clip_run, data="builtin:shapes", **kw):
    return preset("tiny", data, image_size=8, out=str(out), text_encoder=f"clip:{clip_run}", **kw)


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory, clip_run):
    out = tmp_path_factory.mktemp("diff") / "run"
    return train(tiny(out, clip_run, max_steps=3), quiet=True).out


def test_trains_on_the_frozen_clip_encoder_and_round_trips(diffusion_run, clip_run):
    record = json.loads((diffusion_run / "config.json").read_text())["model"]
    assert record["text"] is None and record["vocab"] is None
    ct = record["clip_text"]
    assert ct["frozen"] and ct["prefix"] == "a photo of" and ct["dim"] == 32
    with open(f"{clip_run}/config.json") as f:
        assert ct["vocab"] == json.load(f)["clip"]["vocab"]
    assert record["unet"]["context_dim"] == 32

    # Self-contained: the contrastive run is not needed to load or sample.
    moved = diffusion_run.parent / "moved_clip"
    shutil.move(clip_run, moved)
    try:
        model = load_model(diffusion_run)
        pipe = DiffusionPipeline(model)
        a = pipe(["a red circle on the left", ""], steps=3, seed=0).images
    finally:
        shutil.move(moved, clip_run)
    assert a.shape == (2, 3, 8, 8) and torch.isfinite(a).all()
    b = DiffusionPipeline(load_model(diffusion_run))(
        ["a red circle on the left", ""], steps=3, seed=0
    ).images
    assert torch.equal(a, b)

    # Frozen: the saved (EMA) text weights are the contrastive run's, bit for bit; the
    # U-Net learned; and the raw weights of the snapshot kept the encoder too.
    saved = load_tensors(diffusion_run / "model.safetensors")
    for k, v in clip_text_weights(clip_run).items():
        assert torch.equal(saved[f"text.transformer.{k}"], v), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert not any(p.requires_grad for p in model.text.parameters())


def test_prompts_read_like_the_contrastive_captions(diffusion_run):
    model = load_model(diffusion_run)
    ids = model.vocab.batch(["a red circle"])
    states, mask = model.text(ids)
    # <bos> "a photo of" "a red circle": 1 + 3 + 3 tokens, no padding left over.
    assert states.shape == (1, 7, 32) and mask.all()
    full = model.text.transformer.hidden(
        torch.tensor([[model.vocab.index[w] for w in "<bos> a photo of a red circle".split()]])
    )
    assert torch.allclose(states, full)
    # The empty prompt (guidance's unconditional branch) is <bos> plus the prefix.
    _, null_mask = model.text(model.null_condition(2))
    assert null_mask.sum(1).tolist() == [4, 4]


def test_words_outside_the_clip_vocabulary_are_clear_errors(diffusion_run, tmp_path, clip_run):
    pipe = DiffusionPipeline(load_model(diffusion_run))
    with pytest.raises(GlassboxError, match=r"text encoder .* does not know: 'dog'"):
        pipe(["a red dog"], steps=2)
    # At training time: captions with words the encoder lacks stop the run up front.
    folder = tmp_path / "pets"
    folder.mkdir()
    rows = []
    for i in range(12):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")
        rows.append({"file": f"{i}.png", "caption": "a fluffy dog" if i % 2 else "a red circle"})
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(GlassboxError, match=r"does not know: 'dog', 'fluffy' \(it knows"):
        train(tiny(tmp_path / "pets_run", clip_run, data=str(folder)), quiet=True)


def test_bad_text_encoder_specs_are_clear_errors(tmp_path, diffusion_run, clip_run):
    cases = [
        ("runs/clip", "write clip:RUN"),
        (f"clip:{tmp_path / 'missing'}", "has no config.json"),
        (f"clip:{diffusion_run}", "not a contrastive one"),
    ]
    for spec, message in cases:
        cfg = preset("tiny", image_size=8, out=str(tmp_path / "x"), text_encoder=spec)
        with pytest.raises(GlassboxError, match=message):
            train(cfg, quiet=True)
    cfg = tiny(tmp_path / "digits", clip_run, data="builtin:digits")
    with pytest.raises(GlassboxError, match="class-conditioned"):
        train(cfg, quiet=True)


def test_unfrozen_encoder_learns(tmp_path, clip_run):
    run = train(tiny(tmp_path / "tuned", clip_run, freeze_text_encoder=False), quiet=True).out
    assert not json.loads((run / "config.json").read_text())["model"]["clip_text"]["frozen"]
    saved = load_tensors(run / "model.safetensors")
    changed = [k for k, v in clip_text_weights(clip_run).items()
               if not torch.equal(saved[f"text.transformer.{k}"], v)]  # fmt: skip
    assert changed


def test_own_encoder_configs_are_unchanged():
    """Runs without --text-encoder keep the config.json they always had, and old ones load."""
    cfg = DiffusionConfig(vocab=["<pad>", "<bos>", "a"])
    d = cfg.to_dict()
    assert "clip_text" not in d
    assert DiffusionConfig.from_dict(d) == cfg


def test_holdout_shapes_never_show_the_held_out_pairs():
    data = load_data("builtin:shapes-holdout", "train", image_size=8, n=400)
    names = data.attribute_names
    pairs = {(names["colour"][c], names["shape"][s]) for s, c, _, _ in data.attributes.tolist()}
    assert len(pairs) == 20 - len(HELDOUT_COMBOS) and not pairs & set(HELDOUT_COMBOS)
    seen, _ = eval_conditions(data, 64, seed=0, prompts="train")
    combos, wanted = eval_conditions(data, 64, seed=0, prompts="combos")
    held = [f"{c} {s}" for c, s in HELDOUT_COMBOS]
    assert not any(h in p for p in seen for h in held)
    assert all(any(h in p for h in held) for p in combos)
    assert {p.split()[3] for p in combos} == {"cross", "triangle", "square"}
    assert wanted.shape == (64, 4)
    full = load_data("builtin:shapes", "train", image_size=8, n=400)
    with pytest.raises(GlassboxError, match="builtin:shapes-holdout"):
        eval_conditions(full, 8, seed=0, prompts="combos")


def glassbox(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glassbox.cli", "diffuse", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_cli_train_sample_eval_combos_and_playground(tmp_path, clip_run):
    r = glassbox("train", "--data", "builtin:shapes-holdout", "--out", "run", "--preset", "tiny",
                 "--image-size", "8", "--max-steps", "2", "--text-encoder", f"clip:{clip_run}",
                 cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = glassbox("sample", "run", "--prompt", "a red cross", "--steps", "3", "--num", "2",
                 "--out", "grid.png", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "grid.png").is_file()
    r = glassbox("sample", "run", "--prompt", "a red unicorn", "--out", "x.png", cwd=tmp_path)
    assert r.returncode != 0 and "'unicorn'" in r.stderr and "Traceback" not in r.stderr
    r = glassbox("eval", "run", "--samplers", "ddim:2", "--guidance", "3", "--num", "8",
                 "--classifier-steps", "5", "--prompts", "combos", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["prompts"] == "combos" and results["rows"][1]["n"] == 8

    from glassbox.serve.endpoints.playground_diffusion import (
        DiffusionRequest,
        load_diffusion_runs,
        trajectory,
    )

    pipe = load_diffusion_runs([f"shapes={tmp_path / 'run'}"], "cpu")["shapes"]
    frames = trajectory(pipe, DiffusionRequest(run="shapes", prompt="a blue square", steps=3))
    assert len(frames) == 4 and frames[-1]["x0"].startswith("data:image/png;base64,")
