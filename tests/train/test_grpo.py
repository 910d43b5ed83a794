"""GRPO: group advantages, the token-level loss by hand, a real step, exact resume, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from glassbox.checkpoint import load_model_dir
from glassbox.errors import GlassboxError
from glassbox.tasks import load_tasks, score_batch
from glassbox.track import read_metrics
from glassbox.train.grpo import (
    GRPOConfig,
    check_completions,
    group_advantages,
    k3_kl,
    run,
    token_level_loss,
)


def test_group_advantages_are_zero_mean_and_zero_for_constant_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4, scale=False)
    groups = adv.view(3, 4)
    torch.testing.assert_close(groups.mean(1), torch.zeros(3))
    assert torch.equal(groups[1], torch.zeros(4))  # all four right: no signal
    torch.testing.assert_close(groups[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(groups[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    scaled = group_advantages(rewards, 4, scale=True).view(3, 4)
    std0 = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as torch.std
    torch.testing.assert_close(scaled[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-4))
    assert torch.equal(scaled[1], torch.zeros(4))


def test_token_level_loss_matches_its_formula():
    # two sequences, 3 and 1 completion tokens: 4 tokens in all
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.1, 0.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0, -1.5], [-0.6, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.tensor([1.0, -2.0])
    loss, n_clipped = token_level_loss(logp, old, adv, mask, 0.2, 0.28, n_tokens=4)
    import math

    r = [1.0, math.exp(0.5), math.exp(-0.5), math.exp(0.5)]
    # seq 0 (A=+1): min(r, clip(r)) -> 1, 1.28 (clipped above), e^-0.5 (below the clip
    # but min keeps the smaller unclipped term); seq 1 (A=-2): min(-2r, -2*1.28) = -2r
    terms = [-1.0, -1.28, -r[2], 2 * r[3]]
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    assert int(n_clipped) == 1
    # the same batch in two chunks sums to the same loss (normalized by all tokens)
    a, _ = token_level_loss(logp[:1], old[:1], adv[:1], mask[:1], 0.2, 0.28, n_tokens=4)
    b, _ = token_level_loss(logp[1:], old[1:], adv[1:], mask[1:], 0.2, 0.28, n_tokens=4)
    assert (a + b).item() == pytest.approx(loss.item(), rel=1e-6)
    # k3 is zero where the policy equals the reference, positive elsewhere
    assert torch.equal(k3_kl(logp, logp), torch.zeros_like(logp))
    assert (k3_kl(logp, old)[mask] >= 0).all() and k3_kl(logp, old)[0, 1] > 0


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> str:
    """Short tasks an untrained model passes about half the time (its text contains a
    common letter), so rewards vary inside groups and the policy gets a gradient."""
    path = tmp_path_factory.mktemp("tasks") / "tasks.jsonl"
    rows = [{"prompt": p, "answer": a, "checker": "contains", "family": f}
            for p, a, f in [("Say e", "e", "vowel"), ("Say a", "a", "vowel"),
                            ("Say n", "n", "consonant"), ("Say r", "r", "consonant")]]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_check_completions_equals_score_batch_on_code_and_text():
    code = [t for t in load_tasks("builtin:tasks", "train") if t.family == "code"][:2]
    text = [t for t in load_tasks("builtin:tasks", "train") if t.family == "arithmetic"][:1]
    tasks = [code[0], code[0], code[0], code[1], code[1], text[0], text[0]]
    texts = [code[0].reference, code[0].reference, "def f(:", "return 1", code[1].reference,
             text[0].reference, "nope"]  # fmt: skip
    got = check_completions(tasks, texts)
    assert got == score_batch(tasks, texts) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def _cfg(base_dir, out, tasks, **kw) -> GRPOConfig:
    common = dict(
        base=str(base_dir), out=str(out), tasks=tasks, batch_size=4, num_generations=4,
        max_tokens=8, max_steps=2, warmup_steps=0, lr=1e-3, eval_limit=0, max_seqs=16,
        temperature=2.0,
    )  # fmt: skip
    return GRPOConfig(**(common | kw))


def test_one_step_changes_the_policy_and_writes_a_loadable_checkpoint(
    base_dir, tmp_path, task_file
):
    before, _, _ = load_model_dir(base_dir)
    # beta > 0 so the reference model and KL path run too
    last = run(_cfg(base_dir, tmp_path / "g", task_file, max_steps=1, beta=0.1, eval_limit=1))
    after, _, record = load_model_dir(tmp_path / "g")
    assert record["stage"] == "grpo"
    old = before.state_dict()
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, old[k])]
    assert changed, "one GRPO step left every weight as it was"
    for key in ("reward", "loss", "clip_frac", "entropy", "kl", "response_len",
                "zero_var_groups", "rollout_tokens_per_s"):  # fmt: skip
        assert key in last, key
    assert last["kl"] == pytest.approx(0.0, abs=1e-5)  # first step: policy == reference
    assert 0 < last["reward"] < 1 and last["zero_var_groups"] < 1
    assert {"acc_vowel", "acc_consonant"} & set(last)
    # held-out greedy accuracy through glassbox.tasks.evaluate, at step 0 and at the end
    rows = read_metrics(tmp_path / "g" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        assert 0 <= row["heldout_accuracy"] <= 1 and "heldout_vowel" in row


def test_resume_repeats_the_uninterrupted_run(base_dir, tmp_path, task_file):
    straight = run(_cfg(base_dir, tmp_path / "a", task_file, max_steps=4))
    run(_cfg(base_dir, tmp_path / "b", task_file, max_steps=4, checkpoint_interval=2))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000004")
    resumed = run(
        _cfg(base_dir, tmp_path / "b", task_file, max_steps=4, resume=True), {"resume", "out"}
    )
    assert resumed["step"] == straight["step"] == 4
    a, _, _ = load_model_dir(tmp_path / "a")
    b, _, _ = load_model_dir(tmp_path / "b")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)
    rows_a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["reward"] for r in rows_a] == [r["reward"] for r in rows_b][-4:]
    assert [r["response_len"] for r in rows_a] == [r["response_len"] for r in rows_b][-4:]


def test_bad_settings_are_refused_clearly(base_dir, tmp_path, task_file):
    with pytest.raises(GlassboxError, match="--num-generations=1 must be >= 2"):
        run(_cfg(base_dir, tmp_path / "x", task_file, num_generations=1))
    with pytest.raises(GlassboxError, match="--epsilon-low=1.5"):
        run(_cfg(base_dir, tmp_path / "y", task_file, epsilon_low=1.5))
    with pytest.raises(GlassboxError, match="No prompt of --tasks=.* fits the model's context"):
        run(_cfg(base_dir, tmp_path / "z", task_file, max_tokens=64))


def test_cli_end_to_end(base_dir, tmp_path, task_file):
    out = tmp_path / "cli"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "glassbox.cli", "grpo", str(base_dir), "--out", str(out),
           "--max-steps", "1", "--batch-size", "2", "--num-generations", "2",
           "--max-tokens", "4", "--eval-limit", "0", "--tasks", task_file]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").exists() and (out / "metrics.jsonl").exists()
    bad = subprocess.run(cmd[:5] + ["--num-generations", "1"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert bad.returncode == 2
    assert "--num-generations=1 must be >= 2" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
