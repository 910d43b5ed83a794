"""Sampling properties, checked with hypothesis over random logits and settings."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from glassbox.config import ModelConfig
from glassbox.infer.engine import Engine, GenerationRequest
from glassbox.infer.sampling import (
    SamplingParams,
    SamplingTensors,
    filter_logits,
    inverse_cdf,
    make_generator,
    sample,
    sample_rows,
    token_logprobs,
)
from glassbox.model import Transformer

logit_rows = st.lists(
    st.floats(-20, 20, allow_nan=False, allow_subnormal=False), min_size=2, max_size=50
)


@given(st.lists(logit_rows.filter(lambda r: len(r) == 8), min_size=1, max_size=4))
def test_temperature_zero_is_argmax(rows):
    logits = torch.tensor(rows)
    greedy = SamplingParams(temperature=0.0)
    assert torch.equal(sample(logits, greedy), logits.argmax(-1))
    assert torch.equal(
        sample_rows(logits, [greedy] * len(rows), [None] * len(rows)), logits.argmax(-1)
    )


@given(logit_rows, st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_set_reaching_p(row, p):
    logits = torch.tensor([row])
    probs = logits.softmax(-1)[0].double()
    kept = torch.isfinite(filter_logits(logits, top_p=p))[0]
    assert kept.any()
    if not kept.all():  # every kept token is at least as likely as every dropped one
        assert probs[kept].min() >= probs[~kept].max() - 1e-9
    mass = probs[kept].sum()
    assert mass >= p - 1e-6  # the kept mass reaches p...
    assert mass - probs[kept].min() < p + 1e-6  # ...and dropping any kept token would not


@given(logit_rows, st.integers(1, 60))
def test_top_k_keeps_k_most_likely(row, k):
    logits = torch.tensor([row])
    kept = torch.isfinite(filter_logits(logits, top_k=k))[0]
    kth = torch.topk(logits[0], min(k, len(row))).values[-1]
    assert kept.sum() >= min(k, len(row))
    assert torch.equal(kept, logits[0] >= kth)


@given(logit_rows, st.floats(0.01, 1.0))
def test_min_p_floor(row, min_p):
    logits = torch.tensor([row])
    probs = logits.softmax(-1)[0]
    kept = torch.isfinite(filter_logits(logits, min_p=min_p))[0]
    # Compared away from the threshold: the filter decides in logit space, where two
    # logits a denormal apart differ while their float probabilities are equal.
    floor = min_p * probs.max()
    assert kept[probs >= floor * (1 + 1e-5)].all()
    assert not kept[probs < floor * (1 - 1e-5)].any()
    assert kept[logits[0].argmax()]


row_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
    top_k=st.integers(0, 10),
    top_p=st.sampled_from([1.0, 0.95, 0.7, 0.3]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
)


@given(
    st.lists(
        st.tuples(logit_rows.filter(lambda r: len(r) == 12), row_params), min_size=1, max_size=6
    ),
    st.integers(0, 2**31),
)
@settings(max_examples=60, deadline=None)
def test_seeded_row_draws_the_same_alone_or_batched(rows, seed):
    """Our sampler: each seeded row takes its own uniforms, so the other rows (their
    number, settings and draws) never change its tokens, over several steps."""
    logits = torch.tensor([r for r, _ in rows])
    params = [p for _, p in rows]
    gens = [make_generator(seed + i) for i in range(len(rows))]
    batched = [sample_rows(logits, params, gens).tolist() for _ in range(3)]  # 3 steps
    for i in range(len(rows)):
        g = make_generator(seed + i)
        alone = [int(sample_rows(logits[i : i + 1], [params[i]], [g])[0]) for _ in range(3)]
        assert alone == [step[i] for step in batched]


def reference_support(row: list[float], p: SamplingParams) -> torch.Tensor | None:
    """The kept set by the definitions, in float64, one row at a time; None when a
    value sits within rounding of a threshold (float32 may then go either way)."""
    # the logits a model hands over are float32: round first, then work in float64
    x = torch.tensor(row, dtype=torch.float32).double() / max(p.temperature, 1e-5)
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < p.top_k < len(row):
        kth = torch.sort(x, descending=True).values[p.top_k - 1]
        near = (x - kth).abs() / kth.abs().clamp_min(1.0)
        if bool(((near < 1e-5) & (x != kth)).any()):
            return None
        keep &= x >= kth
    if p.top_p < 1.0:
        probs = torch.where(keep, x, -torch.inf).softmax(-1)
        order = torch.sort(probs, descending=True, stable=True).indices
        before = torch.cumsum(probs[order], 0) - probs[order]
        if (before - p.top_p).abs().min() < 1e-4:
            return None
        drop = torch.zeros_like(keep)
        drop[order] = before >= p.top_p
        if len(set(probs[order][~drop[order]].tolist()) & set(probs[drop].tolist())):
            return None  # a tie across the cut: either member may be the one kept
        keep &= ~drop
    if p.min_p > 0.0:
        z = torch.where(keep, x, -torch.inf)
        gap = z - z.max() - math.log(p.min_p)
        if gap[keep].abs().min() < 1e-4:
            return None
        keep &= gap >= 0
    return keep


@given(
    st.lists(
        st.tuples(logit_rows.filter(lambda r: len(r) == 10), row_params), min_size=1, max_size=6
    )
)
@settings(max_examples=150, deadline=None)
def test_batched_filter_keeps_each_rows_exact_support(rows):
    """One batched filter over rows with different top-k/top-p/min-p keeps, per row,
    exactly the tokens the definitions keep."""
    params = [p for _, p in rows]
    st_ = SamplingTensors.from_params(params)
    logits = torch.tensor([r for r, _ in rows])
    kept = torch.isfinite(filter_logits(logits, st_.temperature, st_.top_k, st_.top_p, st_.min_p))
    for i, (row, p) in enumerate(rows):
        ref = reference_support(row, p)
        assume(ref is not None)
        assert torch.equal(kept[i], ref), (row, p)


def test_draws_follow_the_filtered_distribution():
    """20000 rows drawn in one vectorized step: frequencies match the kept softmax, and
    tokens outside the support never appear."""
    torch.manual_seed(0)
    row = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0, 0.9, 1.2]])
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9)
    logits = row.expand(20000, -1)
    tokens = sample_rows(logits, [params] * 20000, [None] * 20000)
    target = filter_logits(row, 0.8, 5, 0.9).softmax(-1)[0]
    freq = torch.bincount(tokens, minlength=8).double() / 20000
    assert bool((freq[target == 0] == 0).all())
    assert torch.allclose(freq, target.double(), atol=0.015), (freq, target)


def test_inverse_cdf_never_draws_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(5, -1)
    u = torch.tensor([0.0, 0.4999, 0.5, 0.9999999, 1.0 - 2**-24])
    assert set(inverse_cdf(probs, u).tolist()) <= {1, 3}


@given(logit_rows)
def test_logprobs_are_normalised_and_sorted(row):
    logits = torch.tensor([row])
    chosen, top_v, top_i = token_logprobs(logits, logits.argmax(-1), top_n=3)
    full = torch.log_softmax(logits.double(), -1)[0]
    assert float(full.exp().sum()) == pytest.approx(1.0)
    assert chosen[0] == pytest.approx(float(full.max()), abs=1e-5)  # argmax = the top logprob
    assert top_v[0].tolist() == sorted(top_v[0].tolist(), reverse=True)
    assert torch.allclose(top_v[0].double(), full[top_i[0]], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("test", vocab_size=64, init_std=0.2)).eval()


@given(
    prompts=st.lists(st.lists(st.integers(0, 63), min_size=1, max_size=20), min_size=2, max_size=5),
    max_tokens=st.integers(1, 12),
)
@settings(max_examples=15, deadline=None)
def test_greedy_batched_equals_unbatched(tiny_model, prompts, max_tokens):
    greedy = SamplingParams(temperature=0.0)
    eng = Engine(tiny_model, max_seqs=len(prompts))
    alone = [eng.run([GenerationRequest(p, greedy, max_tokens)])[0][0] for p in prompts]
    together = eng.run([GenerationRequest(p, greedy, max_tokens) for p in prompts])
    assert [g[0] for g in together] == alone
