import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glassbox.checkpoint import list_snapshots, load_json
from glassbox.track import read_metrics
from glassbox.train.pretrain import PretrainConfig, lr_at, pretrain


@pytest.fixture
def corpus_file(tmp_path, small_text) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(small_text)
    return str(path)


@pytest.fixture
def tok_file(tmp_path, tokenizer) -> str:
    tokenizer.save(tmp_path / "tokenizer.json")
    return str(tmp_path / "tokenizer.json")


def tiny_run(out, corpus_file, tok_file, **kw) -> PretrainConfig:
    base = dict(
        out=str(out), data=[corpus_file], tokenizer=tok_file, model="test", batch_size=4,
        max_steps=6, log_interval=1, eval_interval=3, eval_tokens=512, sample_tokens=0,
        checkpoint_interval=3, keep_last=5, warmup_steps=2, lr=3e-3, device="cpu",
    )  # fmt: skip
    return PretrainConfig(**(base | kw))


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tmp_path, corpus_file, tok_file, optimizer):
    full = tmp_path / "full"
    pretrain(tiny_run(full, corpus_file, tok_file, optimizer=optimizer))
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step_00000006")  # died after step 3's snapshot
    pretrain(tiny_run(interrupted, corpus_file, tok_file, optimizer=optimizer, resume=True))
    a, b = losses(full), losses(interrupted)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # bit-exact
    assert a[6] < a[1]


def test_metrics_files_and_snapshots(tmp_path, corpus_file, tok_file):
    run = tmp_path / "run"
    last = pretrain(tiny_run(run, corpus_file, tok_file, keep_last=1))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "loss.png"):
        assert (run / name).is_file()
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for key in ("step", "elapsed_s", "tokens_per_s", "train_loss", "val_loss", "val_bpb"):
        assert key in evals[-1]
    assert 0 < last["val_bpb"] < 10
    assert [p.name for p in list_snapshots(run)] == ["step_00000006"]
    state = load_json(run / "checkpoints" / "step_00000006" / "trainer" / "state.json")
    assert state["step"] == 6 and state["tokens_seen"] == 6 * 4 * 64


def test_fresh_run_refuses_to_overwrite_an_existing_one(tmp_path, corpus_file, tok_file):
    from glassbox.errors import GlassboxError

    run = tmp_path / "run"
    pretrain(tiny_run(run, corpus_file, tok_file, max_steps=3))
    with pytest.raises(GlassboxError, match="already holds a run"):
        pretrain(tiny_run(run, corpus_file, tok_file, max_steps=3))


def test_same_seed_is_deterministic(tmp_path, corpus_file, tok_file):
    pretrain(tiny_run(tmp_path / "a", corpus_file, tok_file, max_steps=3))
    pretrain(tiny_run(tmp_path / "b", corpus_file, tok_file, max_steps=3))
    pretrain(tiny_run(tmp_path / "c", corpus_file, tok_file, max_steps=3, seed=7))
    assert losses(tmp_path / "a") == losses(tmp_path / "b") != losses(tmp_path / "c")


def test_schedule_warmup_then_cosine_to_floor():
    cfg = PretrainConfig(lr=1e-3, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 10, 0) == pytest.approx(1e-3, rel=0.03)
    assert lr_at(cfg, 100, 0) == pytest.approx(1e-4)
    timed = PretrainConfig(
        lr=1e-3, warmup_steps=10, max_steps=10**9, max_minutes=1.0, min_lr_ratio=0.1
    )
    assert lr_at(timed, 50, 60.0) == pytest.approx(1e-4)  # time budget spent: fully decayed


def test_two_process_gloo_ddp_step(tmp_path, corpus_file):
    """Rank 0 learns the tokenizer and rank 1 loads it; both step together."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", "29533", "-m", "glassbox.cli", "pretrain", "--out", str(out),
        "--data", corpus_file, "--vocab-size", "300", "--model", "test", "--batch-size", "2",
        "--max-steps", "2", "--eval-interval", "2", "--eval-tokens", "256",
        "--sample-tokens", "0", "--device", "cpu",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(
        (out / "checkpoints" / "step_00000002" / "trainer" / "state.json").read_text()
    )
    assert state["world_size"] == 2
    assert state["tokens_seen"] == 2 * (2 * 64 * 2)  # steps * (batch * seq * processes)
