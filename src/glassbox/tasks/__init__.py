"""Verifiable tasks for alignment: built-in task families with checkers, user task files
(questions and HumanEval problems), a code sandbox, simulated preference pairs, pass@k,
and evaluation of a model on tasks (``glassbox eval``).

    from glassbox.tasks import load_tasks, score_batch, preference_pairs
    tasks = load_tasks("builtin:tasks", split="heldout")
    scores = score_batch(tasks, [t.reference for t in tasks])   # all 1.0

Evaluation lives in :mod:`glassbox.tasks.evaluate` (``evaluate(model, tokenizer, tasks)``),
the sandbox in :mod:`glassbox.tasks.sandbox` (``run_python``, ``sandbox_layers``).
"""

from glassbox.tasks.base import CHECKERS, Task
from glassbox.tasks.builtin import FAMILIES, builtin_tasks
from glassbox.tasks.files import load_tasks, read_task_file
from glassbox.tasks.preferences import CRITERIA, preference_pairs
from glassbox.tasks.scoring import pass_at_k, score_batch, sft_conversations

__all__ = [
    "CHECKERS",
    "CRITERIA",
    "FAMILIES",
    "Task",
    "builtin_tasks",
    "load_tasks",
    "pass_at_k",
    "preference_pairs",
    "read_task_file",
    "score_batch",
    "sft_conversations",
]
