"""The tool-use family (``builtin:tools``): tasks a small model can only get right by
calling a tool, the tools themselves, and evaluation with and without them.

Three tools, each a deterministic Python function (model text is never ``eval``-ed):

- ``calculator(expression)``: + - * / and parentheses over numbers, parsed with
  :mod:`ast` (multi-digit products a ~1M-parameter model cannot compute);
- ``lookup(planet)``: facts about fictional planets that exist only in this module's
  table (nothing to memorize from pretraining: the tool is the only source);
- ``convert(value, from, to)``: km/mi, kg/lb, m/ft and C/F, rounded to 2 decimals.

Every task carries all three definitions (the model must pick the right one) and a
reference trajectory: the user question, one assistant call, the tool's result, the
final answer. Some tasks are easy enough to answer directly (single-digit sums): their
reference answers without a call, so a model also learns when *not* to call.

Scoring one completion (:func:`check_tool`, the ``tool`` checker, what GRPO rewards):
a completion that calls a tool is right when executing the call yields the answer; a
plain-text completion is right when it is the answer (the ``number`` rule). The full
round trip (call -> result -> final answer) is what :func:`evaluate_tools` scores.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from glassbox.conversation import flatten_tools, parse_tool_calls
from glassbox.errors import GlassboxError

if TYPE_CHECKING:
    from glassbox.model import Transformer
    from glassbox.tasks.base import Task
    from glassbox.tokenizer import Tokenizer

FAMILY = "tools"
UNITS = ["km", "mi", "kg", "lb", "m", "ft", "c", "f"]
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate arithmetic: + - * / ( ).",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "maxLength": 40}}, "required": ["expression"],
            "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "lookup", "description": "Facts about a planet of the atlas.",
        "parameters": {"type": "object", "properties": {
            "planet": {"type": "string", "maxLength": 16}}, "required": ["planet"],
            "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "convert", "description": "Convert a value between units.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"}, "from": {"enum": UNITS}, "to": {"enum": UNITS}},
            "required": ["value", "from", "to"], "additionalProperties": False}}},
]  # fmt: skip
TOOL_NAMES = frozenset(t["function"]["name"] for t in TOOLS)
_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


# ---------------------------------------------------------------------------------------
# The tools: deterministic, never eval
# ---------------------------------------------------------------------------------------

_OPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}  # fmt: skip


def number_text(x: float) -> str:
    """A number as the tools and answers write it: an integer, or 2 decimals at most."""
    if not math.isfinite(x) or abs(x) >= 1e15:
        return repr(float(x))
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def calculate(expression: str) -> float:
    """The value of an arithmetic expression: numbers, + - * /, unary minus,
    parentheses. Anything else raises GlassboxError (nothing is executed)."""
    if len(expression) > 200:
        raise GlassboxError("The expression is too long (over 200 characters).")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise GlassboxError(f"Cannot parse {expression!r} as arithmetic.") from None

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise GlassboxError("Division by zero.")
            return _OPS[type(node.op)](left, right)
        raise GlassboxError(f"Only numbers and + - * / ( ) are allowed, not {expression!r}.")

    return value(tree.body)


def _planets() -> dict[str, dict[str, int]]:
    """The fictional atlas: 60 planets with made-up names, moons and discovery years."""
    rng = random.Random(4242)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    out: dict[str, dict[str, int]] = {}
    while len(out) < 60:
        name = "".join(rng.choice(syllables) for _ in range(3)).capitalize()
        out.setdefault(name, {"moons": rng.randint(0, 29), "discovered": rng.randint(2100, 2399)})
    return out


PLANETS = _planets()
# unit pair -> (factor, offset): to = from * factor + offset
_CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("km", "mi"): (0.621371, 0.0), ("mi", "km"): (1.609344, 0.0),
    ("kg", "lb"): (2.204623, 0.0), ("lb", "kg"): (0.453592, 0.0),
    ("m", "ft"): (3.280840, 0.0), ("ft", "m"): (0.3048, 0.0),
    ("c", "f"): (1.8, 32.0), ("f", "c"): (5 / 9, -160 / 9),
}  # fmt: skip


def run_tool(name: str, arguments: dict[str, Any]) -> str:
    """Execute one call; the result text the model reads (an error message when the
    call is invalid: unknown tool, arguments that break the schema, bad values)."""
    import jsonschema

    if name not in _SCHEMAS:
        return json.dumps({"error": f"unknown tool {name!r}"})
    try:
        jsonschema.validate(arguments, _SCHEMAS[name])
    except jsonschema.ValidationError as e:
        return json.dumps({"error": f"invalid arguments: {e.message}"})
    try:
        if name == "calculator":
            return number_text(calculate(arguments["expression"]))
        if name == "lookup":
            planet = arguments["planet"]
            if planet not in PLANETS:
                return json.dumps({"error": f"no planet {planet!r} in the atlas"})
            return json.dumps({"planet": planet, **PLANETS[planet]}, separators=(",", ":"))
        pair = (arguments["from"], arguments["to"])
        if pair not in _CONVERSIONS:
            return json.dumps({"error": f"cannot convert {pair[0]} to {pair[1]}"})
        factor, offset = _CONVERSIONS[pair]
        return number_text(arguments["value"] * factor + offset)
    except (GlassboxError, OverflowError, RecursionError) as e:
        return json.dumps({"error": str(e)})


# ---------------------------------------------------------------------------------------
# The family's generator (called by builtin.py with the family's fixed seed)
# ---------------------------------------------------------------------------------------


def gen_tools(rng: random.Random) -> dict[str, Any]:
    """One task: a prompt, the answer, and the reference call (None: answer directly)."""
    kind = rng.choices(["calculator", "lookup", "convert", "direct"], [4, 3, 3, 1])[0]
    if kind == "calculator":
        a, b, c = rng.randint(100, 9999), rng.randint(11, 999), rng.randint(2, 99)
        expression = rng.choice([f"{a} * {b}", f"{a} * {b} + {c}", f"({a} - {b}) * {c}"])
        prompt = f"What is {expression}?"
        call = ("calculator", {"expression": expression})
    elif kind == "lookup":
        planet = rng.choice(sorted(PLANETS))
        fact = rng.choice(["moons", "discovered"])
        question = {"moons": f"How many moons does the planet {planet} have?",
                    "discovered": f"In which year was the planet {planet} discovered?"}  # fmt: skip
        prompt, call = question[fact], ("lookup", {"planet": planet})
    elif kind == "convert":
        src, dst = rng.choice(sorted(_CONVERSIONS))
        value = rng.randint(1, 500)
        prompt = f"Convert {value} {src} to {dst} (2 decimals)."
        call = ("convert", {"value": value, "from": src, "to": dst})
    else:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        prompt, call = f"What is {a} + {b}?", None
        return {"prompt": prompt, "answer": a + b, "checker": "tool", "tools": TOOLS,
                "calls": [], "reference": str(a + b), "kind": kind}  # fmt: skip
    result = run_tool(*call)
    answer = json.loads(result)[fact] if kind == "lookup" else float(result)
    answer = int(answer) if float(answer).is_integer() else answer
    return {"prompt": prompt, "answer": answer, "checker": "tool", "tools": TOOLS,
            "calls": [{"name": call[0], "arguments": call[1]}],
            "reference": number_text(answer), "kind": kind}  # fmt: skip


# ---------------------------------------------------------------------------------------
# Scoring and SFT conversations
# ---------------------------------------------------------------------------------------


def _is_answer(text: str, answer: Any) -> bool:
    try:
        return math.isclose(float(text.strip()), float(answer), rel_tol=0, abs_tol=1e-9)
    except (TypeError, ValueError):
        return False


def result_has_answer(result: str, answer: Any) -> bool:
    """Whether a tool's result text holds the answer (a number, or a JSON object with
    the answer as one of its values)."""
    if _is_answer(result, answer):
        return True
    try:
        value = json.loads(result)
    except ValueError:
        return False
    return isinstance(value, dict) and any(_is_answer(str(v), answer) for v in value.values())


def check_tool(task: Task, completion: str) -> bool:
    """Rule (``tool``): a completion with tool calls is right when executing one of them
    yields the answer; a plain-text completion when it is the answer (``number`` rule)."""
    names = {t["function"]["name"] for t in task.tools or TOOLS}
    _, calls = parse_tool_calls(completion, names)
    if not calls:
        return _is_answer(completion, task.answer) and _NUMBER_ONLY(completion)
    return any(
        result_has_answer(run_tool(c.name, json.loads(c.arguments)), task.answer) for c in calls
    )


def _NUMBER_ONLY(text: str) -> bool:  # noqa: N802 - the ``number`` checker's literal rule
    from glassbox.tasks.base import _NUMBER

    return _NUMBER.fullmatch(text.strip()) is not None


def reference_messages(task: Task) -> list[dict[str, Any]]:
    """The reference trajectory in OpenAI form: user, [assistant call, tool result],
    final answer."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": task.prompt}]
    for i, call in enumerate(task.reference_calls or []):
        cid = f"call_{i}"
        msgs.append({"role": "assistant", "content": "", "tool_calls": [
            {"id": cid, "type": "function", "function": call}]})  # fmt: skip
        msgs.append({"role": "tool", "tool_call_id": cid,
                     "content": run_tool(call["name"], call["arguments"])})  # fmt: skip
    msgs.append({"role": "assistant", "content": task.reference})
    return msgs


def sft_conversation(task: Task) -> list[dict[str, str]]:
    """The reference trajectory as plain system/user/assistant turns (the tool
    definitions in the system turn, the call and the result as text; see
    glassbox.conversation), ready for any SFT code that takes role/content messages."""
    return flatten_tools(reference_messages(task), task.tools)


# ---------------------------------------------------------------------------------------
# Evaluation with and without tools
# ---------------------------------------------------------------------------------------


@dataclass
class ToolRow:
    """One row of the tool report: the tasks of one kind (or "overall")."""

    kind: str
    tasks: int
    calls: int  # tasks where the model wrote a <tool_call> (with tools offered)
    valid_calls: int  # of those, calls that parse, name a tool and match its schema
    call_validity: float  # valid_calls / calls (1.0 when no call was made)
    accuracy_with_tools: float  # the final answer after the round trip is right
    accuracy_without_tools: float  # the plain question, no tools offered
    skipped: int = 0  # tasks whose prompts + max_tokens did not fit the context


@dataclass
class ToolEvalReport:
    """Per-kind rows, the overall row, the settings and every task's trajectory."""

    rows: list[ToolRow]
    overall: ToolRow
    settings: dict
    samples: list[dict] = field(default_factory=list)

    def table(self) -> str:
        head = ["kind", "tasks", "calls", "valid", "validity", "acc+tools", "acc-tools",
                "skipped"]  # fmt: skip
        body = [
            [r.kind, str(r.tasks), str(r.calls), str(r.valid_calls), f"{r.call_validity:.3f}",
             f"{r.accuracy_with_tools:.3f}", f"{r.accuracy_without_tools:.3f}", str(r.skipped)]
            for r in [*self.rows, self.overall]
        ]  # fmt: skip
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            pairs = enumerate(zip(cells, widths, strict=True))
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

        rule = "-" * len(line(head))
        return "\n".join([line(head), rule, *map(line, body[:-1]), rule, line(body[-1])])

    def to_dict(self) -> dict:
        return {"settings": self.settings, "kinds": [asdict(r) for r in self.rows],
                "overall": asdict(self.overall), "samples": self.samples}  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def evaluate_tools(
    model: Transformer,
    tokenizer: Tokenizer,
    tasks: Sequence[Task],
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    max_seqs: int = 16,
    constrained: bool = True,
) -> ToolEvalReport:
    """Run each tool task twice: with its tools (turn 1 under the ``auto`` tool grammar
    when ``constrained``: a direct answer or one call; a call is executed and its result
    fed back for turn 2, the final answer) and without (the plain question). Reports
    call validity and both accuracies per kind (calculator, lookup, convert, direct)."""
    from glassbox.conversation import encode_prompt
    from glassbox.infer.engine import Engine
    from glassbox.infer.sampling import SamplingParams

    tool_tasks = [t for t in tasks if t.tools]
    if not tool_tasks:
        raise GlassboxError("No tool tasks to evaluate; use --tasks builtin:tools.")
    if max_tokens < 1:
        raise GlassboxError(f"max_tokens={max_tokens} must be >= 1.")
    engine = Engine(model, tokenizer, max_seqs=max_seqs)
    params = SamplingParams(temperature=temperature, seed=seed).validate(engine.vocab_size)
    run = _Runner(engine, tokenizer, params, max_tokens)
    grammar = _auto_grammar(engine, tokenizer, tool_tasks[0].tools) if constrained else None

    users = [[{"role": "user", "content": t.prompt}] for t in tool_tasks]
    first_prompts = [encode_prompt(tokenizer, u, t.tools) for u, t in zip(users, tool_tasks,
                                                                          strict=True)]  # fmt: skip
    plain_prompts = [encode_prompt(tokenizer, u) for u in users]
    fits = [run.fits(a) and run.fits(b) for a, b in zip(first_prompts, plain_prompts, strict=True)]
    keep = [i for i, ok in enumerate(fits) if ok]
    if not keep:
        raise GlassboxError(
            f"No tool task fits the model's {engine.max_len}-token context with "
            f"max_tokens={max_tokens} (the tool definitions alone take "
            f"{min(map(len, first_prompts))} tokens); lower --max-tokens or use a model with "
            "a longer context."
        )
    first = run([first_prompts[i] for i in keep], grammar)
    plain = run([plain_prompts[i] for i in keep], None)
    samples = [_first_turn(tool_tasks[i], text) for i, text in zip(keep, first, strict=True)]
    follow = [s for s in samples if s["result"] is not None]
    second_prompts = [encode_prompt(tokenizer, s.pop("history"), s["task"].tools) for s in follow]
    second_fits = [run.fits(p) for p in second_prompts]
    answers = run([p for p, ok in zip(second_prompts, second_fits, strict=True) if ok], None)
    it = iter(answers)
    for s, ok in zip(follow, second_fits, strict=True):
        s["final"] = next(it) if ok else ""
    for s, text in zip(samples, plain, strict=True):
        s.pop("history", None)
        s["without_tools"] = text
        task = s.pop("task")
        s["correct_with_tools"] = _is_answer(s["final"], task.answer) and _NUMBER_ONLY(s["final"])
        s["correct_without_tools"] = _is_answer(text, task.answer) and _NUMBER_ONLY(text)
    skipped = [tool_tasks[i] for i, ok in enumerate(fits) if not ok]
    kinds = sorted({s["kind"] for s in samples} | {_kind(t) for t in skipped})
    rows = [_tool_row(k, samples, skipped) for k in kinds]
    settings = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed,
                "constrained": constrained, "tasks": len(tool_tasks)}  # fmt: skip
    return ToolEvalReport(rows, _tool_row(None, samples, skipped), settings, samples)


def _kind(task: Task) -> str:
    calls = task.reference_calls or []
    return calls[0]["name"] if calls else "direct"


class _Runner:
    """Greedy/seeded generation of many prompts at once, as text."""

    def __init__(self, engine, tokenizer, params, max_tokens: int):
        self.engine, self.tok, self.params, self.max_tokens = engine, tokenizer, params, max_tokens

    def fits(self, prompt: list[int]) -> bool:
        return len(prompt) + self.max_tokens <= self.engine.max_len

    def __call__(self, prompts: list[list[int]], grammar) -> list[str]:
        import dataclasses

        from glassbox.infer.engine import GenerationRequest

        if not prompts:
            return []
        reqs = [GenerationRequest(p, dataclasses.replace(self.params), self.max_tokens,
                                  stop_token_ids=self.engine.stop_ids, grammar=grammar,
                                  detokenize=False) for p in prompts]  # fmt: skip
        return [self.tok.decode(out[0]) for out in self.engine.run(reqs)]


def _auto_grammar(engine, tokenizer, tools):
    """The ``auto`` tool grammar (text or one call) for our chat format; None for an
    imported model's own format."""
    from glassbox.infer.structured import GrammarCompiler, tool_calls_constraint

    if tokenizer.is_foreign:
        return None
    compiler = GrammarCompiler(tokenizer, engine.vocab_size, sorted(engine.stop_ids))
    specs = [{"name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in tools]  # fmt: skip
    return compiler.compile(tool_calls_constraint(specs, "auto", parallel=False))


def _first_turn(task: Task, text: str) -> dict[str, Any]:
    """What turn 1 did: a call (executed, with the history for turn 2) or an answer."""
    import jsonschema

    sample: dict[str, Any] = {"task_id": task.id, "kind": _kind(task), "task": task,
                              "first": text, "called": "<tool_call>" in text, "valid": False,
                              "result": None, "final": text}  # fmt: skip
    _, calls = parse_tool_calls(text, TOOL_NAMES)
    if not calls:
        return sample
    call = calls[0]
    args = json.loads(call.arguments)
    try:
        jsonschema.validate(args, _SCHEMAS[call.name])
        sample["valid"] = True
    except jsonschema.ValidationError:
        pass
    sample["result"] = run_tool(call.name, args)
    sample["history"] = [
        {"role": "user", "content": task.prompt},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0", "type": "function", "function": call._asdict()}]},
        {"role": "tool", "tool_call_id": "call_0", "content": sample["result"]},
    ]  # fmt: skip
    sample["final"] = ""
    return sample


def _tool_row(kind: str | None, samples: list[dict], skipped: list[Task]) -> ToolRow:
    rows = [s for s in samples if kind in (None, s["kind"])]
    n = len(rows)
    calls = sum(s["called"] for s in rows)
    valid = sum(s["valid"] for s in rows)
    return ToolRow(
        kind or "overall", n, calls, valid, valid / calls if calls else 1.0,
        sum(s["correct_with_tools"] for s in rows) / n if n else 0.0,
        sum(s["correct_without_tools"] for s in rows) / n if n else 0.0,
        sum(kind in (None, _kind(t)) for t in skipped),
    )  # fmt: skip


__all__ = [
    "FAMILY", "PLANETS", "TOOLS", "ToolEvalReport", "calculate", "check_tool",
    "evaluate_tools", "gen_tools", "reference_messages", "run_tool",
    "sft_conversation",
]  # fmt: skip
