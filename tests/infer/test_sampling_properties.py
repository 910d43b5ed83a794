"""Sampling properties, checked with hypothesis over random logits and settings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glassbox.config import ModelConfig
from glassbox.infer.engine import Engine, GenerationRequest
from glassbox.infer.sampling import (
    SamplingParams,
    filter_logits,
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
    assert torch.equal(kept, probs >= min_p * probs.max())


@given(logit_rows, st.integers(0, 2**32), st.floats(0.1, 2.0), st.floats(0.1, 1.0))
@settings(max_examples=50)
def test_same_seed_same_draws(row, seed, temperature, top_p):
    logits = torch.tensor([row] * 3)
    params = SamplingParams(temperature=temperature, top_p=top_p)
    draws = [
        [int(sample(logits, params, torch.Generator().manual_seed(seed))[0]) for _ in range(1)]
        for _ in range(2)
    ]
    assert draws[0] == draws[1]
    a = sample_rows(
        logits, [params] * 3, [torch.Generator().manual_seed(seed + i) for i in range(3)]
    )
    b = sample_rows(
        logits, [params] * 3, [torch.Generator().manual_seed(seed + i) for i in range(3)]
    )
    assert torch.equal(a, b)


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
