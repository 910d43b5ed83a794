"""End to end through the real CLI: train, sample, trajectory, eval, and bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


def glassbox(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glassbox.cli", "diffuse", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    r = glassbox(
        "train", "--data", "builtin:shapes", "--out", "run", "--preset", "tiny",
        "--image-size", "8", "--max-steps", "3", "--sample-interval", "3", cwd=root,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return root / "run"


@pytest.mark.slow
def test_train_sample_trajectory_eval(run_dir):
    root = run_dir.parent
    assert_png(run_dir / "loss.png")
    assert_png(run_dir / "samples" / "step_000003.png")
    r = glassbox("sample", "run", "--prompt", "a red circle on the left", "--steps", "5",
                 "--guidance", "3", "--num", "4", "--out", "grid.png", cwd=root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert_png(root / "grid.png")
    r = glassbox("sample", "run", "--prompt", "a blue square", "--steps", "6",
                 "--trajectory", "traj.png", "--num", "2", cwd=root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert_png(root / "traj.png")
    r = glassbox("eval", "run", "--samplers", "ddim:2,ddpm:3", "--guidance", "0,3", "--num",
                 "8", "--classifier-steps", "20", cwd=root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "ddpm 3" in r.stdout and "guidance 3" in r.stdout
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert len(results["rows"]) == 1 + 2 * 2
    assert all(0 <= row["accuracy"]["shape"] <= 1 for row in results["rows"])
    assert_png(run_dir / "eval" / "tradeoff.png")


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "run", "--prompt", "a red dragon", "--out", "x.png"], "dragon"),
        (["sample", "run", "--prompt", "a red circle", "--guidance", "-1", "--out", "x.png"],
         "guidance"),
        (["sample", "run", "--prompt", "a red circle", "--steps", "0", "--out", "x.png"],
         "num_inference_steps"),
        (["sample", "run", "--class", "3", "--out", "x.png"], "text-conditioned"),
        (["sample", "run", "--prompt", "a red circle"], "Nothing to write"),
        (["sample", "nowhere", "--prompt", "a red circle", "--out", "x.png"], "does not exist"),
        (["eval", "run", "--samplers", "euler:3"], "Bad sampler"),
        (["eval", "run", "--guidance", "a,b"], "Bad guidance"),
        (["train", "--data", "builtin:cifar", "--out", "new"], "Unknown data set"),
        (["train", "--out", "run", "--preset", "tiny"], "--resume"),
        (["train", "--out", "new", "--unet", "{bad"], "JSON"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_nonzero_without_traceback(run_dir, args, message):
    r = glassbox(*args, cwd=run_dir.parent)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
