"""Evaluate a language model on verifiable tasks: generate through the engine, score with
the checkers, report accuracy and pass@k per family.

With ``n=1`` and ``temperature=0`` the report is greedy accuracy. With ``n > 1`` samples
per task (at a temperature such as 0.8) it adds the unbiased pass@k for each requested
k <= n, averaged over the family's tasks; ``accuracy`` is then the share of correct
samples (the pass@1 estimate).

Chat tasks are prompted as one user turn (:func:`glassbox.conversation.encode_prompt`);
completion-style tasks (HumanEval) as ``[eot] + prompt``, continued as raw text. A task
whose prompt plus ``max_tokens`` does not fit the model's context is **skipped and
counted** (the ``skipped`` column); if every task would be skipped, evaluation raises
:class:`GlassboxError` instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from glassbox.errors import GlassboxError
from glassbox.tasks.base import Task
from glassbox.tasks.scoring import pass_at_k, score_batch

if TYPE_CHECKING:
    from glassbox.infer.engine import Engine
    from glassbox.infer.sampling import SamplingParams
    from glassbox.model import Transformer
    from glassbox.tasks.tools import ToolEvalReport
    from glassbox.tokenizer import Tokenizer


@dataclass
class FamilyResult:
    """One row of the report: a family's tasks (or "overall")."""

    family: str
    tasks: int
    samples: int
    correct: int
    accuracy: float  # correct samples / samples
    pass_at: dict[int, float] = field(default_factory=dict)  # k -> mean pass@k over tasks
    skipped: int = 0  # tasks whose prompt + max_tokens did not fit the context


@dataclass
class EvalReport:
    """Per-family results, the overall row, the settings and every sample's score."""

    rows: list[FamilyResult]
    overall: FamilyResult
    settings: dict
    samples: list[dict] = field(default_factory=list)  # task_id, sample, completion, score
    tools: ToolEvalReport | None = None  # tool tasks: the round trip, with/without tools

    def accuracy(self, family: str | None = None) -> float:
        """Accuracy of one family, or overall when ``family`` is None."""
        if family is None:
            return self.overall.accuracy
        for row in self.rows:
            if row.family == family:
                return row.accuracy
        raise GlassboxError(f"No family {family!r} in this report; it has {self.families}.")

    @property
    def families(self) -> list[str]:
        return [r.family for r in self.rows]

    def table(self) -> str:
        """A plain-text table: family, tasks, samples, accuracy, pass@k..., skipped."""
        ks = sorted(self.overall.pass_at)
        head = ["family", "tasks", "samples", "accuracy", *(f"pass@{k}" for k in ks), "skipped"]
        body = [
            [r.family, str(r.tasks), str(r.samples), f"{r.accuracy:.3f}",
             *(f"{r.pass_at[k]:.3f}" for k in ks), str(r.skipped)]
            for r in [*self.rows, self.overall]
        ]  # fmt: skip
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(cells, widths, strict=True))]  # fmt: skip
            return "  ".join(padded)

        rule = "-" * len(line(head))
        table = "\n".join([line(head), rule, *map(line, body[:-1]), rule, line(body[-1])])
        if self.tools is not None:
            table += "\n\ntool round trip (call -> result -> answer) vs no tools:\n"
            table += self.tools.table()
        return table

    def to_dict(self) -> dict:
        """Everything as plain JSON-ready values (pass@k keys as "pass@k")."""

        def row(r: FamilyResult) -> dict:
            d = asdict(r)
            d["pass_at"] = {f"pass@{k}": v for k, v in r.pass_at.items()}
            return d

        out = {
            "settings": self.settings,
            "families": [row(r) for r in self.rows],
            "overall": row(self.overall),
            "samples": self.samples,
        }
        if self.tools is not None:
            out["tools"] = self.tools.to_dict()
        return out

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)


def limit_per_family(tasks: Sequence[Task], limit: int | None) -> list[Task]:
    """The first ``limit`` tasks of each family (all of them when ``limit`` is None)."""
    if limit is None:
        return list(tasks)
    if limit < 1:
        raise GlassboxError(f"limit={limit} must be >= 1 task per family (or omitted for all).")
    seen: dict[str, int] = {}
    out = []
    for t in tasks:
        seen[t.family] = seen.get(t.family, 0) + 1
        if seen[t.family] <= limit:
            out.append(t)
    return out


def prompt_ids(tokenizer: Tokenizer, task: Task) -> list[int]:
    """The ids the model continues for ``task``: a chat generation prompt for chat tasks
    (with the task's tool definitions, if it has any), ``[eot] + prompt`` for
    completion-style ones."""
    if task.chat:
        from glassbox.conversation import encode_prompt

        return encode_prompt(tokenizer, [{"role": "user", "content": task.prompt}], task.tools)
    return [tokenizer.eot_id, *tokenizer.encode(task.prompt)]


def _check_settings(tasks: Sequence[Task], n: int, ks: Sequence[int], max_tokens: int) -> None:
    if not tasks:
        raise GlassboxError("No tasks to evaluate; check --tasks and --limit.")
    if n < 1:
        raise GlassboxError(f"n={n} must be >= 1 sample per task.")
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise GlassboxError(f"k={bad[0]} is out of range; pass@k needs 1 <= k <= n={n}.")
    if max_tokens < 1:
        raise GlassboxError(f"max_tokens={max_tokens} must be >= 1.")


def evaluate(
    model: Transformer,
    tokenizer: Tokenizer,
    tasks: Sequence[Task],
    *,
    n: int = 1,
    k: Sequence[int] = (1,),
    temperature: float = 0.0,
    max_tokens: int = 64,
    seed: int = 0,
    max_seqs: int = 16,
    show_progress: bool = True,
    workers: int = 2,
    tool_grammar: bool = True,
) -> EvalReport:
    """Generate ``n`` completions per task (greedy at temperature 0; seeded otherwise),
    score them with the tasks' checkers (code in ``workers`` parallel sandboxes) and
    return an :class:`EvalReport`. Quiet when ``show_progress`` is False.

    Tool tasks (``builtin:tools``) are scored on their first turn like any task (a call
    whose result is the answer, or the answer itself), and also run as a full round trip
    with and without tools (:func:`glassbox.tasks.tools.evaluate_tools`, the first turn
    under the tool grammar when ``tool_grammar``): the report's ``tools`` part."""
    from glassbox.infer.engine import Engine
    from glassbox.infer.sampling import SamplingParams

    ks = sorted(set(k))
    _check_settings(tasks, n, ks, max_tokens)
    engine = Engine(model, tokenizer, max_seqs=max_seqs)
    params = SamplingParams(temperature=temperature, seed=seed).validate(engine.vocab_size)
    prompts = [prompt_ids(tokenizer, t) for t in tasks]
    fits = [len(p) + max_tokens <= engine.max_len for p in prompts]
    kept = [i for i, ok in enumerate(fits) if ok]
    if not kept:
        shortest = min(map(len, prompts))
        raise GlassboxError(
            f"No task fits the context: the shortest prompt has {shortest} tokens, plus "
            f"max_tokens={max_tokens}, over the model's {engine.max_len}; lower --max-tokens."
        )
    completions = _generate(engine, tokenizer, [prompts[i] for i in kept], n, params,
                            max_tokens, show_progress)  # fmt: skip
    settings = {"n": n, "k": ks, "temperature": temperature, "max_tokens": max_tokens,
                "seed": seed, "tasks": len(tasks)}  # fmt: skip
    skipped = [t for t, ok in zip(tasks, fits, strict=True) if not ok]
    report = score_completions([tasks[i] for i in kept], completions, n=n, k=ks,
                               workers=workers, skipped=skipped, settings=settings)  # fmt: skip
    if any(t.tools for t in tasks):
        from glassbox.tasks.tools import evaluate_tools

        report.tools = evaluate_tools(
            model, tokenizer, [t for t in tasks if t.tools], max_tokens=max_tokens,
            temperature=temperature, seed=seed, max_seqs=max_seqs, constrained=tool_grammar,
        )  # fmt: skip
    return report


def score_completions(
    tasks: Sequence[Task],
    completions: Sequence[str],
    *,
    n: int = 1,
    k: Sequence[int] = (1,),
    workers: int = 2,
    skipped: Sequence[Task] = (),
    settings: dict | None = None,
) -> EvalReport:
    """The report for completions already generated: ``n`` per task, task-major
    (task 0's n samples, then task 1's ...). ``skipped`` tasks are counted, not scored."""
    ks = sorted(set(k))
    _check_settings(list(tasks) or list(skipped), n, ks, 1)
    if len(completions) != len(tasks) * n:
        raise GlassboxError(
            f"Got {len(completions)} completions for {len(tasks)} tasks x n={n}; pass n "
            "completions per task, task-major."
        )
    expanded = [t for t in tasks for _ in range(n)]
    scores = score_batch(expanded, completions, workers=workers)
    correct = [0] * len(tasks)
    samples = []
    for j, (completion, score) in enumerate(zip(completions, scores, strict=True)):
        task = tasks[j // n]
        correct[j // n] += int(score == 1.0)
        samples.append({"task_id": task.id, "family": task.family, "sample": j % n,
                        "completion": completion, "score": score})  # fmt: skip
    families = list(dict.fromkeys(t.family for t in [*tasks, *skipped]))
    rows = [_row(f, tasks, correct, skipped, n, ks) for f in families]
    overall = _row(None, tasks, correct, skipped, n, ks)
    return EvalReport(rows, overall, settings or {"n": n, "k": ks}, samples)


def _generate(
    engine: Engine,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    n: int,
    params: SamplingParams,
    max_tokens: int,
    show_progress: bool,
) -> list[str]:
    """Completions as text (stop token removed), prompt-major, n per prompt."""
    chunk = max(1, engine.max_seqs // n) * 4
    out: list[str] = []
    progress = None
    if show_progress:
        from glassbox.track import progress_bar

        progress = progress_bar(transient=True)
        progress.start()
        bar = progress.add_task("eval", total=len(prompts), info="")
    try:
        for start in range(0, len(prompts), chunk):
            part = prompts[start : start + chunk]
            for r in engine.generate_batch(part, n, params, max_tokens):
                tokens = r.tokens
                if tokens and r.finish_reason == "stop" and tokens[-1] in engine.stop_ids:
                    tokens = tokens[:-1]
                out.append(tokenizer.decode(tokens))
            if progress is not None:
                progress.update(bar, advance=len(part), info=f"{len(out)} samples")
    finally:
        if progress is not None:
            progress.stop()
    return out


def _row(family, tasks, correct, skipped, n, ks) -> FamilyResult:
    """One family's row (``family=None``: all tasks, the "overall" row)."""
    done = [c for t, c in zip(tasks, correct, strict=True) if family in (None, t.family)]
    samples = len(done) * n
    pass_at = {k: sum(pass_at_k(n, c, k) for c in done) / len(done) if done else 0.0 for k in ks}
    return FamilyResult(
        family or "overall", len(done), samples, sum(done),
        sum(done) / samples if samples else 0.0, pass_at,
        sum(family in (None, t.family) for t in skipped),
    )  # fmt: skip
