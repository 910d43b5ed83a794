"""A simulated rater: preference pairs built from verifiable tasks.

Each task gives one pair whose chosen answer beats the rejected one by one stated
criterion:

- ``correctness``: the reference vs a plausible wrong answer of the same form (off by
  one, a carry dropped, the other number, two items swapped, a wrong field value, code
  that is off by one);
- ``format``: the reference vs the right answer off-format (``The answer is 132.``
  where a bare number is asked, JSON written as prose, code inside a Markdown fence with
  a sentence before it);
- ``concision``: the reference vs the same answer padded with filler (code: with
  chatty comments; it still passes its tests).

``noise`` is the share of pairs whose vote is flipped (chosen and rejected swapped,
``noisy: True``), as a real rater's mistakes; which pairs, and each pair's criterion
and wrong answer, are fixed by ``seed``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from typing import Any

from glassbox.errors import GlassboxError
from glassbox.tasks.base import Task
from glassbox.tasks.builtin import code_function

CRITERIA = ("correctness", "format", "concision")
FILLER = (
    "I worked through this carefully, step by step, and double-checked the result, "
    "so I am confident that this is the right answer to your question."
)


def preference_pairs(tasks: Sequence[Task], noise: float = 0.0, seed: int = 0) -> list[dict]:
    """One preference pair per task, in TRL's conversational form: ``prompt`` (the user
    turn), ``chosen`` and ``rejected`` (one assistant turn each), plus ``criterion``,
    ``noisy``, ``task_id`` and ``family``."""
    if not 0.0 <= noise <= 1.0:
        raise GlassboxError(f"noise={noise} is outside [0, 1]; it is the share of flipped votes.")
    rng = random.Random(seed)
    pairs = [_pair(task, rng.choice(CRITERIA), rng) for task in tasks]
    flipped = set(rng.sample(range(len(pairs)), round(noise * len(pairs))))
    for i in flipped:
        pairs[i]["chosen"], pairs[i]["rejected"] = pairs[i]["rejected"], pairs[i]["chosen"]
        pairs[i]["noisy"] = True
    return pairs


def _pair(task: Task, criterion: str, rng: random.Random) -> dict[str, Any]:
    if not task.chat:
        raise GlassboxError(
            f"Task {task.id!r} is completion-style (family {task.family!r}); preference pairs "
            "need chat tasks."
        )
    make = {"correctness": wrong_answer, "format": off_format, "concision": padded}[criterion]
    rejected = make(task, rng)
    return {
        "prompt": [{"role": "user", "content": task.prompt}],
        "chosen": [{"role": "assistant", "content": task.reference}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "criterion": criterion,
        "noisy": False,
        "task_id": task.id,
        "family": task.family,
    }


# ---------------------------------------------------------------------------------------
# Correctness: a plausible wrong answer of the same form
# ---------------------------------------------------------------------------------------


def wrong_answer(task: Task, rng: random.Random) -> str:
    """A wrong answer shaped like the reference (it fails the task's checker)."""
    if task.family == "comparison":
        a, b = map(int, re.findall(r"-?\d+", task.prompt)[-2:])
        return str(b if int(task.answer) == a else a)  # the other number
    if task.family == "sorting":
        return ", ".join(map(str, _wrong_order(list(task.answer), rng)))
    if task.family == "json":
        return json.dumps(_wrong_fields(dict(task.answer), rng))
    if task.family == "format":
        return _wrong_format_answer(task)
    if task.family == "code":
        return _wrong_code(task.answer)
    if task.checker == "number":  # arithmetic, counting, and number tasks from files
        value = int(float(task.answer))
        deltas = [1, -1, 10, -10] if task.family == "arithmetic" else [1, -1]
        wrong = value + rng.choice([d for d in deltas if value + d >= 0] or [1])
        return str(wrong)
    raise GlassboxError(
        f"No simulated wrong answer for task {task.id!r} (family {task.family!r}, checker "
        f"{task.checker!r}); preference pairs support the built-in families and 'number' tasks."
    )


def _wrong_order(xs: list[int], rng: random.Random) -> list[int]:
    if len(set(xs)) == 1:
        return [xs[0] + 1, *xs[1:]]
    i = rng.choice([j for j in range(len(xs) - 1) if xs[j] != xs[j + 1]])
    xs[i], xs[i + 1] = xs[i + 1], xs[i]
    return xs


def _wrong_fields(answer: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    key = rng.choice(sorted(answer))
    value = answer[key]
    answer[key] = value + 1 if isinstance(value, int) else value[:-1] or value + "x"
    return answer


def _wrong_format_answer(task: Task) -> str:
    ref = task.reference
    word = re.findall(r"'([^']*)'", task.prompt)[0]
    if task.checker == "list":  # repeat: one copy too few
        return ", ".join([word] * (len(task.answer) - 1))
    candidates = [word.capitalize(), f"({word})", f"'{word}'", word, word[:-1]]
    return next(c for c in candidates if c != ref)


def _wrong_code(spec: dict[str, Any]) -> str:
    from glassbox.tasks.builtin import CODE_OPS

    wrong = CODE_OPS[spec["op"]][5].format(a=spec["arg"], k=spec["k"])
    return code_function(spec["name"], spec["arg"], wrong)


# ---------------------------------------------------------------------------------------
# Format and concision: the right answer, off-format or padded
# ---------------------------------------------------------------------------------------


def off_format(task: Task, rng: random.Random) -> str:
    """The right answer in the wrong shape (the checker refuses it)."""
    if task.family == "code":
        return f"Here is the function:\n```python\n{task.reference}\n```"
    if task.family == "json":
        return "The " + " and the ".join(f"{k} is {v}" for k, v in task.answer.items()) + "."
    if task.family == "sorting":
        return f"[{task.reference}]"
    lead = rng.choice(["The answer is", "Answer:", "Sure! It is"])
    return f"{lead} {task.reference}."


def padded(task: Task, rng: random.Random) -> str:
    """The right answer with filler around it (code: chatty comments; still correct)."""
    if task.family == "code":
        head, body = task.reference.split("\n", 1)
        return (
            f"# Here is a function that does exactly what you asked for.\n{head}\n"
            f"    # {FILLER}\n{body}\n# I hope this helps!"
        )
    return f"{task.reference}\n\n{FILLER}"
