"""The continuous-batching engine: greedy alone == batched, sampling state per request,
stop rules, context rules, logprobs, cancellation and the async front."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from glassbox.errors import ContextLengthError, GlassboxError
from glassbox.infer.engine import AsyncEngine, Engine, GenerationRequest, QueueFullError
from glassbox.infer.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def prompts(tok) -> list[list[int]]:
    texts = ["hello", "a small test of", "glassbox engine 01234", "world", "x"]
    return [[tok.eot_id, *tok.encode(t)] for t in texts]


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forward passes, no cache: the ground truth."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_matches_full_forward_argmax(model, tok):
    eng = Engine(model, tok, max_seqs=2)
    for p in prompts(tok):
        out = eng.run([GenerationRequest(p, GREEDY, max_tokens=20)])[0][0]
        assert out == greedy_reference(model, p, 20)
        assert len(set(out)) > 3  # the model is not degenerate, so the test can fail


def test_greedy_batched_equals_alone_with_staggered_joins(model, tok):
    ps = prompts(tok)
    alone = [Engine(model, tok).run([GenerationRequest(p, GREEDY, 24)])[0][0] for p in ps]
    eng = Engine(model, tok, max_seqs=3)  # fewer slots than requests: some must wait
    groups = []
    for i, p in enumerate(ps):  # a new request joins every other step
        groups.append(eng.add(GenerationRequest(p, GREEDY, 24 - i)))
        eng.step()
        eng.step()
    while eng.has_work:
        eng.step()
    for i, g in enumerate(groups):
        assert g[0].output == alone[i][: 24 - i]
        assert g[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_alone_or_batched(model, tok):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    p = prompts(tok)[0]
    a = Engine(model, tok).run([GenerationRequest(p, params, 20)])[0][0]
    b = Engine(model, tok).run([GenerationRequest(p, params, 20)])[0][0]
    others = [GenerationRequest(q, SamplingParams(temperature=1.0), 20) for q in prompts(tok)]
    c = Engine(model, tok).run([*others, GenerationRequest(p, params, 20)])[-1][0]
    assert a == b == c
    d = Engine(model, tok).run([GenerationRequest(p, SamplingParams(seed=99), 20)])[0][0]
    assert d != a


def test_n_choices_get_distinct_seeds(model, tok):
    req = GenerationRequest(prompts(tok)[1], SamplingParams(seed=7), 16, n=3)
    outs = Engine(model, tok).run([req])[0]
    assert len(outs) == 3 and len({tuple(o) for o in outs}) == 3
    again = Engine(model, tok).run(
        [GenerationRequest(prompts(tok)[1], SamplingParams(seed=7), 16, n=3)]
    )
    assert again[0] == outs


def test_stop_string_across_tokens_is_cut(model, tok):
    p = prompts(tok)[2]
    full = "".join(ev.text for ev in Engine(model, tok).generate(GenerationRequest(p, GREEDY, 30)))
    stop = full[10:14]
    assert len(stop) == 4 and stop not in full[:10]
    events = list(Engine(model, tok).generate(GenerationRequest(p, GREEDY, 30, stop=[stop])))
    text = "".join(ev.text for ev in events)
    assert text == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop"


def test_stop_token_ends_without_output(model, tok):
    params = SamplingParams(temperature=0.0, logit_bias={tok.end_id: 100.0})
    req = GenerationRequest(prompts(tok)[0], params, 10, stop_token_ids=frozenset({tok.end_id}))
    events = list(Engine(model, tok).generate(req))
    assert len(events) == 1 and events[0].token is None and events[0].finish_reason == "stop"


def test_context_rules(model, tok):
    eng = Engine(model, tok)
    ctx = model.cfg.context_length
    long = [tok.eot_id] * (ctx - 5)
    with pytest.raises(ContextLengthError) as e:
        eng.prepare(GenerationRequest(long, GREEDY, max_tokens=10))
    assert str(ctx) in str(e.value) and str(ctx - 5) in str(e.value) and "10" in str(e.value)
    req = eng.prepare(GenerationRequest(list(long), GREEDY, max_tokens=None))
    assert req.max_tokens == 5  # omitted = the rest of the context
    req = eng.prepare(GenerationRequest(list(long), GREEDY, 10, truncate_prompt_tokens=20))
    assert req.prompt == long[-20:] and req.max_tokens == 10
    out = eng.run([GenerationRequest(list(long), GREEDY, None)])[0][0]
    assert len(out) == 5


def test_cache_max_len_is_enforced_before_prefill(model, tok):
    eng = Engine(model, tok, max_seqs=2, max_len=16)
    with pytest.raises(GlassboxError, match="max_len=16"):
        eng.prepare(GenerationRequest([tok.eot_id] * 10, GREEDY, max_tokens=10))
    assert eng.prepare(GenerationRequest([tok.eot_id] * 10, GREEDY)).max_tokens == 6
    with pytest.raises(GlassboxError, match="max_len=1000"):
        Engine(model, tok, max_len=1000)  # longer than the model's context


def test_no_http_limits_in_the_engine(model, tok):
    """n, top logprobs and stop strings are bounded by the server, not the engine."""
    eng = Engine(model, tok, max_seqs=32)
    req = GenerationRequest(prompts(tok)[0], GREEDY, 2, n=32, logprobs=50, stop=["x"] * 20)
    events = [ev for ev in eng.generate(req) if ev.token is not None]
    assert len(events) >= 32 and all(len(ev.top_logprobs) == 50 for ev in events)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(params=SamplingParams(temperature=-1)), "temperature"),
        (dict(params=SamplingParams(top_p=1.5)), "top_p"),
        (dict(n=0), "n"),
        (dict(n=17), "n"),  # more choices than the engine's 16 slots
        (dict(logprobs=-1), "top_logprobs"),
        (dict(stop_token_ids=frozenset({10**6})), "stop token id"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    ],
)
def test_out_of_range_values_name_the_parameter(model, tok, kwargs, name):
    with pytest.raises(GlassboxError, match=name):
        Engine(model, tok).prepare(GenerationRequest([1, 2, 3], **kwargs))


def test_logprobs_are_log_softmax_of_model_logits(model, tok):
    p = prompts(tok)[3]
    events = list(Engine(model, tok).generate(GenerationRequest(p, GREEDY, 5, logprobs=3)))
    ids = list(p)
    for ev in events:
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids]))[0, -1], -1)
        assert math.isclose(ev.logprob, float(ref[ev.token]), abs_tol=1e-4)
        assert [t for t, _ in ev.top_logprobs] == ref.topk(3).indices.tolist()
        assert ev.top_logprobs[0][0] == ev.token  # greedy picks the most likely token
        ids.append(ev.token)


def test_abort_frees_the_slot(model, tok):
    eng = Engine(model, tok, max_seqs=1)
    a = eng.add(GenerationRequest(prompts(tok)[0], GREEDY, 50))
    b = eng.add(GenerationRequest(prompts(tok)[1], GREEDY, 3))
    eng.step()
    assert eng.num_running == 1 and len(eng.waiting) == 1
    eng.abort(a)
    assert eng.num_running == 0 and a[0].finish_reason == "abort"
    while eng.has_work:
        eng.step()
    assert len(b[0].output) == 3


def test_async_engine_streams_and_bounds_its_queue(model, tok):
    async def main():
        ae = AsyncEngine(Engine(model, tok, max_seqs=2), max_queue=2)
        ae.start()
        try:
            streams = [ae.submit(GenerationRequest(p, GREEDY, 8)) for p in prompts(tok)[:2]]
            with pytest.raises(QueueFullError):
                ae.submit(GenerationRequest(prompts(tok)[2], GREEDY, 8))
            outs = []
            for s in streams:
                outs.append([ev.token async for ev in s if ev.token is not None])
            alone = [
                Engine(model, tok).run([GenerationRequest(p, GREEDY, 8)])[0][0]
                for p in prompts(tok)[:2]
            ]
            assert outs == alone
            assert ae.queue_depth == 0  # cancellation in every phase: test_engine_faults.py
        finally:
            ae.stop()

    asyncio.run(main())


def test_static_decode_step_matches_the_ragged_one(model, tok):
    """decode_static (what torch.compile and CUDA graphs capture: attention over the
    whole cache, rows padded into a spare slot) gives decode_one_token's logits."""
    from glassbox.infer.engine import decode_one_token, decode_static, prefill
    from glassbox.model import KVCache

    cache = KVCache(model.cfg, 4)
    ps = prompts(tok)[:3]
    for slot, p in enumerate(ps):
        prefill(model, cache, torch.tensor(p), slot)
    tokens = torch.tensor([5, 6, 7])
    pos = torch.tensor([len(p) for p in ps])
    rows = torch.tensor([0, 1, 2])
    ref = decode_one_token(model, cache, tokens, pos, rows)
    padded = decode_static(
        model, cache, torch.tensor([5, 6, 7, 0]), torch.tensor([*pos.tolist(), 0]),
        torch.tensor([0, 1, 2, 3]),
    )  # fmt: skip
    torch.testing.assert_close(padded[:3], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens(model, tok):
    """compile="on" on CPU: torch.compile of the static decode step (one bucket here,
    so one compile) decodes the same greedy tokens as eager."""
    p = prompts(tok)[1]
    eager = Engine(model, tok, max_seqs=1).run([GenerationRequest(p, GREEDY, 12)])[0][0]
    eng = Engine(model, tok, max_seqs=1, compile="on")
    assert eng.compiled is not None and eng.compile_decision == "on"
    assert eng.run([GenerationRequest(p, GREEDY, 12)])[0][0] == eager


def test_compile_mode_is_checked(model, tok):
    with pytest.raises(GlassboxError, match="compile='fast'"):
        Engine(model, tok, compile="fast")
