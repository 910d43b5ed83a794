"""The built-in verifiable tasks (``builtin:tasks``): seven families generated from fixed
seeds, no data files.

Each family has one generator ``rng -> Task fields``. A family's tasks come from one
``random.Random`` seeded with the family's fixed seed; prompts are drawn until unique,
and the first ``heldout`` unique prompts form the heldout split, the next ``train`` the
train split, so the splits are disjoint and every run gives the same tasks. Answers are
short on purpose: a ~1M-parameter model can learn them in minutes on a CPU.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from glassbox.errors import GlassboxError
from glassbox.tasks.base import Task
from glassbox.tasks.tools import gen_tools

SPLITS = ("train", "heldout")
DEFAULT_SIZES = {"train": 2000, "heldout": 100}

NAMES = (
    "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Niaj Olivia Peggy Rupert "
    "Sybil Trent Victor Walter Yara Zoe Liam Emma Noah Ava Mia Leo Ines Omar Priya"
).split()
CITIES = [
    tuple(pair.split(":"))
    for pair in (
        "Lyon:France Porto:Portugal Osaka:Japan Cork:Ireland Graz:Austria Turin:Italy "
        "Bergen:Norway Delft:Netherlands Malmo:Sweden Leeds:England Quito:Ecuador "
        "Perth:Australia Seville:Spain Krakow:Poland Bonn:Germany Austin:USA"
    ).split()
]
ITEMS = "lamp chair book mug pen kite clock bag hat desk fan sofa plate radio shoe bike".split()
WORDS = (
    "apple banana cherry river stone cloud garden pepper silver window rabbit letter bottle "
    "button pillow tomato yellow summer coffee mirror planet forest candle rocket butter dinner"
).split()
FRUITS = ["apple", "pear", "fig", "plum", "kiwi", "lime", "grape", "mango", "peach", "melon"]
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _word(rng: random.Random) -> str:
    """A real word or a pronounceable made-up one (made-up words keep prompts unique)."""
    if rng.random() < 0.4:
        return rng.choice(WORDS)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


# ---------------------------------------------------------------------------------------
# One generator per family: rng -> the Task's fields
# ---------------------------------------------------------------------------------------


def gen_arithmetic(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    if rng.random() < 0.5:
        value, text = a + b, f"{a} + {b}"
    else:
        a, b = max(a, b), min(a, b)
        value, text = a - b, f"{a} - {b}"
    return {"prompt": f"What is {text}?", "answer": value, "checker": "number"}


def gen_counting(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.5:
        word = _word(rng)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
        prompt = f"How many times does '{letter}' appear in '{word}'?"
        return {"prompt": prompt, "answer": word.count(letter), "checker": "number"}
    items = [rng.choice(FRUITS) for _ in range(rng.randint(2, 9))]
    prompt = f"How many items are in this list: {', '.join(items)}?"
    return {"prompt": prompt, "answer": len(items), "checker": "number"}


def gen_comparison(rng: random.Random) -> dict[str, Any]:
    a, b = rng.sample(range(1, 1000 if rng.random() < 0.5 else 100), 2)
    which = rng.choice(["larger", "smaller"])
    value = max(a, b) if which == "larger" else min(a, b)
    return {"prompt": f"Which is {which}: {a} or {b}?", "answer": value, "checker": "number"}


def gen_sorting(rng: random.Random) -> dict[str, Any]:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    order = rng.choice(["ascending", "descending"])
    answer = sorted(xs, reverse=order == "descending")
    prompt = f"Sort {order}: {', '.join(map(str, xs))}"
    return {"prompt": prompt, "answer": answer, "checker": "list"}


def _object_schema(types: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {k: {"type": t} for k, t in types.items()},
        "required": list(types),
        "additionalProperties": False,
    }


def gen_json(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["person", "city", "price"])
    if kind == "person":
        name, age = rng.choice(NAMES), rng.randint(18, 90)
        sentence = f"{name} is {age} years old."
        answer, types = {"name": name, "age": age}, {"name": "string", "age": "integer"}
    elif kind == "city":
        city, country = rng.choice(CITIES)
        name = rng.choice(NAMES)
        sentence = f"{name} lives in {city}, {country}."
        answer = {"name": name, "city": city}
        types = {"name": "string", "city": "string"}
    else:
        item, price = rng.choice(ITEMS), rng.randint(2, 500)
        sentence = f"The {item} costs {price} dollars."
        answer, types = {"item": item, "price": price}, {"item": "string", "price": "integer"}
    fields = " and ".join(types)
    return {
        "prompt": f"Extract {fields} as JSON: {sentence}",
        "answer": answer,
        "checker": "json",
        "schema": _object_schema(types),
        "reference": json.dumps(answer),
    }


FORMAT_OPS: dict[str, tuple[str, Callable[[str, int], str]]] = {
    "upper": ("Write the word '{w}' in uppercase.", lambda w, n: w.upper()),
    "brackets": ("Wrap the word '{w}' in square brackets.", lambda w, n: f"[{w}]"),
    "quotes": ("Put the word '{w}' in double quotes.", lambda w, n: f'"{w}"'),
    "reverse": ("Write the word '{w}' backwards.", lambda w, n: w[::-1]),
    "repeat": (
        "Repeat the word '{w}' {n} times, separated by commas.",
        lambda w, n: ", ".join([w] * n),
    ),
}


def gen_format(rng: random.Random) -> dict[str, Any]:
    op = rng.choice(sorted(FORMAT_OPS))
    word, n = _word(rng), rng.randint(2, 4)
    template, apply = FORMAT_OPS[op]
    answer = apply(word, n)
    if op == "repeat":
        return {"prompt": template.format(w=word, n=n), "answer": [word] * n, "checker": "list",
                "reference": answer}  # fmt: skip
    return {"prompt": template.format(w=word, n=n), "answer": answer, "checker": "exact"}


# Code ops: (specification with {a} {k}, reference body, the same as a Python function
# for the asserts, an argument maker, function names, a plausible wrong body, k range).
CODE_OPS: dict[str, tuple[str, str, Callable, Callable, list[str], str, tuple[int, int]]] = {
    "multiply": ("returns {a} multiplied by {k}", "{a} * {k}", lambda x, k: x * k,
                 lambda r: r.randint(-50, 50), ["scale", "times", "multiply", "grow"],
                 "{a} * {k} + 1", (2, 30)),
    "add": ("returns {a} plus {k}", "{a} + {k}", lambda x, k: x + k,
            lambda r: r.randint(-50, 50), ["shift", "add_const", "bump", "offset"],
            "{a} + {k} + 1", (2, 30)),
    "subtract": ("returns {a} minus {k}", "{a} - {k}", lambda x, k: x - k,
                 lambda r: r.randint(-50, 50), ["lower", "minus", "drop", "reduce"],
                 "{k} - {a}", (2, 30)),
    "mod": ("returns the remainder of {a} divided by {k}", "{a} % {k}", lambda x, k: x % k,
            lambda r: r.randint(0, 99), ["remainder", "mod", "modulo", "rest"],
            "{a} // {k}", (2, 30)),
    "repeat": ("returns the string {a} repeated {k} times", "{a} * {k}", lambda s, k: s * k,
               lambda r: _word(r), ["repeat", "copies", "echo", "stamp"],
               "{a} * ({k} + 1)", (2, 6)),
    "prefix": ("returns the first {k} characters of the string {a}", "{a}[:{k}]",
               lambda s, k: s[:k], lambda r: _word(r), ["prefix", "head", "start", "first"],
               "{a}[1:{k} + 1]", (1, 4)),
    "count_above": ("returns how many numbers in the list {a} are greater than {k}",
                    "sum(v > {k} for v in {a})", lambda xs, k: sum(v > k for v in xs),
                    lambda r: [r.randint(0, 40) for _ in range(r.randint(1, 6))],
                    ["count_above", "above", "n_greater", "over"],
                    "sum(v >= {k} for v in {a}) + 1", (2, 30)),
    "sum": ("returns the sum of the list {a}", "sum({a})", lambda xs, k: sum(xs),
            lambda r: [r.randint(-9, 9) for _ in range(r.randint(0, 5))],
            ["total", "sum_all", "add_up", "list_sum"], "sum({a}) + 1", (0, 0)),
    "max": ("returns the largest number in the non-empty list {a}", "max({a})",
            lambda xs, k: max(xs), lambda r: [r.randint(-9, 99) for _ in range(r.randint(1, 5))],
            ["largest", "biggest", "top", "list_max"], "max({a}) + 1", (0, 0)),
    "reverse": ("returns the string {a} reversed", "{a}[::-1]", lambda s, k: s[::-1],
                lambda r: _word(r), ["reverse", "backwards", "flip", "mirror"],
                "{a}[::-1][1:]", (0, 0)),
    "vowels": ("returns how many vowels (a, e, i, o, u) the lowercase string {a} has",
               "sum(c in 'aeiou' for c in {a})", lambda s, k: sum(c in "aeiou" for c in s),
               lambda r: _word(r), ["count_vowels", "vowels", "n_vowels", "vowel_count"],
               "sum(c in 'aeiou' for c in {a}) + 1", (0, 0)),
    "is_even": ("returns True if the integer {a} is even, else False", "{a} % 2 == 0",
                lambda x, k: x % 2 == 0, lambda r: r.randint(-99, 99),
                ["is_even", "even", "check_even", "even_number"], "{a} % 2 == 1", (0, 0)),
    "length": ("returns the length of the string {a}", "len({a})", lambda s, k: len(s),
               lambda r: _word(r), ["length", "size", "count_chars", "str_len"],
               "len({a}) + 1", (0, 0)),
}  # fmt: skip
NUMBER_ARGS, LIST_ARGS, STR_ARGS = ["x", "n", "value", "num"], ["xs", "nums", "values", "items"], [
    "s", "text", "word", "string"]  # fmt: skip
ARG_NAMES = {"multiply": NUMBER_ARGS, "add": NUMBER_ARGS, "subtract": NUMBER_ARGS,
             "mod": NUMBER_ARGS, "is_even": NUMBER_ARGS, "repeat": STR_ARGS, "prefix": STR_ARGS,
             "reverse": STR_ARGS, "vowels": STR_ARGS, "length": STR_ARGS, "sum": LIST_ARGS,
             "max": LIST_ARGS, "count_above": LIST_ARGS}  # fmt: skip


def code_function(name: str, arg: str, body: str) -> str:
    """The reference shape of a code answer: one function returning one expression."""
    return f"def {name}({arg}):\n    return {body}"


def gen_code(rng: random.Random) -> dict[str, Any]:
    op = rng.choice(sorted(CODE_OPS))
    spec, body, fn, sample, names, _, (k_lo, k_hi) = CODE_OPS[op]
    name, arg, k = rng.choice(names), rng.choice(ARG_NAMES[op]), rng.randint(k_lo, k_hi)
    prompt = f"Write a Python function {name}({arg}) that {spec.format(a=arg, k=k)}."
    cases = [sample(rng) for _ in range(4)]
    tests = "\n".join(f"assert {name}({c!r}) == {fn(c, k)!r}" for c in cases)
    reference = code_function(name, arg, body.format(a=arg, k=k))
    answer = {"op": op, "name": name, "arg": arg, "k": k}
    return {"prompt": prompt, "answer": answer, "checker": "python", "tests": tests,
            "reference": reference, "entry_point": name}  # fmt: skip


GENERATORS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "arithmetic": gen_arithmetic,
    "counting": gen_counting,
    "comparison": gen_comparison,
    "sorting": gen_sorting,
    "json": gen_json,
    "format": gen_format,
    "code": gen_code,
}
FAMILIES: tuple[str, ...] = tuple(GENERATORS)
SEEDS = {family: 9000 + i for i, family in enumerate(FAMILIES)}
# Opt-in families (``builtin:tools``): not in builtin:tasks, whose content stays fixed;
# their conversations are longer (tool definitions in the system turn).
OPT_IN: dict[str, Callable[[random.Random], dict[str, Any]]] = {"tools": gen_tools}
SEEDS["tools"] = 9100


def _reference(fields: dict[str, Any]) -> str:
    if "reference" in fields:
        return fields["reference"]
    answer = fields["answer"]
    return ", ".join(map(str, answer)) if isinstance(answer, list) else str(answer)


@lru_cache(maxsize=32)
def _family_tasks(family: str, n_heldout: int, n_train: int) -> tuple[tuple[Task, ...], ...]:
    rng = random.Random(SEEDS[family])
    seen: set[str] = set()
    out: list[Task] = []
    tries = 0
    while len(out) < n_heldout + n_train:
        tries += 1
        if tries > 50 * (n_heldout + n_train) + 1000:
            raise GlassboxError(
                f"Family {family!r} ran out of distinct prompts at {len(out)}; ask for fewer "
                "tasks per split."
            )
        fields = (GENERATORS.get(family) or OPT_IN[family])(rng)
        if fields["prompt"] in seen:
            continue
        seen.add(fields["prompt"])
        split = "heldout" if len(out) < n_heldout else "train"
        index = len(out) if split == "heldout" else len(out) - n_heldout
        out.append(
            Task(
                id=f"{family}-{split}-{index:05d}", family=family, prompt=fields["prompt"],
                reference=_reference(fields), checker=fields["checker"], answer=fields["answer"],
                tests=fields.get("tests", ""), entry_point=fields.get("entry_point", ""),
                schema=fields.get("schema"), tools=fields.get("tools"),
                reference_calls=fields.get("calls"),
            )
        )  # fmt: skip
    return tuple(out[:n_heldout]), tuple(out[n_heldout:])


def builtin_tasks(
    split: str = "train",
    families: tuple[str, ...] | list[str] | None = None,
    train_size: int = DEFAULT_SIZES["train"],
    heldout_size: int = DEFAULT_SIZES["heldout"],
) -> list[Task]:
    """The built-in tasks of one split, family after family (in :data:`FAMILIES` order;
    ``families`` may also name the opt-in ``tools`` family). Changing ``train_size``
    never changes the heldout tasks."""
    if split not in SPLITS:
        raise GlassboxError(f"split={split!r} is not one of {list(SPLITS)}.")
    chosen = list(families) if families is not None else list(FAMILIES)
    unknown = [f for f in chosen if f not in GENERATORS and f not in OPT_IN]
    if unknown:
        raise GlassboxError(f"Unknown task families {unknown}; choose from {[*FAMILIES, *OPT_IN]}.")
    for name, size in (("train_size", train_size), ("heldout_size", heldout_size)):
        if size < 0:
            raise GlassboxError(f"{name}={size} must be >= 0.")
    out: list[Task] = []
    for family in chosen:
        heldout, train = _family_tasks(family, heldout_size, train_size)
        out += heldout if split == "heldout" else train
    return out
