"""Scoring many completions, the pass@k estimator, and SFT conversations from tasks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from glassbox.errors import GlassboxError
from glassbox.tasks.base import SANDBOXED, Task


def score_batch(tasks: Sequence[Task], completions: Sequence[str], workers: int = 2) -> list[float]:
    """``tasks[i].score(completions[i])`` for every i; code checks run in up to
    ``workers`` sandboxes at once (each a separate process), text checks inline."""
    if len(tasks) != len(completions):
        raise GlassboxError(
            f"score_batch got {len(tasks)} tasks and {len(completions)} completions; pass one "
            "completion per task (repeat a task to score several samples of it)."
        )
    if workers < 1:
        raise GlassboxError(f"workers={workers} must be >= 1.")
    scores = [0.0] * len(tasks)
    code = [i for i, t in enumerate(tasks) if t.checker in SANDBOXED]
    for i, (task, completion) in enumerate(zip(tasks, completions, strict=True)):
        if task.checker not in SANDBOXED:
            scores[i] = task.score(completion)
    if code:
        with ThreadPoolExecutor(max_workers=min(workers, len(code))) as pool:
            for i, s in zip(code, pool.map(lambda j: tasks[j].score(completions[j]), code),
                            strict=True):  # fmt: skip
                scores[i] = s
    return scores


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` are correct:
    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so
    large n never overflows."""
    if not (0 <= c <= n and n >= 1):
        raise GlassboxError(f"pass_at_k needs 0 <= c <= n and n >= 1; got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise GlassboxError(f"pass_at_k k={k} must be in 1..n={n}; draw at least k samples.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def sft_conversations(tasks: Sequence[Task]) -> list[list[dict[str, str]]]:
    """One user/assistant conversation per chat task: the prompt, then the reference.
    Tool tasks give their whole reference trajectory (tool definitions, call, result,
    answer) as plain role/content turns (:func:`glassbox.tasks.tools.sft_conversation`).
    Completion-style tasks (``chat=False``) are refused: they have no user turn."""
    from glassbox.tasks.tools import sft_conversation

    raw = [t.id for t in tasks if not t.chat]
    if raw:
        raise GlassboxError(
            f"{len(raw)} tasks are completion-style (e.g. {raw[0]!r}), not chat; SFT "
            "conversations need chat tasks (filter with [t for t in tasks if t.chat])."
        )
    return [
        sft_conversation(t) if t.tools else
        [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.reference}]
        for t in tasks
    ]  # fmt: skip
