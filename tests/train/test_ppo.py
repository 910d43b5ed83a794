"""PPO: KL on real rollouts, GAE and the clipped losses by hand, whitening, a real step
against a trained reward model, refusals and the CLI."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from glassbox.checkpoint import load_model_dir
from glassbox.errors import GlassboxError
from glassbox.infer.engine import Engine
from glassbox.infer.rollout import collate_rollouts
from glassbox.infer.sampling import SamplingParams
from glassbox.tokenizer import Tokenizer
from glassbox.track import read_metrics
from glassbox.train.finetune import load_start
from glassbox.train.ppo import (
    PPOConfig,
    adapt_kl_coef,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    rollout_forward,
    run,
    token_rewards,
    whiten,
)
from glassbox.train.reward import RewardConfig, train_reward


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tasks") / "tasks.jsonl"
    rows = [{"prompt": p, "answer": a, "checker": "contains", "family": "letters"}
            for p, a in [("Say e", "e"), ("Say a", "a"), ("Say n", "n")]]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def rm_dir(base_dir, tmp_path_factory) -> str:
    """A real reward model, trained a few steps from the same base on toy pairs."""
    tmp = tmp_path_factory.mktemp("rm")
    rows = [{"prompt": [{"role": "user", "content": f"Say {c}"}],
             "chosen": [{"role": "assistant", "content": c * 3}],
             "rejected": [{"role": "assistant", "content": "zz"}]} for c in "eanrtso"]  # fmt: skip
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RewardConfig(base=str(base_dir), out=str(tmp / "rm"), data=str(tmp / "pairs.jsonl"),
                       batch_size=4, max_steps=3, eval_interval=3, val_fraction=0.3)  # fmt: skip
    train_reward(cfg)
    return str(tmp / "rm")


def test_kl_is_exactly_zero_when_policy_equals_reference(base_dir):
    model, tok, _ = load_start(str(base_dir), torch.device("cpu"))
    reference = copy.deepcopy(model).eval()
    head = nn.Linear(model.cfg.d_model, 1)
    engine = Engine(model.eval(), tok, max_seqs=8)
    prompts = [tok.encode("def add"), tok.encode("What is 47")]
    rollouts = engine.generate_batch(prompts, 3, SamplingParams(temperature=1.5, seed=3), 10)
    batch = collate_rollouts(rollouts, pad_id=tok.pad_id)
    logp, ref_logp, values = rollout_forward(model, head, reference, batch.input_ids)
    mask = batch.completion_mask[:, 1:]
    assert int(mask.sum()) >= 6 and values.shape == logp.shape == mask.shape
    kl = (logp - ref_logp) * mask
    assert torch.equal(kl, torch.zeros_like(kl))
    # and the engine's own log-probs agree with the full pass up to rounding
    torch.testing.assert_close(batch.logprobs[:, 1:][mask], logp[mask], rtol=1e-4, atol=1e-4)


def test_gae_matches_the_recursion_by_hand():
    # one row: a prompt position (masked out), then 3 completion tokens, then padding
    r = torch.tensor([[0.0, 0.1, -0.2, 1.0, 0.0]])
    v = torch.tensor([[9.0, 0.5, 0.4, 0.3, 7.0]])
    m = torch.tensor([[False, True, True, True, False]])
    gamma, lam = 0.9, 0.8
    # right to left; nothing past the last token (V=0, A=0):
    d3 = 1.0 + gamma * 0.0 - 0.3  # 0.7
    a3 = d3  # 0.7
    d2 = -0.2 + gamma * 0.3 - 0.4  # -0.33
    a2 = d2 + gamma * lam * a3  # -0.33 + 0.504 = 0.174
    d1 = 0.1 + gamma * 0.4 - 0.5  # -0.04
    a1 = d1 + gamma * lam * a2  # -0.04 + 0.12528 = 0.08528
    adv, ret = gae(r, v, m, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0.0]]))
    # two rows of different lengths give each row's own answer
    adv2, _ = gae(torch.cat([r, r]), torch.cat([v, v]), torch.cat([m, m]), gamma, lam)
    torch.testing.assert_close(adv2[1], adv[0])


def test_token_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.0, 0.5, -0.1, 0.2], [0.0, 0.3, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, True], [False, True, False, False]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    expected = torch.tensor([[0.0, -0.05, 0.01, -0.02 + 2.0], [0.0, -0.03 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_whitening_gives_zero_mean_and_unit_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 100.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    w = whiten(x, mask)
    assert w[mask].mean().abs() < 1e-6
    assert (w[mask].pow(2).mean() - 1).abs() < 1e-5  # population variance 1
    assert torch.equal(w[~mask], torch.zeros(2))
    kept = whiten(x, mask, shift_mean=False)  # rewards: unit variance, mean kept
    torch.testing.assert_close(kept[mask].mean(), x[mask].mean())
    torch.testing.assert_close(kept[mask].var(unbiased=False), torch.tensor(1.0), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_clipped_losses_match_hand_values():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1 (old = 0)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[True, True, True]])
    loss, clip_frac = clipped_policy_loss(logp, old, adv, mask, 0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5;
    # token 3: max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, rel=1e-6)
    assert clip_frac.item() == pytest.approx(1 / 3)
    values = torch.tensor([[1.0, 0.0, 0.5]])
    old_v = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    vf = clipped_value_loss(values, old_v, returns, mask, 0.2)
    # clipped values 0.7, 0.3, 0.5: max((1-2)^2, (0.7-2)^2) = 1.69, max(0, 0.09) = 0.09,
    # max(0.25, 0.25) = 0.25
    assert vf.item() == pytest.approx(0.5 * (1.69 + 0.09 + 0.25) / 3, rel=1e-6)


def test_adaptive_kl_moves_toward_the_target():
    assert adapt_kl_coef(0.1, 4.0, 2.0, 100, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adapt_kl_coef(0.1, 1.8, 2.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))


def _cfg(base_dir, out, rm, tasks, **kw) -> PPOConfig:
    common = dict(
        base=str(base_dir), out=str(out), reward=rm, tasks=tasks, batch_size=4, max_tokens=8,
        max_steps=1, warmup_steps=0, lr=1e-3, eval_limit=0, max_seqs=8, temperature=1.5,
        mini_batches=2, ppo_epochs=1,
    )  # fmt: skip
    return PPOConfig(**(common | kw))


def test_one_step_changes_the_policy_and_resumes_exactly(base_dir, rm_dir, task_file, tmp_path):
    before, _, _ = load_model_dir(base_dir)
    straight = run(_cfg(base_dir, tmp_path / "a", rm_dir, task_file, max_steps=2,
                        adaptive_kl=True))  # fmt: skip
    after, _, record = load_model_dir(tmp_path / "a")
    assert record["stage"] == "ppo"
    old = before.state_dict()
    assert [k for k, v in after.state_dict().items() if not torch.equal(v, old[k])]
    for key in ("rm_score", "true_accuracy", "kl", "kl_coef", "entropy", "response_len",
                "clip_frac", "value_loss", "policy_loss"):  # fmt: skip
        assert key in straight, key
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert rows[0]["kl"] == 0.0  # the first rollout comes from the reference itself
    assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # adaptive
    assert (tmp_path / "a" / "overoptimization.png").stat().st_size > 0
    # interrupted after step 1 and resumed == straight through (value head, kl_coef, RNG)
    run(_cfg(base_dir, tmp_path / "b", rm_dir, task_file, max_steps=2, adaptive_kl=True,
             checkpoint_interval=1))  # fmt: skip
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000002")
    run(_cfg(base_dir, tmp_path / "b", rm_dir, task_file, max_steps=2, adaptive_kl=True,
             resume=True), {"resume", "out"})  # fmt: skip
    b, _, _ = load_model_dir(tmp_path / "b")
    for k, v in after.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)


def test_bad_settings_are_refused_clearly(base_dir, rm_dir, task_file, tmp_path):
    with pytest.raises(GlassboxError, match="--reward is required"):
        run(_cfg(base_dir, tmp_path / "x", None, task_file))
    with pytest.raises(GlassboxError, match="--reward .*nope does not exist"):
        run(_cfg(base_dir, tmp_path / "y", str(tmp_path / "nope"), task_file))
    with pytest.raises(GlassboxError, match="not a reward model"):
        run(_cfg(base_dir, tmp_path / "z", str(base_dir), task_file))
    # a reward checkpoint whose tokenizer is another vocabulary
    other = tmp_path / "rm_other"
    shutil.copytree(rm_dir, other)
    Tokenizer.train(["completely different text " * 50], vocab_size=300,
                    show_progress=False).save(other / "tokenizer.json")  # fmt: skip
    with pytest.raises(GlassboxError, match="different vocabulary from the policy"):
        run(_cfg(base_dir, tmp_path / "w", str(other), task_file))


def test_cli_end_to_end(base_dir, rm_dir, task_file, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "glassbox.cli", "ppo", str(base_dir), "--reward", rm_dir,
           "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--max-tokens", "4",
           "--eval-limit", "0", "--tasks", task_file]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").exists() and (out / "overoptimization.png").exists()
    bad = subprocess.run(cmd[:5] + ["--out", str(tmp_path / "bad")], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "--reward is required" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
