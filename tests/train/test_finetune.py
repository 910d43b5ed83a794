"""The shared fine-tuning layer: start from a checkpoint, loop, snapshot, resume exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from glassbox.checkpoint import load_model_dir
from glassbox.errors import GlassboxError
from glassbox.track import read_metrics
from glassbox.train.finetune import (
    FinetuneConfig,
    load_start,
    open_stage,
    restore_stage,
    save_stage,
    train_loop,
)
from glassbox.train.optim import build_optimizers


def _run(cfg: FinetuneConfig, explicit=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """A minimal stage: next-token loss on random token batches drawn from ``gen``."""
    run, device = open_stage(cfg, "probe", explicit)
    cfg = run.cfg
    model, tok, _ = load_start(cfg.base, device)
    optimizers = build_optimizers(model, "adamw", cfg.lr, (cfg.beta1, cfg.beta2))
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if run.snapshot is not None:
        step, _ = restore_stage(run, model, optimizers, gen)

    def one_step(step: int) -> dict[str, float]:
        x = torch.randint(0, tok.vocab_size, (cfg.batch_size, 17), generator=gen)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        return {"train_loss": loss.item(), "tokens": x.numel()}

    def save(step: int) -> None:
        save_stage(run, step, model, tok, optimizers, gen, state={"probe": step})

    last = train_loop(run, step, optimizers, one_step, save, lambda: {"val_loss": 1.0})
    return last, {k: v.clone() for k, v in model.state_dict().items()}


def test_loop_writes_a_loadable_checkpoint_and_resumes_exactly(base_dir, tmp_path):
    common = dict(base=str(base_dir), batch_size=2, log_interval=1, eval_interval=3,
                  warmup_steps=1, lr=1e-3)  # fmt: skip
    straight, w_straight = _run(FinetuneConfig(out=str(tmp_path / "a"), max_steps=6, **common))
    _run(FinetuneConfig(out=str(tmp_path / "b"), max_steps=6, checkpoint_interval=3, **common))
    # kill the second run's last snapshot: resuming from step 3 must give step 6's weights
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    resumed, w_resumed = _run(
        FinetuneConfig(out=str(tmp_path / "b"), max_steps=6, resume=True, **common),
        explicit={"resume", "out"},
    )
    assert resumed["step"] == straight["step"] == 6
    for k in w_straight:
        torch.testing.assert_close(w_resumed[k], w_straight[k], rtol=0, atol=0)
    model, _, record = load_model_dir(tmp_path / "a")
    assert record["stage"] == "probe" and record["base"] == str(base_dir)
    assert record["train"]["max_steps"] == 6
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 for r in rows) and "val_loss" in rows[2]
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0


def test_bad_settings_are_refused_by_name(base_dir, tmp_path):
    with pytest.raises(GlassboxError, match="starting checkpoint"):
        open_stage(FinetuneConfig(out=str(tmp_path / "x")), "probe", None)
    with pytest.raises(GlassboxError, match="--lr=2"):
        open_stage(FinetuneConfig(base=str(base_dir), lr=2.0), "probe", None)
    cfg = dataclasses.replace(FinetuneConfig(base=str(tmp_path / "nope")), out=str(tmp_path / "y"))
    run, device = open_stage(cfg, "probe", None)
    with pytest.raises(GlassboxError, match="does not exist"):
        load_start(cfg.base, device)


def test_a_run_that_fails_on_its_input_can_be_rerun_in_the_same_out(base_dir, tmp_path):
    """Nothing is written before training produces something, so fixing the input and
    running the same command again is not refused as 'already holds files'."""
    cfg = FinetuneConfig(base=str(tmp_path / "typo"), out=str(tmp_path / "run"))
    run, device = open_stage(cfg, "probe", None)
    with pytest.raises(GlassboxError, match="does not exist"):
        load_start(cfg.base, device)
    assert list((tmp_path / "run").iterdir()) == []
    fixed = dataclasses.replace(cfg, base=str(base_dir), max_steps=1)
    last, _ = _run(fixed)
    assert last["step"] == 1 and (tmp_path / "run" / "config.yaml").is_file()
