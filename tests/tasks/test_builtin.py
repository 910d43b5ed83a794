"""Built-in task families, their checkers, task files and pass@k."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from glassbox.errors import GlassboxError
from glassbox.tasks import (
    FAMILIES,
    Task,
    builtin_tasks,
    load_tasks,
    pass_at_k,
    score_batch,
    sft_conversations,
)
from glassbox.tasks.preferences import wrong_answer


@pytest.fixture(scope="module")
def heldout() -> list[Task]:
    return load_tasks("builtin:tasks", split="heldout")


def test_every_family_is_present_with_the_default_sizes(heldout):
    train = load_tasks("builtin:tasks", split="train")
    for family in FAMILIES:
        assert sum(t.family == family for t in heldout) == 100
        assert sum(t.family == family for t in train) == 2000
    assert set(FAMILIES) == {"arithmetic", "counting", "comparison", "sorting", "json",
                             "format", "code"}  # fmt: skip


def test_splits_are_disjoint_and_deterministic(heldout):
    train = load_tasks("builtin:tasks", split="train")
    assert not {t.prompt for t in train} & {t.prompt for t in heldout}
    assert len({t.prompt for t in train}) == len(train)
    assert len({t.id for t in train + heldout}) == len(train) + len(heldout)
    assert len(set(heldout)) == len(heldout)  # tasks hash (their answers may be dicts)
    again = builtin_tasks("heldout", train_size=10)  # train size never moves heldout tasks
    assert [(t.prompt, t.reference) for t in again] == [(t.prompt, t.reference) for t in heldout]


def test_examples_look_like_the_spec(heldout):
    by_family = {t.family: t for t in heldout}
    assert by_family["arithmetic"].prompt.startswith("What is ")
    assert by_family["comparison"].prompt.startswith("Which is ")
    assert by_family["sorting"].prompt.startswith("Sort ")
    assert by_family["json"].prompt.startswith("Extract ")
    assert by_family["code"].reference.startswith("def ")
    arithmetic = [t for t in heldout if t.family == "arithmetic"]
    assert all(eval(t.prompt[len("What is ") : -1]) == int(t.reference) for t in arithmetic)


def test_text_references_pass_and_wrong_answers_fail(heldout):
    rng = random.Random(0)
    for task in (t for t in heldout if t.family != "code"):
        assert task.score(task.reference) == 1.0, task
        assert task.score(f"  {task.reference}\n") == 1.0, task  # surrounding whitespace ok
        assert task.score(wrong_answer(task, rng)) == 0.0, task
        assert task.score(f"The answer is {task.reference}.") == 0.0, task
        assert task.score("") == 0.0, task


def test_code_references_pass_and_wrong_code_fails_in_the_sandbox(heldout):
    code = [t for t in heldout if t.family == "code"][:24]
    rng = random.Random(0)
    assert score_batch(code, [t.reference for t in code], workers=2) == [1.0] * len(code)
    wrong = [wrong_answer(t, rng) for t in code]
    assert score_batch(code, wrong, workers=2) == [0.0] * len(code)


def test_code_that_exits_early_does_not_pass(heldout):
    task = next(t for t in heldout if t.family == "code")
    for cheat in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"):
        assert task.score(task.reference + "\n" + cheat) == 0.0


FISHING = {
    "reads the program file": "import re\npasses = re.findall(r'glassbox-pass-\\w+', "
    "open('main.py').read())",
    "reads its own frame": "import sys\npasses = [c for c in sys._getframe(0).f_code.co_consts "
    "if isinstance(c, str) and c.startswith('glassbox-pass')]",
    "reads a traceback's frame": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
    "    code = e.__traceback__.tb_frame.f_code\npasses = [c for c in code.co_consts "
    "if isinstance(c, str) and c.startswith('glassbox-pass')]",
    "reads its memory": "import re\nfound = []\nwith open('/proc/self/maps') as maps, "
    "open('/proc/self/mem', 'rb') as mem:\n    for line in maps:\n"
    "        lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
    "        try:\n            mem.seek(lo)\n"
    "            found += re.findall(rb'glassbox-pass-[0-9a-f]{32}', mem.read(hi - lo))\n"
    "        except (OSError, ValueError, OverflowError, MemoryError):\n            pass\n"
    "passes = [found[-1].decode()]",
}


@pytest.mark.parametrize("how", sorted(FISHING))
def test_code_that_fishes_for_the_pass_line_fails(heldout, how):
    """The pass line is printed after the asserts; code that finds it, prints it and
    exits before the asserts would pass a wrong answer: every way to find it is closed."""
    task = next(t for t in heldout if t.family == "code")
    wrong = wrong_answer(task, random.Random(0))
    cheat = FISHING[how] + "\nprint(passes[-1], flush=True)\nimport os\nos._exit(0)"
    assert task.score(wrong + "\n" + cheat) == 0.0
    assert task.score(task.reference) == 1.0


@pytest.mark.parametrize(
    ("checker", "answer", "good", "bad"),
    [
        ("number", 132, ["132", " 132\n", "132.0"], ["133", "132 apples", "1 32", "", "0x84"]),
        ("exact", "LAMP", ["LAMP", "\tLAMP "], ["lamp", "LAMP.", "'LAMP'"]),
        ("list", [2, 5, 9], ["2, 5, 9", "2,5,9"], ["[2, 5, 9]", "2, 9, 5", "2 5 9", "2, 5"]),
        ("contains", "Paris", ["It is Paris."], ["paris"]),
        ("regex", r"\d{3}-\d{4}", ["555-1234"], ["555-12345", "call 555-1234"]),
    ],
)
def test_checkers_are_strict_on_the_answer(checker, answer, good, bad):
    task = Task("t", "custom", "q", str(answer), checker=checker, answer=answer)
    assert [task.score(g) for g in good] == [1.0] * len(good)
    assert [task.score(b) for b in bad] == [0.0] * len(bad)


def test_json_checker_validates_the_schema_and_the_values(heldout):
    task = next(t for t in heldout if t.family == "json" and '"age"' in t.reference)
    value = json.loads(task.reference)
    assert task.score(json.dumps(value, indent=2)) == 1.0
    assert task.score("```json\n" + task.reference + "\n```") == 0.0
    assert task.score(json.dumps({**value, "extra": 1})) == 0.0  # additionalProperties
    assert task.score(json.dumps({**value, "age": str(value["age"])})) == 0.0
    assert task.score(json.dumps({**value, "age": value["age"] + 1})) == 0.0
    # Python says True == 1: only the schema's "integer" tells them apart.
    flag = Task("t", "json", "q", '{"n": 1}', checker="json", answer={"n": 1},
                schema={"type": "object", "properties": {"n": {"type": "integer"}}})  # fmt: skip
    assert flag.score('{"n": 1}') == 1.0 and flag.score('{"n": true}') == 0.0


def test_hostile_completions_score_zero_without_crashing(heldout):
    hostile = ["[" * 100_000 + "]" * 100_000, "\x00", "\ud800", "NaN", "9" * 5000, "1e999"]
    for task in {t.family: t for t in heldout}.values():
        assert score_batch([task] * len(hostile), hostile) == [0.0] * len(hostile), task.family


def test_sft_conversations_pair_prompts_with_references(heldout):
    convs = sft_conversations(heldout[:3])
    assert convs[0] == [
        {"role": "user", "content": heldout[0].prompt},
        {"role": "assistant", "content": heldout[0].reference},
    ]


# ---------------------------------------------------------------------------------------
# Task files
# ---------------------------------------------------------------------------------------


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_question_file_loads_and_scores(tmp_path):
    f = write(
        tmp_path / "mine.jsonl",
        '{"prompt": "What is 2 + 2?", "answer": 4, "checker": "number", "family": "math"}',
        "",
        '{"prompt": "Capital of France?", "answer": "Paris"}',
        '{"prompt": "A phone number?", "answer": "\\\\d{3}", "checker": "regex", '
        '"reference": "555"}',
    )
    tasks = load_tasks(str(f))
    assert [t.family for t in tasks] == ["math", "custom", "custom"]
    assert [t.id for t in tasks] == ["mine.jsonl:1", "mine.jsonl:3", "mine.jsonl:4"]
    assert score_batch(tasks, ["4", "Paris", "555"]) == [1.0, 1.0, 1.0]
    assert score_batch(tasks, ["5", "paris", "55"]) == [0.0, 0.0, 0.0]


def test_the_shipped_humaneval_sample_passes_with_canonical_solutions():
    tasks = load_tasks("builtin:humaneval-sample")
    assert 3 <= len(tasks) <= 5 and all(t.family == "humaneval" and not t.chat for t in tasks)
    assert score_batch(tasks, [t.reference for t in tasks]) == [1.0] * len(tasks)
    assert score_batch(tasks, ["    return None\n"] * len(tasks)) == [0.0] * len(tasks)
    with pytest.raises(GlassboxError, match="completion-style"):
        sft_conversations(tasks)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"prompt": "x", "answer": ', "not valid JSON"),
        ('["prompt", "answer"]', "expected a JSON object"),
        ('{"answer": "4"}', "missing field 'prompt'"),
        ('{"prompt": "x"}', "missing field 'answer'"),
        ('{"prompt": 3, "answer": "4"}', "field 'prompt' must be a string"),
        ('{"prompt": "x", "answer": [4]}', "field 'answer' must be a string or a number"),
        ('{"prompt": "x", "answer": "4", "checker": "fuzzy"}', "field 'checker' is 'fuzzy'"),
        ('{"prompt": "x", "answer": "four", "checker": "number"}', "not a number"),
        ('{"prompt": "x", "answer": "(", "checker": "regex", "reference": "a"}', "regular"),
        ('{"prompt": "x", "answer": "a", "checker": "regex"}', "missing field 'reference'"),
        ('{"task_id": "h/0", "prompt": "def f():\\n", "test": "def check(c): pass"}',
         "missing field 'entry_point'"),
        ('{"task_id": "h/0", "prompt": "p", "test": "t", "entry_point": "not a name"}',
         "not a Python name"),
    ],
)  # fmt: skip
def test_malformed_lines_name_the_file_the_line_and_the_field(tmp_path, line, needle):
    good = '{"prompt": "What is 1 + 1?", "answer": "2"}'
    f = write(tmp_path / "bad.jsonl", good, good, line)
    with pytest.raises(GlassboxError) as err:
        load_tasks(str(f))
    assert str(f) in str(err.value) and "line 3" in str(err.value)
    assert needle in str(err.value)


def test_missing_and_empty_files_and_unknown_specs_are_clear_errors(tmp_path):
    with pytest.raises(GlassboxError, match="does not exist"):
        load_tasks(str(tmp_path / "nope.jsonl"))
    with pytest.raises(GlassboxError, match="has no tasks"):
        load_tasks(str(write(tmp_path / "empty.jsonl", "", "  ")))
    with pytest.raises(GlassboxError, match="Unknown task set"):
        load_tasks("builtin:nothing")
    with pytest.raises(GlassboxError, match="split='test'"):
        load_tasks("builtin:tasks", split="test")


# ---------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------


def test_pass_at_k_matches_the_closed_form():
    for n in range(1, 30):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases_and_large_n():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every k-subset holds a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(100_000, 1, 1) == pytest.approx(1e-5)  # no overflow, no cancellation
    for bad in [(0, 0, 1), (5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)]:
        with pytest.raises(GlassboxError):
            pass_at_k(*bad)
