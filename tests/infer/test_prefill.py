"""Batched and chunked prefill: chunks give the logits of one-shot prefill, a batch of
left-padded prompts gives what each gives alone, and a long prompt arriving while
others decode is prefilled over several steps without stopping them."""

from __future__ import annotations

import pytest
import torch

from glassbox.errors import GlassboxError
from glassbox.infer.engine import Engine, GenerationRequest, prefill, prefill_chunks
from glassbox.infer.sampling import SamplingParams
from glassbox.model import KVCache

GREEDY = SamplingParams(temperature=0.0)


def random_prompt(model, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist()


def test_chunked_prefill_gives_one_shot_logits_and_cache(model):
    prompt = torch.tensor(random_prompt(model, 45, 0))
    one = KVCache(model.cfg, 2)
    ref = prefill(model, one, prompt, 1)  # (1, V)
    chunked = KVCache(model.cfg, 2)
    for start in range(0, 45, 7):  # chunks of 7 (the last one 3)
        chunk = prompt[start : start + 7]
        logits = prefill_chunks(model, chunked, [chunk], [start], [1])
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked.k[:, 1, :45], one.k[:, 1, :45], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked.v[:, 1, :45], one.v[:, 1, :45], rtol=1e-4, atol=1e-5)


def test_batched_prefill_equals_one_by_one(model):
    """Rows of different lengths and start positions (second chunks), in cache rows out
    of order, in one left-padded forward."""
    prompts = [random_prompt(model, n, s) for n, s in ((30, 1), (9, 2), (50, 3), (2, 4))]
    split = [10, 0, 17, 1]  # tokens already in the cache before the batched forward
    slots = [2, 0, 3, 1]
    alone, batched = KVCache(model.cfg, 4), KVCache(model.cfg, 4)
    refs = []
    for p, k, slot in zip(prompts, split, slots, strict=True):
        t = torch.tensor(p)
        for cache in (alone, batched):
            if k:
                prefill_chunks(model, cache, [t[:k]], [0], [slot])
        refs.append(prefill_chunks(model, alone, [t[k:]], [k], [slot]))  # (1, V)
    order = [1, 3, 0, 2]
    logits = prefill_chunks(
        model,
        batched,
        [torch.tensor(prompts[i][split[i] :]) for i in order],
        [split[i] for i in order],
        [slots[i] for i in order],
    )  # (4, V)
    for row, i in enumerate(order):
        torch.testing.assert_close(logits[row : row + 1], refs[i], rtol=1e-4, atol=1e-4)
        n, slot = len(prompts[i]), slots[i]  # the real entries match; padding wrote past them
        torch.testing.assert_close(
            batched.k[:, slot, :n], alone.k[:, slot, :n], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            batched.v[:, slot, :n], alone.v[:, slot, :n], rtol=1e-4, atol=1e-5
        )


def requests(model, tok) -> list[GenerationRequest]:
    lens = (5, 40, 12, 3, 27)
    return [
        GenerationRequest(random_prompt(model, n, 10 + n), GREEDY, 10, logprobs=2, n=1 + (n == 12))
        for n in lens
    ]


def outputs(eng: Engine, reqs: list[GenerationRequest]):
    groups = [eng.add(r) for r in reqs]
    while eng.has_work:
        eng.step()
    return [[(s.output, s.logprobs) for s in g] for g in groups]


@pytest.mark.parametrize("budget", [1, 4, 16])
def test_engine_small_budgets_give_the_same_tokens_and_logprobs(model, tok, budget):
    ref = outputs(Engine(model, tok, max_seqs=6, max_batched_tokens=512), requests(model, tok))
    got = outputs(Engine(model, tok, max_seqs=6, max_batched_tokens=budget), requests(model, tok))
    for ref_group, got_group in zip(ref, got, strict=True):
        for (ref_out, ref_lp), (out, lp) in zip(ref_group, got_group, strict=True):
            assert out == ref_out
            assert lp == pytest.approx(ref_lp, abs=1e-4)


def test_batched_prefill_uses_one_forward_for_several_prompts(monkeypatch, model, tok):
    shapes: list[tuple[int, int]] = []
    original = type(model).forward

    def forward(idx, *args, **kwargs):
        shapes.append(tuple(idx.shape))
        return original(model, idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    eng = Engine(model, tok, max_seqs=8, max_batched_tokens=512)
    reqs = requests(model, tok)
    for r in reqs:
        eng.add(r)
    eng.step()
    assert shapes == [(5, 40)]  # all five prompts, left-padded to the longest


def test_long_prompt_does_not_stop_running_streams(model, tok):
    """A 56-token prompt arrives while three streams decode; with 8 tokens a step it is
    prefilled over 12 steps (8 - 3 decode tokens = 5 prompt tokens a step), and every
    one of those steps still gives each running stream its next token."""
    eng = Engine(model, tok, max_seqs=4, max_batched_tokens=8)
    running = [
        eng.add(GenerationRequest(random_prompt(model, 4, i), GREEDY, 30))[0] for i in range(3)
    ]
    eng.step()
    eng.step()  # three streams now decode every step
    long = eng.add(GenerationRequest(random_prompt(model, 56, 99), GREEDY, 4))[0]
    prefill_steps = 0
    while not long.output:
        before = [len(s.output) for s in running]
        eng.step()
        prefill_steps += 1
        assert [len(s.output) for s in running] == [b + 1 for b in before]
        assert long.prefilled <= 56
    assert prefill_steps == 12  # 56 / 5 rounded up
    while eng.has_work:
        eng.step()
    alone = Engine(model, tok).run([GenerationRequest(random_prompt(model, 56, 99), GREEDY, 4)])
    assert long.output == alone[0][0]


def test_batched_tokens_must_be_positive(model, tok):
    with pytest.raises(GlassboxError, match="max_batched_tokens=0"):
        Engine(model, tok, max_batched_tokens=0)


def _greedy_with_embeds(model, ids: list[int], embeds: torch.Tensor, n: int) -> list[int]:
    """Reference: full forwards over [embeds, then the embedded new tokens], no cache."""
    x, out = embeds[None], []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids + out]), embeds=x)[0, -1].argmax())
        out.append(nxt)
        x = torch.cat([x, model.embed(torch.tensor([[nxt]]))], dim=1)
    return out


@pytest.mark.parametrize("budget", [256, 5])  # one prefill, or chunks of 5 beside a decode
def test_prompt_embeds_replace_the_token_embeddings_at_prefill(model, budget):
    """A request's input vectors (a VLM prompt: image vectors at some slots) reach the
    prefill, in one forward or in chunks, and decoding continues from them."""
    ids = random_prompt(model, 23, 5)
    with torch.no_grad():
        embeds = model.embed(torch.tensor(ids)).clone()  # (T, C)
        embeds[4:9] = torch.randn(5, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
        want = _greedy_with_embeds(model, ids, embeds, 6)
    engine = Engine(model, max_seqs=2, max_batched_tokens=budget)
    other = GenerationRequest(random_prompt(model, 3, 6), GREEDY, max_tokens=12)
    req = GenerationRequest(ids, GREEDY, max_tokens=6, prompt_embeds=embeds)
    plain = GenerationRequest(ids, GREEDY, max_tokens=6)
    got = engine.run([other, req, plain])
    assert got[1][0] == want
    assert got[1][0] != got[2][0]  # the vectors, not the ids' embeddings, were read


def test_prompt_embeds_follow_truncation_and_shape_is_checked(model):
    ids = random_prompt(model, 20, 7)
    embeds = torch.randn(20, model.cfg.d_model)
    engine = Engine(model, max_seqs=1)
    req = engine.prepare(GenerationRequest(ids, GREEDY, max_tokens=2, prompt_embeds=embeds,
                                           truncate_prompt_tokens=8))  # fmt: skip
    assert req.prompt == ids[-8:] and torch.equal(req.prompt_embeds, embeds[-8:])
    with pytest.raises(GlassboxError, match=r"prompt_embeds has shape \(19, \d+\)"):
        engine.prepare(GenerationRequest(ids, GREEDY, prompt_embeds=embeds[1:]))
