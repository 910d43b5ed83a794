import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from glassbox.checkpoint import list_snapshots, load_json
from glassbox.errors import GlassboxError
from glassbox.track import read_metrics
from glassbox.train.optim import lr_at
from glassbox.train.pretrain import PretrainConfig, pretrain


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


def test_torn_metrics_line_and_unreadable_newest_snapshot_still_resume(
    tmp_path, corpus_file, tok_file, capfd
):
    full = tmp_path / "full"
    pretrain(tiny_run(full, corpus_file, tok_file))
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    newest = crashed / "checkpoints" / "step_00000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a damaged file in the newest snapshot
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train_lo')  # the line a crash cut in half
    pretrain(tiny_run(crashed, corpus_file, tok_file, resume=True))
    assert "skipping unreadable snapshot" in capfd.readouterr().err
    a, b = losses(full), losses(crashed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # the torn line is gone, steps 4-6 redone once
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]


def test_metrics_files_and_snapshots(tmp_path, corpus_file, tok_file):
    run = tmp_path / "run"
    last = pretrain(tiny_run(run, corpus_file, tok_file, keep_last=1))
    for name in ("model.safetensors", "config.json", "config.yaml", "tokenizer.json", "loss.png"):
        assert (run / name).is_file()
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for key in ("step", "elapsed_s", "tokens_per_s", "train_loss", "val_loss", "val_bpb"):
        assert key in evals[-1]
    assert 0 < last["val_bpb"] < 10
    assert [p.name for p in list_snapshots(run)] == ["step_00000006"]
    state = load_json(run / "checkpoints" / "step_00000006" / "trainer" / "state.json")
    assert state["step"] == 6 and state["tokens_seen"] == 6 * 4 * 64
    assert state["config"]["model"] == "test" and state["world_size"] == 1


def test_fresh_run_refuses_a_non_empty_out(tmp_path, corpus_file, tok_file):
    run = tmp_path / "run"
    pretrain(tiny_run(run, corpus_file, tok_file, max_steps=3))
    with pytest.raises(GlassboxError, match="already holds a run"):
        pretrain(tiny_run(run, corpus_file, tok_file, max_steps=3))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(GlassboxError, match="already holds files"):
        pretrain(tiny_run(other, corpus_file, tok_file, max_steps=3))
    assert (other / "todo.txt").read_text() == "mine"


def test_resume_refuses_shape_changes_and_accepts_budget_changes(tmp_path, corpus_file, tok_file):
    run = tmp_path / "run"
    pretrain(tiny_run(run, corpus_file, tok_file, max_steps=3))
    bigger = tiny_run(run, corpus_file, tok_file, model="tiny", batch_size=8, resume=True)
    with pytest.raises(GlassboxError, match="--batch-size 4 -> 8, --model 'test' -> 'tiny'"):
        pretrain(bigger, explicit={"model", "batch_size", "resume", "out"})
    # Settings the user did not give come from the saved run; budgets may grow.
    pretrain(PretrainConfig(out=str(run), resume=True, max_steps=5), explicit={"max_steps"})
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]
    state = load_json(run / "checkpoints" / "step_00000005" / "trainer" / "state.json")
    assert state["config"]["model"] == "test" and state["config"]["max_steps"] == 5


def test_resume_needs_a_snapshot(tmp_path, corpus_file, tok_file):
    with pytest.raises(GlassboxError, match="no snapshot"):
        pretrain(tiny_run(tmp_path / "nothing", corpus_file, tok_file, resume=True))


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


# ---------------------------------------------------------------------------------------
# Processes: a crash mid-snapshot, and torchrun with DDP and FSDP2 on gloo
# ---------------------------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "glassbox.cli", "pretrain", *args]


def tiny_flags(out, corpus_file, tok_file, **kw) -> list[str]:
    flags = {
        "out": out, "data": corpus_file, "tokenizer": tok_file, "model": "test",
        "batch-size": 2, "max-steps": 6, "log-interval": 1, "eval-interval": 3,
        "eval-tokens": 256, "sample-tokens": 0, "checkpoint-interval": 3, "keep-last": 5,
        "warmup-steps": 2, "lr": 3e-3, "optimizer": "adamw", "device": "cpu",
    } | kw  # fmt: skip
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


@pytest.mark.slow
def test_kill_9_mid_snapshot_then_resume_matches_an_uninterrupted_run(
    tmp_path, corpus_file, tok_file
):
    """SIGKILL lands while snapshots are being written (one every step); --resume goes on
    from the newest complete one with the same losses as a run that never stopped."""
    flags = dict(checkpoint_interval=1, keep_last=2, max_steps=30, eval_interval=100)
    flags = {k.replace("_", "-"): v for k, v in flags.items()}
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    done = subprocess.run(cli(*tiny_flags(full, corpus_file, tok_file, **flags)), env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(cli(*tiny_flags(crashed, corpus_file, tok_file, **flags)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and len(list_snapshots(crashed)) < 2:
        time.sleep(0.01)
    time.sleep(0.3)  # well inside the run: snapshot writes happen every step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name[5:]) for p in list_snapshots(crashed))
    assert killed_at < 30, "the run finished before the kill; the test proved nothing"
    resumed = subprocess.run(cli(*tiny_flags(crashed, corpus_file, tok_file, **flags),
                                 "--resume"), env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = losses(full), losses(crashed)
    assert sorted(b) == list(range(1, 31))
    assert [a[s] for s in range(killed_at, 31)] == [b[s] for s in range(killed_at, 31)]
    assert not [p for p in (crashed / "checkpoints").iterdir() if p.name.startswith(".")]


def torchrun(port: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(port), "-m", "glassbox.cli", "pretrain", *args,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_two_process_gloo_ddp_step(tmp_path, corpus_file):
    """Rank 0 learns the tokenizer and rank 1 loads it; both step together."""
    out = tmp_path / "ddp"
    proc = torchrun(
        29533, "--out", str(out), "--data", corpus_file, "--vocab-size", "300", "--model",
        "test", "--batch-size", "2", "--max-steps", "2", "--eval-interval", "2",
        "--eval-tokens", "256", "--sample-tokens", "0", "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(
        (out / "checkpoints" / "step_00000002" / "trainer" / "state.json").read_text()
    )
    assert state["world_size"] == 2
    assert state["tokens_seen"] == 2 * (2 * 64 * 2)  # steps * (batch * seq * processes)


@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes(tmp_path, corpus_file, tok_file):
    """FSDP2 (fully_shard per block) on 2 gloo processes: the same losses as DDP, whole
    weights in the snapshot, and an exact resume on the same world size."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert torchrun(29534, *tiny_flags(ddp, corpus_file, tok_file)).returncode == 0
    proc = torchrun(29535, *tiny_flags(fsdp, corpus_file, tok_file), "--strategy", "fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(ddp), losses(fsdp)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [b[s] for s in a] == pytest.approx([a[s] for s in a], rel=1e-4)
    # The snapshot holds whole tensors: a plain single-process load reads it.
    from glassbox.checkpoint import load_model_dir

    model, _, _ = load_model_dir(fsdp)
    assert model.embed.weight.shape[0] >= 256
    shutil.rmtree(fsdp / "checkpoints" / "step_00000006")
    proc = torchrun(29536, *tiny_flags(fsdp, corpus_file, tok_file), "--strategy", "fsdp",
                    "--resume")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = losses(fsdp)
    assert [c[s] for s in (4, 5, 6)] == pytest.approx([b[s] for s in (4, 5, 6)], rel=1e-6)


def test_vocabulary_and_context_fitted_to_the_corpus(tmp_path, corpus_file, capsys):
    """Left out, --vocab-size and --context-length follow the corpus size (said, and
    saved in config.yaml); the training precision is chosen, said and logged."""
    from glassbox.config import fit_to_corpus

    nbytes = len(Path(corpus_file).read_text().encode())
    vocab, context, _ = fit_to_corpus(nbytes, "tiny")
    assert (vocab, context) == (512, 64)  # a ~100 kB corpus: the smallest sizes
    assert fit_to_corpus(1_115_394, "tiny")[:2] == (1024, 128)  # tinyshakespeare
    assert fit_to_corpus(11_500_000, "tiny")[:2] == (4096, 256)  # builtin:stdlib, as before
    assert fit_to_corpus(100_000_000, "small")[:2] == (8192, 512)  # the preset's caps
    out = tmp_path / "fitted"
    pretrain(tiny_run(out, corpus_file, None, model="tiny", max_steps=2, eval_interval=2))
    said = capsys.readouterr().out
    assert f"vocab size 512, context length 64: fitted to the {nbytes / 1e6:.1f} MB corpus" in said
    assert "precision auto: " in said
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["vocab_size"] == 512 and saved["context_length"] == 64
    model_cfg = load_json(out / "config.json")["model"]
    assert model_cfg["context_length"] == 64 and model_cfg["vocab_size"] <= 512
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["precision"] in ("fp32", "bf16")
    # Given sizes are kept, with a given tokenizer's own vocabulary.
    given = tmp_path / "given"
    pretrain(tiny_run(given, corpus_file, None, model="tiny", max_steps=1, eval_interval=1,
                      vocab_size=600, context_length=32, precision="fp32"))  # fmt: skip
    saved = yaml.safe_load((given / "config.yaml").read_text())
    assert saved["vocab_size"] == 600 and saved["context_length"] == 32
    assert read_metrics(given / "metrics.jsonl")[-1]["precision"] == "fp32"
    with pytest.raises(GlassboxError, match="--precision='fp16'"):
        pretrain(tiny_run(tmp_path / "bad", corpus_file, None, precision="fp16"))
