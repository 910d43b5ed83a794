"""Reward model: Bradley-Terry on pairs, the reward checkpoint, and its loader."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from glassbox.checkpoint import load_checkpoint, load_model_dir
from glassbox.data.preferences import PairTokens
from glassbox.errors import GlassboxError
from glassbox.track import read_metrics
from glassbox.train.finetune import load_start
from glassbox.train.reward import (
    RewardConfig,
    RewardModel,
    bradley_terry_loss,
    evaluate_pairs,
    first_fit,
    last_token_index,
    packed_rewards,
    pad_right,
    train_reward,
)

# A separable toy set: the chosen answer is always the correct sum, the rejected one is
# off by one; the prompts differ, so the model must read the answer token.
QUESTIONS = [(a, b) for a in range(2, 9) for b in range(1, 6)]


def write_pairs(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def toy_pairs(path, conversational: bool = True) -> str:
    rows = []
    for a, b in QUESTIONS:
        q, good, bad = f"What is {a} + {b}?", "yes", "no"
        if conversational:
            rows.append({
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            })  # fmt: skip
        else:
            rows.append({"prompt": q, "chosen": " " + good, "rejected": " " + bad})
    return write_pairs(path, rows)


def test_bradley_terry_loss_is_the_formula():
    rc, rr = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0])
    m = torch.tensor([1.0, 0.0])
    expected = -(torch.sigmoid(torch.tensor([0.5, -1.0])).log()).mean()
    torch.testing.assert_close(bradley_terry_loss(rc, rr, m), expected)
    centered = bradley_terry_loss(rc, rr, m, center_coef=0.1)
    torch.testing.assert_close(centered, expected + 0.1 * torch.tensor([2.5**2, 1.0]).mean())


def test_forward_reads_the_last_real_token(base_dir):
    lm, tok, _ = load_start(str(base_dir), torch.device("cpu"))
    model = RewardModel.from_language_model(lm).eval()
    ids, mask = pad_right([[5, 6, 7], [8, 9], [10]], tok.pad_id)
    assert last_token_index(mask).tolist() == [2, 1, 0]
    batched = model(ids, mask)
    alone = torch.cat([model(ids[i : i + 1, : n], mask[i : i + 1, : n]) for i, n in
                       enumerate([3, 2, 1])])  # fmt: skip
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_rewards(model, ids, mask), batched, rtol=1e-5, atol=1e-5)
    assert first_fit([3, 2, 1], 3) == [[0], [1, 2]]
    ids2 = ids.clone()
    ids2[1, 2] = 11  # a different pad token changes nothing: padding is after the last token
    torch.testing.assert_close(model(ids2, mask), batched)


def test_training_separates_a_toy_set_and_round_trips(base_dir, tmp_path):
    data = toy_pairs(tmp_path / "pairs.jsonl")
    cfg = RewardConfig(
        base=str(base_dir), out=str(tmp_path / "rm"), data=data, eval_data=data, lr=3e-3,
        batch_size=8, max_steps=40, eval_interval=20, log_interval=5, warmup_steps=2,
    )  # fmt: skip
    last = train_reward(cfg)
    rows = read_metrics(tmp_path / "rm" / "metrics.jsonl")
    first = rows[0]["train_loss"]
    assert last["val_accuracy"] == 1.0, last
    assert last["train_loss"] < 0.5 * first, (first, last)
    assert last["val_margin"] > 1.0
    loaded = load_checkpoint(tmp_path / "rm")
    assert loaded.architecture == "reward" and isinstance(loaded.model, RewardModel)
    assert not loaded.model.training and loaded.record["stage"] == "reward"
    prompts = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in QUESTIONS[:4]]
    good = loaded.model.score_texts(loaded.tokenizer, prompts, ["yes"] * 4)
    bad = loaded.model.score_texts(loaded.tokenizer, prompts, ["no"] * 4)
    assert good.shape == (4,) and bool((good > bad).all())
    # the same scores as the in-memory model at the end of training (rebuilt: same weights)
    again = load_checkpoint(tmp_path / "rm").model.score_texts(loaded.tokenizer, prompts,
                                                               ["yes"] * 4)  # fmt: skip
    torch.testing.assert_close(good, again, rtol=0, atol=0)
    with pytest.raises(GlassboxError, match="'reward' checkpoint"):
        load_model_dir(tmp_path / "rm")
    with pytest.raises(GlassboxError, match="start from a language model"):
        load_start(str(tmp_path / "rm"), torch.device("cpu"))


def test_weights_equal_the_in_memory_model(base_dir, tmp_path):
    data = toy_pairs(tmp_path / "pairs.jsonl", conversational=False)
    cfg = RewardConfig(base=str(base_dir), out=str(tmp_path / "rm"), data=data, batch_size=4,
                       max_steps=2, eval_interval=2, val_fraction=0.2)  # fmt: skip
    train_reward(cfg)
    model = load_checkpoint(tmp_path / "rm").model
    base = load_checkpoint(base_dir).model
    assert set(model.state_dict()) == {
        f"body.{k}" for k in base.state_dict() if k != "lm_head.weight"
    } | {"head.weight", "head.bias"}
    changed = [k for k, v in base.state_dict().items() if k != "lm_head.weight"
               and not torch.equal(v, model.state_dict()[f"body.{k}"])]  # fmt: skip
    assert changed, "two optimizer steps changed no body weight"


def test_bad_settings_and_data_are_refused(base_dir, tmp_path):
    bad = write_pairs(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b"},
                                               {"prompt": "x", "chosen": "a"}])  # fmt: skip
    cfg = RewardConfig(base=str(base_dir), out=str(tmp_path / "a"), data=bad)
    with pytest.raises(GlassboxError, match=r"bad.jsonl:2 has no 'rejected' field"):
        train_reward(cfg)
    with pytest.raises(GlassboxError, match="--center-coef=-1"):
        train_reward(RewardConfig(base=str(base_dir), out=str(tmp_path / "b"), center_coef=-1))
    with pytest.raises(GlassboxError, match="--noise=0.2 applies to builtin:preferences"):
        train_reward(RewardConfig(base=str(base_dir), out=str(tmp_path / "c"), data=bad,
                                  noise=0.2))  # fmt: skip


def glassbox(*args, cwd):
    cmd = [sys.executable, "-m", "glassbox.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_trains_a_reward_model_and_generate_refuses_it(base_dir, tmp_path):
    data = toy_pairs(tmp_path / "pairs.jsonl")
    proc = glassbox("reward", base_dir, "--data", data, "--out", "rm", "--max-steps", "4",
                    "--batch-size", "4", "--eval-interval", "2", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val_accuracy" in proc.stdout
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["architecture"] == "reward"
    refused = glassbox("generate", "rm", "--prompt", "hi", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "'reward' checkpoint" in refused.stderr and "not a language model" in refused.stderr
    missing = glassbox("reward", base_dir, "--data", "nope.jsonl", "--out", "x", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.jsonl does not exist" in missing.stderr


def test_evaluation_reports_accuracy_per_group(base_dir):
    lm, tok, _ = load_start(str(base_dir), torch.device("cpu"))
    model = RewardModel.from_language_model(lm)
    gen = torch.Generator().manual_seed(0)
    pairs = [
        PairTokens(torch.randint(10, 300, (5 + i,), generator=gen).tolist(), [7 + i], [9],
                   group="ab"[i % 2])
        for i in range(8)
    ]  # fmt: skip
    row = evaluate_pairs(model, pairs, 3, tok.pad_id, torch.device("cpu"))
    with torch.no_grad():
        rc = model.score_rows([p.prompt + p.chosen for p in pairs], tok.pad_id)
        rr = model.score_rows([p.prompt + p.rejected for p in pairs], tok.pad_id)
    right = (rc > rr).tolist()
    assert row["val_accuracy"] == pytest.approx(sum(right) / 8)
    assert row["val_accuracy_a"] == pytest.approx(sum(right[0::2]) / 4)
    assert row["val_accuracy_b"] == pytest.approx(sum(right[1::2]) / 4)
    assert row["val_margin"] == pytest.approx((rc - rr).mean().item(), abs=1e-5)


@pytest.mark.parametrize("name", ["reward", "dpo"])
def test_every_setting_is_a_flag_with_help(name):
    import dataclasses

    import typer

    from glassbox.cli import app
    from glassbox.cli_config import field_docs
    from glassbox.train.dpo import DPOConfig

    cls = {"reward": RewardConfig, "dpo": DPOConfig}[name]
    command = typer.main.get_command(app).commands[name]
    flags = {opt for p in command.params for opt in p.opts}
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        assert f.name == "base" or "--" + f.name.replace("_", "-") in flags, f.name
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no help"


def test_resume_equals_an_uninterrupted_run(base_dir, tmp_path):
    import shutil

    data = toy_pairs(tmp_path / "pairs.jsonl")
    common = dict(base=str(base_dir), data=data, eval_data=data, batch_size=4, max_steps=6,
                  eval_interval=3, warmup_steps=1, lr=1e-3, center_coef=0.01)  # fmt: skip
    train_reward(RewardConfig(out=str(tmp_path / "a"), **common))
    train_reward(RewardConfig(out=str(tmp_path / "b"), checkpoint_interval=3, **common))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    last = train_reward(RewardConfig(out=str(tmp_path / "b"), resume=True, **common),
                        explicit={"resume", "out"})  # fmt: skip
    assert last["step"] == 6
    a, b = load_checkpoint(tmp_path / "a").model, load_checkpoint(tmp_path / "b").model
    for (k, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(wa, wb, rtol=0, atol=0, msg=k)


def test_loss_equals_trl_reward_trainer(base_dir, tmp_path):
    """TRL's RewardTrainer.compute_loss on the same batch, with our body exported to a
    transformers LlamaForSequenceClassification and our head copied into its score."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig as TRLConfig
    from trl import RewardTrainer

    from glassbox.data.preferences import collate, encode_pair, load_pairs
    from glassbox.interop.hf import export_hf
    from glassbox.train.reward import pair_rewards

    export_hf(base_dir, tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", num_labels=1,
                                                            dtype=torch.float32)  # fmt: skip
    lm, tok, _ = load_start(str(base_dir), torch.device("cpu"))
    model = RewardModel.from_language_model(lm).eval()
    with torch.no_grad():
        model.head.bias.fill_(0.0)  # transformers' score layer has no bias
        hf.score.weight.copy_(model.head.weight)
    args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                     center_rewards_coefficient=0.01)  # fmt: skip
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2
    trainer = RewardTrainer(
        model=hf,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tmp_path / "hf"),
    )
    pairs = load_pairs(toy_pairs(tmp_path / "pairs.jsonl"))[:6]
    pairs[0]["chosen"] = [{"role": "assistant", "content": "a longer answer, 41 or 29"}]
    batch = collate([encode_pair(tok, p) for p in pairs], tok.pad_id)
    inputs = {"input_ids": batch.ids, "attention_mask": batch.attention_mask.long()}
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, inputs)
        ours = bradley_terry_loss(*pair_rewards(model, batch), center_coef=0.01)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)
    assert abs(theirs.item() - 0.6931) > 1e-4  # random rewards: not the trivial value
