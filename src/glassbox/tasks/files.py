"""Task specs: ``builtin:tasks``, ``builtin:tools`` (the opt-in tool-use family, see
:mod:`glassbox.tasks.tools`) or a JSONL file of your own tasks.

A task file has one JSON object per line, in one of two forms:

- a question: ``{"prompt": ..., "answer": ..., "checker": "exact"|"number"|"contains"|
  "regex" (default "exact"), "family": ... (default "custom"), "reference": ...}``;
  ``reference`` (the SFT demonstration) defaults to the answer, and is required for
  ``regex``, whose answer is a pattern;
- a HumanEval problem: ``{"task_id", "prompt", "test", "entry_point",
  "canonical_solution"?}``, family ``"humaneval"``, completion-style (``chat=False``):
  the model continues the code prompt, and the sandbox runs
  ``prompt + completion + test + check(entry_point)``.

Blank lines are skipped. Every mistake raises :class:`GlassboxError` naming the file,
the line and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glassbox.errors import GlassboxError
from glassbox.tasks.base import Task
from glassbox.tasks.builtin import SPLITS, builtin_tasks

BUILTIN = "builtin:tasks"
BUILTIN_TOOLS = "builtin:tools"
HUMANEVAL_SAMPLE = "builtin:humaneval-sample"  # examples/humaneval_sample.jsonl, shipped
FILE_CHECKERS = ("exact", "number", "contains", "regex")
HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")


def load_tasks(spec: str, split: str = "train") -> list[Task]:
    """``builtin:tasks`` or ``builtin:tools`` (``split`` "train" or "heldout"),
    ``builtin:humaneval-sample``
    (four small HumanEval-format problems shipped with glassbox) or the path of a JSONL
    task file (``split`` is ignored for files: a file is one set of tasks)."""
    if spec == BUILTIN:
        return builtin_tasks(split)
    if spec == BUILTIN_TOOLS:
        return builtin_tasks(split, families=("tools",))
    if spec == HUMANEVAL_SAMPLE:
        return read_task_file(Path(__file__).parent / "examples" / "humaneval_sample.jsonl")
    if spec.startswith("builtin:"):
        raise GlassboxError(
            f"Unknown task set {spec!r}; use {BUILTIN!r}, {BUILTIN_TOOLS!r}, "
            f"{HUMANEVAL_SAMPLE!r} or a .jsonl file."
        )
    if split not in SPLITS:
        raise GlassboxError(f"split={split!r} is not one of {list(SPLITS)}.")
    return read_task_file(spec)


def read_task_file(path: str | Path) -> list[Task]:
    """Every task of a JSONL task file (see the module docstring for the two forms)."""
    path = Path(path)
    if not path.is_file():
        raise GlassboxError(
            f"Task file {path} does not exist; pass a .jsonl file with one task per line, "
            f"or {BUILTIN!r}."
        )
    tasks = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            tasks.append(parse_task_line(line, path, number))
    if not tasks:
        raise GlassboxError(
            f"Task file {path} has no tasks; write one JSON object per line, e.g. "
            '{"prompt": "What is 2 + 2?", "answer": "4", "checker": "number"}.'
        )
    return tasks


def _bad(path: Path, number: int, problem: str) -> GlassboxError:
    return GlassboxError(f"{path}, line {number}: {problem}")


def parse_task_line(line: str, path: Path, number: int) -> Task:
    """One line of a task file as a :class:`Task`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise _bad(path, number, f"not valid JSON ({e.msg} at column {e.colno}); write one "
                   "JSON object per line.") from e  # fmt: skip
    if not isinstance(row, dict):
        raise _bad(path, number, f"expected a JSON object, got {type(row).__name__}.")
    if "entry_point" in row or "test" in row or "task_id" in row:
        return _humaneval(row, path, number)
    return _question(row, path, number)


def _string(row: dict[str, Any], key: str, path: Path, number: int, hint: str) -> str:
    if key not in row:
        raise _bad(path, number, f"missing field {key!r}; {hint}")
    if not isinstance(row[key], str):
        raise _bad(path, number, f"field {key!r} must be a string, got "
                   f"{type(row[key]).__name__} ({row[key]!r}).")  # fmt: skip
    return row[key]


def _question(row: dict[str, Any], path: Path, number: int) -> Task:
    hint = 'a question line needs {"prompt": str, "answer": str|number}.'
    prompt = _string(row, "prompt", path, number, hint)
    if "answer" not in row:
        raise _bad(path, number, f"missing field 'answer'; {hint}")
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise _bad(path, number, f"field 'answer' must be a string or a number, got "
                   f"{type(answer).__name__}.")  # fmt: skip
    checker = row.get("checker", "exact")
    if checker not in FILE_CHECKERS:
        raise _bad(path, number, f"field 'checker' is {checker!r}; use one of "
                   f"{list(FILE_CHECKERS)}.")  # fmt: skip
    if checker == "number" and not _is_number(answer):
        raise _bad(path, number, f"field 'answer' is {answer!r}, not a number, but the "
                   "checker is 'number'; give a number or another checker.")  # fmt: skip
    if checker == "regex":
        reference = _string(row, "reference", path, number, "a 'regex' task needs a "
                            "'reference' answer (its 'answer' is a pattern).")  # fmt: skip
        _compile_pattern(str(answer), path, number)
    else:
        reference = row.get("reference", str(answer))
        if not isinstance(reference, str):
            raise _bad(path, number, "field 'reference' must be a string.")
    family = row.get("family", "custom")
    if not isinstance(family, str) or not family:
        raise _bad(path, number, f"field 'family' must be a non-empty string, got {family!r}.")
    return Task(
        id=str(row.get("id", f"{path.name}:{number}")), family=family, prompt=prompt,
        reference=reference, checker=checker, answer=answer,
    )  # fmt: skip


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _compile_pattern(pattern: str, path: Path, number: int) -> None:
    import re

    try:
        re.compile(pattern)
    except re.error as e:
        raise _bad(path, number, f"field 'answer' is not a valid regular expression ({e}).") from e


def _humaneval(row: dict[str, Any], path: Path, number: int) -> Task:
    hint = "a HumanEval line needs task_id, prompt, test and entry_point (strings)."
    task_id, prompt, test, entry = (_string(row, k, path, number, hint) for k in HUMANEVAL_FIELDS)
    if not entry.isidentifier():
        raise _bad(path, number, f"field 'entry_point' is {entry!r}, not a Python name.")
    solution = row.get("canonical_solution", "")
    if not isinstance(solution, str):
        raise _bad(path, number, "field 'canonical_solution' must be a string.")
    return Task(
        id=task_id, family="humaneval", prompt=prompt, reference=solution, checker="humaneval",
        chat=False, tests=test, entry_point=entry,
    )  # fmt: skip
