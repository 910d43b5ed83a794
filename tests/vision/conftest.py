"""Tiny contrastive and vision-language checkpoints, trained for a few steps."""

from __future__ import annotations

import pytest

from glassbox import checkpoint as ckpt
from glassbox.vision.train import VLMTrainConfig, train_vlm


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory, tokenizer) -> str:
    import torch

    from glassbox.config import ModelConfig
    from glassbox.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("test", vocab_size=tokenizer.vocab_size, context_length=128)
    out = tmp_path_factory.mktemp("lm") / "sft"
    ckpt.save_model_dir(out, Transformer(cfg), tokenizer, "sft")
    return str(out)


@pytest.fixture(scope="session")
def vlm_run(tmp_path_factory, clip_run, lm_run) -> str:
    out = tmp_path_factory.mktemp("vlm") / "run"
    cfg = VLMTrainConfig(
        base=lm_run, vision=clip_run, out=str(out), num_images=64, batch_size=4, max_steps=2,
        eval_interval=2, checkpoint_interval=2, eval_limit=2, device="cpu",
    )  # fmt: skip
    train_vlm(cfg)
    return str(out)


@pytest.fixture(scope="session")
def resumed_weights():
    """``run(train, Config, tmp_path, settings)``: train 4 steps with snapshots every 2,
    copy the run, delete its last snapshot (as if it died after step 2), resume it;
    assert the resumed weights equal the uninterrupted run's and return them."""
    import shutil

    import torch

    def run(train, config, tmp_path, settings: dict) -> dict:
        full, cut = tmp_path / "full", tmp_path / "cut"
        train(config(out=str(full), **settings))
        shutil.copytree(full, cut)
        shutil.rmtree(cut / "checkpoints" / "step_00000004")
        train(config(out=str(cut), resume=True, **settings))
        a = ckpt.load_tensors(full / "model.safetensors")
        b = ckpt.load_tensors(cut / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        return a

    return run
