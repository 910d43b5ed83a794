"""DPO: the loss by hand and against TRL's DPOTrainer, variants, a step, exact resume, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from glassbox.checkpoint import load_model_dir, save_model_dir
from glassbox.data.preferences import collate, encode_pair, load_pairs
from glassbox.errors import GlassboxError
from glassbox.track import read_metrics
from glassbox.train.dpo import DPOConfig, completion_logprobs, dpo_loss, pair_loss, train_dpo
from glassbox.train.logprobs import masked_sum, sequence_logprobs

PAIRS = [
    ("What is 4 + 5?", "9", "10"),
    ("Which is larger: 41 or 29?", "41", "29"),
    ("Sort ascending: 5, 2, 9", "2, 5, 9", "5, 2, 9"),
]


def write_pairs(path, pairs=PAIRS) -> str:
    rows = [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        }
        for q, good, bad in pairs
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def policy_dir(base_dir, tmp_path_factory):
    """The base model with every weight nudged: a policy that differs from its reference."""
    model, tok, _ = load_model_dir(base_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("policy")
    save_model_dir(out, model, tok, stage="sft")
    return out


def tiny_batch(tok, tmp_path):
    pairs = load_pairs(write_pairs(tmp_path / "p.jsonl"))
    return collate([encode_pair(tok, p) for p in pairs], tok.pad_id)


def by_hand(model, ids, completion_mask) -> torch.Tensor:
    """Sum over completion tokens of log softmax(logits at t-1)[token t], one row at a time."""
    out = []
    with torch.no_grad():
        for row, mask in zip(ids, completion_mask, strict=True):
            logp = torch.log_softmax(model(row[None])[0].float(), dim=-1)  # (L, V)
            out.append(sum(logp[t - 1, row[t]] for t in range(1, len(row)) if mask[t]))
    return torch.stack(out)


def test_loss_equals_the_formula_by_hand(base_dir, policy_dir, tmp_path):
    policy, tok, _ = load_model_dir(policy_dir)
    reference, _, _ = load_model_dir(base_dir)
    batch = tiny_batch(tok, tmp_path)
    n, beta = len(PAIRS), 0.1
    pi = by_hand(policy, batch.ids, batch.completion_mask)
    ref = by_hand(reference, batch.ids, batch.completion_mask)
    pc, pr, rc, rr = pi[:n], pi[n:], ref[:n], ref[n:]
    expected = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    cfg = DPOConfig(beta=beta)
    with torch.no_grad():
        loss, metrics = pair_loss(policy, reference, batch, cfg)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - 0.6931) > 1e-3, "policy and reference should differ"
    chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
    assert metrics["reward_accuracy"] == (chosen_reward > rejected_reward).float().mean().item()
    assert metrics["reward_margin"] == pytest.approx((chosen_reward - rejected_reward).mean())

    # IPO: squared distance of the per-token log-ratio gap from 1 / (2 beta)
    lengths = batch.completion_mask.sum(1).float()
    h = (pc - rc) / lengths[:n] - (pr - rr) / lengths[n:]
    ipo, _ = pair_loss(policy, reference, batch, DPOConfig(beta=beta, loss_type="ipo"))
    torch.testing.assert_close(ipo, ((h - 1 / (2 * beta)) ** 2).mean(), rtol=1e-5, atol=1e-6)
    # conservative DPO: the flipped-vote term weighted by eps
    eps = 0.2
    smooth, _ = pair_loss(policy, reference, batch, DPOConfig(beta=beta, label_smoothing=eps))
    g = beta * ((pc - rc) - (pr - rr))
    by_formula = (-(1 - eps) * F.logsigmoid(g) - eps * F.logsigmoid(-g)).mean()
    torch.testing.assert_close(smooth, by_formula, rtol=1e-5, atol=1e-6)
    assert smooth.item() != pytest.approx(loss.item()) and ipo.item() != pytest.approx(loss.item())
    # RPO: plus alpha times the chosen answers' mean per-token NLL
    rpo, m = pair_loss(policy, reference, batch, DPOConfig(beta=beta, rpo_alpha=0.5))
    nll = -(pc / lengths[:n]).mean()
    torch.testing.assert_close(rpo, expected + 0.5 * nll, rtol=1e-5, atol=1e-6)
    assert m["chosen_nll"] == pytest.approx(nll.item(), rel=1e-5)


def test_dpo_loss_at_the_reference_is_log_2():
    logps = torch.tensor([-3.0, -5.0, -4.0, -2.0])
    loss, stats = dpo_loss(logps, logps.clone(), beta=0.5)
    assert loss.item() == pytest.approx(0.693147, abs=1e-6)
    assert stats["chosen_reward"].abs().sum() == 0


def test_loss_equals_trl_dpo_trainer(base_dir, policy_dir, tmp_path):
    """TRL's own loss function on the same tokens, with both models exported to
    transformers (ours -> LlamaForCausalLM)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from glassbox.interop.hf import export_hf

    export_hf(policy_dir, tmp_path / "hf_policy")
    export_hf(base_dir, tmp_path / "hf_ref")
    hf_policy = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_policy", dtype=torch.float32)
    hf_ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_ref", dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf_policy")
    rows = [json.loads(line) for line in open(write_pairs(tmp_path / "p.jsonl"))]
    args = TRLConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to=[], use_cpu=True,
                     per_device_train_batch_size=len(PAIRS), max_length=64)  # fmt: skip
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, processing_class=hf_tok,
                         train_dataset=Dataset.from_list(rows))  # fmt: skip

    policy, tok, _ = load_model_dir(policy_dir)
    reference, _, _ = load_model_dir(base_dir)
    batch = tiny_batch(tok, tmp_path)
    inputs = {"input_ids": batch.ids, "attention_mask": batch.attention_mask.long(),
              "completion_mask": batch.completion_mask.long()}  # fmt: skip
    for loss_type in ("sigmoid", "ipo"):
        trainer.loss_types = [loss_type]
        with torch.no_grad():
            theirs = trainer.compute_loss(trainer.model, inputs)
            ours, _ = pair_loss(policy, reference, batch, DPOConfig(beta=0.1, loss_type=loss_type))
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)
        assert abs(theirs.item() - 0.6931) > 1e-3  # the two models differ: a real comparison


def common(base_dir, data, **kw):
    return dict(base=str(base_dir), data=data, eval_data=data, batch_size=2, log_interval=1,
                eval_interval=3, warmup_steps=1, lr=1e-3, max_steps=6, seed=3,
                eval_tasks=None) | kw  # fmt: skip


def test_steps_change_weights_and_resume_exactly(base_dir, tmp_path):
    data = write_pairs(tmp_path / "p.jsonl")
    straight = train_dpo(DPOConfig(out=str(tmp_path / "a"), **common(base_dir, data)))
    train_dpo(DPOConfig(out=str(tmp_path / "b"), checkpoint_interval=3, **common(base_dir, data)))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    resumed = train_dpo(
        DPOConfig(out=str(tmp_path / "b"), resume=True, **common(base_dir, data)),
        explicit={"resume", "out"},
    )
    assert straight["step"] == resumed["step"] == 6
    a, _, record = load_model_dir(tmp_path / "a")
    b, _, _ = load_model_dir(tmp_path / "b")
    base, _, _ = load_model_dir(base_dir)
    for (k, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(wa, wb, rtol=0, atol=0, msg=k)
    assert not torch.equal(a.embed.weight, base.embed.weight)
    assert record["stage"] == "dpo" and record["architecture"] == "transformer"
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert rows[-1]["val_accuracy"] == 1.0 and rows[-1]["val_margin"] > 0
    assert straight["val_loss"] < 0.69


def test_one_step_lowers_the_loss_of_its_batch(base_dir, tmp_path):
    policy, tok, _ = load_model_dir(base_dir)
    reference, _, _ = load_model_dir(base_dir)
    policy.train()
    batch = tiny_batch(tok, tmp_path)
    cfg = DPOConfig(beta=0.5)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    before, _ = pair_loss(policy, reference, batch, cfg)
    before.backward()
    opt.step()
    after, _ = pair_loss(policy, reference, batch, cfg)
    assert after.item() < before.item()
    torch.testing.assert_close(completion_logprobs(reference, batch),
                               by_hand(reference, batch.ids, batch.completion_mask))  # fmt: skip
    full = masked_sum(sequence_logprobs(policy, batch.ids), batch.completion_mask[:, 1:])
    torch.testing.assert_close(completion_logprobs(policy, batch), full, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused(base_dir, tmp_path):
    data = write_pairs(tmp_path / "p.jsonl")
    bad = [("loss_type", "hinge", "--loss-type='hinge'"), ("beta", 0.0, "--beta=0.0"),
           ("label_smoothing", 0.5, "--label-smoothing=0.5")]  # fmt: skip
    for i, (name, value, message) in enumerate(bad):
        cfg = DPOConfig(out=str(tmp_path / f"x{i}"), **common(base_dir, data), **{name: value})
        with pytest.raises(GlassboxError, match=message):
            train_dpo(cfg)


def glassbox(*args, cwd):
    cmd = [sys.executable, "-m", "glassbox.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_runs_dpo(base_dir, tmp_path):
    data = write_pairs(tmp_path / "p.jsonl")
    proc = glassbox("dpo", base_dir, "--data", data, "--eval-data", data, "--out", "dpo",
                    "--max-steps", "2", "--batch-size", "2", "--eval-interval", "2",
                    "--eval-tasks", "none", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val_accuracy" in proc.stdout
    assert json.loads((tmp_path / "dpo" / "config.json").read_text())["stage"] == "dpo"
    refused = glassbox("dpo", base_dir, "--data", data, "--out", "y", "--beta", "-1",
                       cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2 and "--beta=-1.0 must be > 0" in refused.stderr
    assert "Traceback" not in refused.stderr
