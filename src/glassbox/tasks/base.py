"""A verifiable task and its checkers: a prompt, a reference answer, and a rule that says
whether a completion is right (1.0) or wrong (0.0).

Every checker compares the completion with surrounding whitespace stripped and is
otherwise strict on the answer: no partial credit, no searching for the answer inside
prose (except the ``contains`` and ``regex`` checkers a task file asks for by name).
Code is never run here: the ``python`` and ``humaneval`` checkers run it in
:mod:`glassbox.tasks.sandbox`.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHECKERS = ("exact", "number", "list", "json", "contains", "regex", "python", "humaneval", "tool")
SANDBOXED = ("python", "humaneval")
CODE_TIMEOUT_S = 5.0
CODE_MEMORY_MB = 512
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Task:
    """One verifiable task.

    ``prompt`` is the user message (``chat=True``) or, for completion-style tasks such as
    HumanEval problems (``chat=False``), the text the model continues. ``reference`` is a
    correct, on-format, concise answer (the SFT demonstration). ``checker`` names the rule
    :meth:`score` applies (see :data:`CHECKERS`); ``answer`` is what it compares with,
    ``schema`` the JSON schema of the ``json`` checker, ``tests`` the hidden asserts of
    the ``python`` checker or the ``check`` function of a HumanEval problem, and
    ``entry_point`` the function a HumanEval ``check`` receives. Tool-use tasks
    (:mod:`glassbox.tasks.tools`) carry ``tools`` (OpenAI function definitions, shown to
    the model) and ``reference_calls`` (the calls of the reference trajectory)."""

    id: str
    family: str
    prompt: str
    reference: str
    checker: str = "exact"
    answer: Any = None
    chat: bool = True
    tests: str = ""
    entry_point: str = ""
    schema: dict | None = field(default=None, compare=False)
    tools: list | None = field(default=None, compare=False)
    reference_calls: list | None = field(default=None, compare=False)

    def __hash__(self) -> int:  # answer/schema may be dicts or lists; id + prompt suffice
        return hash((self.id, self.family, self.prompt))

    def score(self, completion: str) -> float:
        """1.0 if ``completion`` is correct by this task's checker, else 0.0."""
        if self.checker in SANDBOXED:
            from glassbox.tasks.sandbox import run_python

            program, sentinel = self.program(completion)
            result = run_python(program, timeout_s=CODE_TIMEOUT_S, memory_mb=CODE_MEMORY_MB)
            return float(code_passed(result.passed, result.stdout, sentinel))
        return float(CHECK[self.checker](self, completion))

    def program(self, completion: str) -> tuple[str, str]:
        """The Python program a sandboxed checker runs, and the random line it prints
        once every assert has passed (so code that exits early with status 0 fails)."""
        sentinel = f"glassbox-pass-{secrets.token_hex(16)}"
        done = f"\nprint({sentinel!r})\n"
        if self.checker == "humaneval":
            code = f"{self.prompt}{completion}\n{self.tests}\ncheck({self.entry_point})\n"
        else:
            code = f"{completion.strip()}\n\n{self.tests}\n"
        return code + done, sentinel


def code_passed(exited_ok: bool, stdout: str, sentinel: str) -> bool:
    """A sandboxed check passes when the program exited cleanly and its last output line
    is the sentinel printed after the tests."""
    lines = stdout.rstrip("\n").split("\n")
    return exited_ok and lines[-1] == sentinel


# ---------------------------------------------------------------------------------------
# The checkers (text only; code checkers are in Task.score)
# ---------------------------------------------------------------------------------------


def check_exact(task: Task, completion: str) -> bool:
    """Rule: the completion, stripped, equals the answer exactly (case included)."""
    return completion.strip() == str(task.answer)


def check_number(task: Task, completion: str) -> bool:
    """Rule: the completion, stripped, is one number literal (``-12``, ``3.5``; no words,
    units or thousands separators) equal to the answer."""
    text = completion.strip()
    if not _NUMBER.fullmatch(text):
        return False
    return math.isclose(float(text), float(task.answer), rel_tol=0, abs_tol=1e-9)


def check_list(task: Task, completion: str) -> bool:
    """Rule: the completion, stripped, is the answer's items in order, separated by commas
    (spaces around the commas do not matter; brackets and extra words fail)."""
    items = [item.strip() for item in completion.strip().split(",")]
    return items == [str(x) for x in task.answer]


def check_json(task: Task, completion: str) -> bool:
    """Rule: the completion, stripped, is one JSON object (no prose, no code fence) that
    validates against the task's schema and equals the expected values."""
    import jsonschema

    try:
        value = json.loads(completion.strip())
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python recurses
        return False
    if task.schema is not None:
        try:
            jsonschema.validate(value, task.schema)
        except jsonschema.ValidationError:
            return False
    return value == task.answer


def check_contains(task: Task, completion: str) -> bool:
    """Rule: the answer occurs somewhere in the completion (case included)."""
    return str(task.answer) in completion


def check_tool(task: Task, completion: str) -> bool:
    """Rule: see :func:`glassbox.tasks.tools.check_tool` (a call is right when executing
    it yields the answer; plain text when it is the answer)."""
    from glassbox.tasks.tools import check_tool as check

    return check(task, completion)


def check_regex(task: Task, completion: str) -> bool:
    """Rule: the whole stripped completion matches the answer's regular expression."""
    return re.fullmatch(str(task.answer), completion.strip()) is not None


CHECK: dict[str, Callable[[Task, str], bool]] = {
    "exact": check_exact,
    "number": check_number,
    "list": check_list,
    "json": check_json,
    "contains": check_contains,
    "regex": check_regex,
    "tool": check_tool,
}
