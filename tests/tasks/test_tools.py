"""The tool-use family (builtin:tools): safe deterministic tools, fixed splits, the
reference trajectories SFT learns, scoring, and evaluation with and without tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from glassbox.checkpoint import save_model_dir
from glassbox.config import ModelConfig
from glassbox.conversation import encode_conversation, format_tool_call
from glassbox.errors import GlassboxError
from glassbox.model import Transformer
from glassbox.tasks import FAMILIES, builtin_tasks, load_tasks, score_batch, sft_conversations
from glassbox.tasks.evaluate import evaluate, prompt_ids
from glassbox.tasks.tools import (
    PLANETS,
    TOOLS,
    calculate,
    evaluate_tools,
    reference_messages,
    run_tool,
)
from glassbox.tokenizer import END, Tokenizer

from .conftest import overfit


@pytest.fixture(scope="module")
def heldout():
    return load_tasks("builtin:tools", split="heldout")


def test_calculator_is_arithmetic_only():
    assert calculate("4207 * 213 + 38") == 896129
    assert calculate("(10 - 4) / -3") == -2
    for bad in ("__import__('os')", "2 ** 10", "x + 1", "len('a')", "1 if 1 else 2", "1; 2"):
        with pytest.raises(GlassboxError):
            calculate(bad)
    assert "error" in json.loads(run_tool("calculator", {"expression": "1 / 0"}))
    assert "error" in json.loads(run_tool("calculator", {"expression": "open('x')"}))


def test_tools_validate_their_arguments_and_convert():
    assert run_tool("convert", {"value": 100, "from": "c", "to": "f"}) == "212"
    assert run_tool("convert", {"value": 10, "from": "km", "to": "mi"}) == "6.21"
    planet = sorted(PLANETS)[0]
    assert json.loads(run_tool("lookup", {"planet": planet})) == {"planet": planet,
                                                                  **PLANETS[planet]}  # fmt: skip
    for name, args in [("lookup", {"planet": "Earth"}), ("lookup", {}), ("nope", {}),
                       ("convert", {"value": 1, "from": "km", "to": "kg"}),
                       ("convert", {"value": "1", "from": "km", "to": "mi"})]:  # fmt: skip
        assert "error" in json.loads(run_tool(name, args))


def test_family_is_opt_in_with_fixed_disjoint_splits(heldout):
    train = load_tasks("builtin:tools", split="train")
    assert len(heldout) == 100 and len(train) == 2000
    assert not {t.prompt for t in train} & {t.prompt for t in heldout}
    assert "tools" not in FAMILIES
    assert not any(t.tools for t in load_tasks("builtin:tasks", split="heldout"))
    again = builtin_tasks("heldout", families=("tools",), train_size=5)
    assert [(t.prompt, t.answer) for t in again] == [(t.prompt, t.answer) for t in heldout]
    kinds = {(t.reference_calls or [{"name": "direct"}])[0]["name"] for t in heldout}
    assert kinds == {"calculator", "lookup", "convert", "direct"}
    assert all(t.tools == TOOLS and t.checker == "tool" for t in heldout)


def test_references_and_reference_calls_score_one_wrong_ones_zero(heldout):
    assert score_batch(heldout, [t.reference for t in heldout]) == [1.0] * len(heldout)
    called = [t for t in heldout if t.reference_calls]
    calls = [format_tool_call(**t.reference_calls[0]) for t in called]
    assert score_batch(called, calls) == [1.0] * len(called)
    wrong = [str(int(float(t.reference)) + 1) for t in heldout]
    assert score_batch(heldout, wrong) == [0.0] * len(heldout)
    bad_calls = [c.replace('"arguments":{', '"arguments":{"x":1,') for c in calls]
    assert score_batch(called, bad_calls) == [0.0] * len(called)  # schema broken


def test_sft_conversation_learns_the_call_and_the_answer(tokenizer, heldout):
    task = next(t for t in heldout if t.reference_calls)
    conv = sft_conversations([task])[0]
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant"]
    ids, mask = encode_conversation(tokenizer, conv)
    assert (ids, mask) == tuple(encode_conversation(tokenizer, reference_messages(task), TOOLS))
    learned = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    call = format_tool_call(**task.reference_calls[0])
    assert learned == f"{call}{END}{task.reference}{END}"
    # GRPO and eval prompt the first turn with the tool definitions.
    assert tokenizer.decode(prompt_ids(tokenizer, task)).count('"name":"calculator"') == 1


def tool_tok(tasks) -> Tokenizer:
    text = " ".join(json.dumps(sft_conversations([t])[0]) for t in tasks)
    return Tokenizer.train([text * 3], vocab_size=600, show_progress=False)


def long_model(tok: Tokenizer, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("test", vocab_size=tok.vocab_size, context_length=1024)
    return Transformer(cfg).eval()


@pytest.mark.slow
def test_a_model_taught_the_round_trips_uses_the_tools(heldout):
    """SFT on the reference trajectories: the model calls the right tool with valid
    arguments, reads the result and answers; without tools it cannot."""
    chosen = [next(t for t in heldout if (t.reference_calls or [{}])[0].get("name") == k)
              for k in ("calculator", "lookup", "convert")]  # fmt: skip
    tok = tool_tok(heldout)
    model = long_model(tok, seed=1)
    before = evaluate_tools(model, tok, chosen, max_tokens=64)
    overfit(model, tok, sft_conversations(chosen), steps=400, stop_loss=0.003)
    after = evaluate_tools(model, tok, chosen, max_tokens=64)
    assert after.overall.calls == 3 and after.overall.call_validity == 1.0, after.samples
    assert after.overall.accuracy_with_tools == 1.0, after.samples
    assert after.overall.accuracy_without_tools < 1.0
    assert before.overall.accuracy_with_tools < 1.0
    assert {r.kind for r in after.rows} == {"calculator", "lookup", "convert"}
    # The first-turn score (what GRPO rewards) sees the right calls too.
    report = evaluate(model, tok, chosen, max_tokens=64, show_progress=False)
    assert report.accuracy("tools") == 1.0 and report.tools.overall.accuracy_with_tools == 1.0


def test_random_model_report_and_the_command_line(heldout, tmp_path):
    tok = tool_tok(heldout)
    model = long_model(tok)
    few = heldout[:4]
    report = evaluate_tools(model, tok, few, max_tokens=12)
    assert report.overall.tasks == 4 and report.overall.call_validity == 1.0
    assert 0.0 <= report.overall.accuracy_without_tools <= 1.0
    table = report.table()
    assert "acc+tools" in table and "overall" in table
    with pytest.raises(GlassboxError, match="No tool tasks"):
        evaluate_tools(model, tok, load_tasks("builtin:tasks", "heldout")[:2])

    save_model_dir(tmp_path / "run", model, tok, stage="pretrain")
    cmd = [sys.executable, "-m", "glassbox.cli", "eval", "run", "--tasks", "builtin:tools",
           "--limit", "3", "--max-tokens", "8"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "acc+tools" in proc.stdout and "validity" in proc.stdout
    data = json.loads((tmp_path / "run" / "eval_builtin-tools_heldout.json").read_text())
    assert data["tools"]["overall"]["tasks"] == 3 and data["overall"]["tasks"] == 3


@pytest.mark.slow
def test_sft_and_grpo_commands_take_the_tool_family(heldout, tmp_path):
    tok = tool_tok(heldout)
    save_model_dir(tmp_path / "base", long_model(tok), tok, stage="pretrain")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def glassbox(*args):
        cmd = [sys.executable, "-m", "glassbox.cli", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env=env)  # fmt: skip

    sft = glassbox("sft", "base", "--data", "builtin:tools", "--out", "sft", "--max-steps", "2",
                   "--batch-size", "2", "--eval-interval", "2", "--eval-tasks", "builtin:tools",
                   "--eval-limit", "2")  # fmt: skip
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert "done: step 2" in sft.stdout
    grpo = glassbox("grpo", "sft", "--tasks", "builtin:tools", "--out", "grpo", "--max-steps",
                    "1", "--max-tokens", "16", "--batch-size", "4", "--num-generations", "2",
                    "--eval-limit", "1")  # fmt: skip
    assert grpo.returncode == 0, grpo.stderr[-3000:]
