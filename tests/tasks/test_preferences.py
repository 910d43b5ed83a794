"""The simulated rater: pairs that differ by one stated criterion, with controlled noise."""

from __future__ import annotations

import pytest

from glassbox.errors import GlassboxError
from glassbox.tasks import CRITERIA, FAMILIES, load_tasks, preference_pairs, score_batch


@pytest.fixture(scope="module")
def tasks():
    heldout = load_tasks("builtin:tasks", split="heldout")
    return [t for t in heldout if t.family != "code"] + [t for t in heldout if t.family == "code"][
        :15
    ]


def text(message_list):
    assert len(message_list) == 1
    return message_list[0]["content"]


def test_pairs_are_in_trl_conversational_form(tasks):
    pairs = preference_pairs(tasks)
    assert len(pairs) == len(tasks)
    for pair, task in zip(pairs, tasks, strict=True):
        assert pair["prompt"] == [{"role": "user", "content": task.prompt}]
        assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
        assert pair["criterion"] in CRITERIA and pair["noisy"] is False
        assert text(pair["chosen"]) == task.reference != text(pair["rejected"])
    assert {p["criterion"] for p in pairs} == set(CRITERIA)
    assert {p["family"] for p in pairs} == set(FAMILIES)


def test_the_checker_agrees_with_the_rater(tasks):
    pairs = preference_pairs(tasks, seed=3)
    chosen = score_batch(tasks, [text(p["chosen"]) for p in pairs])
    rejected = score_batch(tasks, [text(p["rejected"]) for p in pairs])
    assert chosen == [1.0] * len(tasks)
    for pair, r in zip(pairs, rejected, strict=True):
        if pair["criterion"] in ("correctness", "format"):
            assert r == 0.0, pair  # a wrong or off-format answer fails the checker
        elif pair["family"] == "code":
            assert r == 1.0, pair  # chatty comments: correct but not concise
        assert len(text(pair["rejected"])) > 0
    padded = [p for p in pairs if p["criterion"] == "concision"]
    assert all(len(text(p["rejected"])) > len(text(p["chosen"])) for p in padded)


def test_correctness_pairs_have_the_same_form(tasks):
    pairs = preference_pairs(tasks, seed=1)
    for pair in (p for p in pairs if p["criterion"] == "correctness"):
        chosen, rejected = text(pair["chosen"]), text(pair["rejected"])
        if pair["family"] in ("arithmetic", "counting", "comparison"):
            assert rejected.lstrip("-").isdigit()
        if pair["family"] == "sorting":
            assert (
                sorted(rejected.split(", ")) == sorted(chosen.split(", "))
                or len(set(chosen.split(", "))) == 1
            )
        if pair["family"] == "json":
            assert rejected.startswith("{") and rejected.endswith("}")


@pytest.mark.parametrize("noise", [0.1, 0.25, 0.5])
def test_noise_flips_that_share_of_votes_deterministically(tasks, noise):
    clean = preference_pairs(tasks, noise=0.0, seed=7)
    noisy = preference_pairs(tasks, noise=noise, seed=7)
    flipped = [i for i, p in enumerate(noisy) if p["noisy"]]
    assert abs(len(flipped) / len(tasks) - noise) <= 1 / len(tasks)
    for i, (a, b) in enumerate(zip(clean, noisy, strict=True)):
        if i in flipped:
            assert (a["chosen"], a["rejected"]) == (b["rejected"], b["chosen"])
        else:
            assert a == b
    assert preference_pairs(tasks, noise=noise, seed=7) == noisy
    other = [i for i, p in enumerate(preference_pairs(tasks, noise=noise, seed=8)) if p["noisy"]]
    assert other != flipped


def test_noise_outside_zero_to_one_is_refused(tasks):
    for bad in (-0.1, 1.5):
        with pytest.raises(GlassboxError, match=f"noise={bad}"):
            preference_pairs(tasks, noise=bad)


def test_completion_style_tasks_are_refused():
    with pytest.raises(GlassboxError, match="completion-style"):
        preference_pairs(load_tasks("builtin:humaneval-sample"))
