"""Evaluation through the real engine and checkers, and `glassbox eval` end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from glassbox.checkpoint import save_model_dir
from glassbox.errors import GlassboxError
from glassbox.tasks import FAMILIES, Task, builtin_tasks, load_tasks, sft_conversations
from glassbox.tasks.evaluate import evaluate, limit_per_family, score_completions
from glassbox.tasks.preferences import wrong_answer

from .conftest import overfit, tiny_model


@pytest.fixture(scope="module")
def few() -> list[Task]:
    return builtin_tasks("heldout", heldout_size=2)


def test_a_random_model_gets_a_report_with_every_family(task_tok, few):
    report = evaluate(tiny_model(task_tok), task_tok, few, max_tokens=6, show_progress=False)
    assert report.families == list(FAMILIES)
    for row in report.rows:
        assert row.tasks == 2 and row.samples == 2 and row.skipped == 0
        assert 0.0 <= row.accuracy <= 1.0 and row.pass_at[1] == row.accuracy
    assert report.overall.tasks == len(few) and len(report.samples) == len(few)
    table = report.table()
    assert all(f in table for f in FAMILIES) and "overall" in table and "pass@1" in table
    data = json.loads(report.to_json())
    assert data["overall"]["tasks"] == len(few) and "pass@1" in data["overall"]["pass_at"]
    again = evaluate(tiny_model(task_tok), task_tok, few, max_tokens=6, show_progress=False)
    assert [s["completion"] for s in again.samples] == [s["completion"] for s in report.samples]


def test_a_model_trained_to_answer_scores_one(task_tok, few):
    """Real generation, decoding without the stop token, real checkers: a model that has
    learned the answers gets 1.0, one that has not gets less."""
    chosen = [t for t in few if t.family in ("arithmetic", "comparison")]
    model = tiny_model(task_tok, seed=1)
    before = evaluate(model, task_tok, chosen, max_tokens=8, show_progress=False)
    overfit(model, task_tok, sft_conversations(chosen), steps=300, stop_loss=0.005)
    after = evaluate(model, task_tok, chosen, max_tokens=8, show_progress=False)
    assert after.accuracy() == 1.0, after.samples
    assert before.accuracy() < 1.0
    assert [s["completion"] for s in after.samples] == [t.reference for t in chosen]


def test_scoring_given_completions_references_and_pass_at_k(few):
    refs = score_completions(few, [t.reference for t in few])
    assert all(row.accuracy == 1.0 for row in refs.rows) and refs.accuracy() == 1.0
    # n = 4 samples per task: exactly one right for every task.
    rng = random.Random(0)
    completions = [t.reference if i == 2 else wrong_answer(t, rng) for t in few for i in range(4)]
    report = score_completions(few, completions, n=4, k=(1, 2, 4))
    for row in [*report.rows, report.overall]:
        assert row.accuracy == pytest.approx(0.25)
        assert row.pass_at[1] == pytest.approx(0.25)
        assert row.pass_at[2] == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
        assert row.pass_at[4] == 1.0
    assert report.accuracy("code") == pytest.approx(0.25)
    with pytest.raises(GlassboxError, match="n=4"):
        score_completions(few, completions[:-1], n=4)


def test_sampling_gives_pass_at_k_columns_and_humaneval_is_completion_style(task_tok):
    tasks = builtin_tasks("heldout", heldout_size=1) + load_tasks("builtin:humaneval-sample")
    report = evaluate(tiny_model(task_tok), task_tok, tasks, n=3, k=(1, 3), temperature=0.8,
                      max_tokens=4, seed=5, show_progress=False)  # fmt: skip
    assert "pass@3" in report.table() and report.rows[-1].family == "humaneval"
    assert report.overall.samples == 3 * len(tasks)
    assert all(r.pass_at[3] >= r.pass_at[1] for r in report.rows)


def test_prompts_too_long_are_skipped_and_counted(task_tok, few):
    long = Task("long", "arithmetic", "What is " + " + ".join(["12"] * 200) + "?", "2400",
                checker="number", answer=2400)  # fmt: skip
    report = evaluate(tiny_model(task_tok), task_tok, [*few[:2], long], max_tokens=4,
                      show_progress=False)  # fmt: skip
    assert report.rows[0].skipped == 1 and report.rows[0].tasks == 2
    assert report.overall.skipped == 1
    with pytest.raises(GlassboxError, match="No task fits the context"):
        evaluate(tiny_model(task_tok), task_tok, [long], max_tokens=4, show_progress=False)


def test_bad_settings_are_clear_errors(task_tok, few):
    model = tiny_model(task_tok)
    for kwargs, needle in [({"n": 2, "k": (3,)}, "k=3"), ({"n": 0}, "n=0"),
                           ({"max_tokens": 0}, "max_tokens=0")]:  # fmt: skip
        with pytest.raises(GlassboxError, match=needle):
            evaluate(model, task_tok, few, show_progress=False, **kwargs)
    with pytest.raises(GlassboxError, match="No tasks"):
        evaluate(model, task_tok, [], show_progress=False)
    assert len(limit_per_family(few, 1)) == len(FAMILIES)


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


def glassbox(*args, cwd):
    cmd = [sys.executable, "-m", "glassbox.cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_glassbox_eval_end_to_end(task_tok, tmp_path):
    save_model_dir(tmp_path / "run", tiny_model(task_tok), task_tok, stage="pretrain")
    sampled = ("--n", "2", "--k", "1", "--k", "2", "--temperature", "0.8", "--seed", "3")
    proc = glassbox("eval", "run", "--limit", "2", "--max-tokens", "6", *sampled, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f in proc.stdout for f in FAMILIES) and "overall" in proc.stdout
    assert "pass@2" in proc.stdout
    report = json.loads((tmp_path / "run" / "eval_builtin-tasks_heldout.json").read_text())
    assert report["overall"]["tasks"] == 2 * len(FAMILIES)
    assert report["overall"]["samples"] == 2 * 2 * len(FAMILIES)
    assert {r["family"] for r in report["families"]} == set(FAMILIES)
    assert set(report["overall"]["pass_at"]) == {"pass@1", "pass@2"}
    assert report["settings"]["temperature"] == 0.8

    bad = glassbox("eval", "run", "--tasks", "nope.jsonl", "--out", "r.json", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "nope.jsonl does not exist" in bad.stderr and not (tmp_path / "r.json").exists()
