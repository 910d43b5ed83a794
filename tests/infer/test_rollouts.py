"""Engine.generate_batch: rollouts for trainers, their log-probabilities and masks."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from glassbox.config import ModelConfig
from glassbox.errors import GlassboxError
from glassbox.infer.engine import Engine, GenerationRequest
from glassbox.infer.rollout import collate_rollouts
from glassbox.infer.sampling import SamplingParams
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = ["rollouts for a trainer: prompts, samples and their log-probs 42. " * 20]
    return Tokenizer.train(texts, vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    torch.manual_seed(0)
    # vocabulary padded past the tokenizer's: padded ids are never sampled, yet the
    # log-probs stay those of the full raw logits, as a trainer's forward pass sees them
    cfg = ModelConfig.from_name("test", vocab_size=320, init_std=0.2)
    return Transformer(cfg).eval()


def prompts(tok) -> list[list[int]]:
    return [[tok.eot_id, *tok.encode(t)] for t in ["rollouts for", "a trainer: prompts", "42"]]


def test_logprobs_equal_a_full_forward_pass(model, tok):
    eng = Engine(model, tok, max_seqs=8)
    params = SamplingParams(temperature=1.3, top_k=40, top_p=0.9, seed=5)
    rollouts = eng.generate_batch(prompts(tok), n=3, params=params, max_tokens=12)
    assert len(rollouts) == 9
    batch = collate_rollouts(rollouts, pad_id=tok.pad_id)
    with torch.no_grad():
        logits = model(batch.input_ids)  # (N, L, V), no cache
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    logp = logp.gather(-1, batch.input_ids[:, 1:, None])[..., 0]  # (N, L-1)
    mask = batch.completion_mask[:, 1:]
    assert int(mask.sum()) == sum(len(r.tokens) for r in rollouts)
    assert_close(batch.logprobs[:, 1:][mask], logp[mask], atol=1e-4, rtol=1e-4)
    assert all(t < tok.vocab_size for r in rollouts for t in r.tokens)  # padding never drawn
    for r in rollouts:  # the per-rollout view agrees with the tensors
        assert len(r.logprobs) == len(r.tokens) and r.mask.count(True) == len(r.tokens)


def test_order_is_prompt_major_and_stop_tokens_are_kept(model, tok):
    eng = Engine(model, tok, max_seqs=4)
    params = SamplingParams(seed=1)
    free = eng.generate_batch(prompts(tok), n=2, params=params, max_tokens=30, stop_token_ids=())
    stop = free[0].tokens[4]  # seeded: the same run stops there (or earlier) with it
    rollouts = eng.generate_batch(
        prompts(tok), n=2, params=params, max_tokens=30, stop_token_ids={stop}
    )
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [
        (p, s) for p in range(3) for s in range(2)
    ]
    assert [r.prompt for r in rollouts] == [p for p in prompts(tok) for _ in range(2)]
    assert rollouts[0].finish_reason == "stop" and len(rollouts[0].tokens) <= 5
    for r in rollouts:
        if r.finish_reason == "stop":  # the stop token is credited, with its logprob
            assert r.tokens[-1] == stop and stop not in r.tokens[:-1]
        else:
            assert len(r.tokens) == 30 and stop not in r.tokens


def test_greedy_batched_equals_alone(model, tok):
    greedy = SamplingParams(temperature=0.0)
    eng = Engine(model, tok, max_seqs=4)  # 3 prompts x 2 = 6 sequences: some queue
    together = eng.generate_batch(prompts(tok), n=2, params=greedy, max_tokens=10)
    for r in together:
        alone = Engine(model, tok, max_seqs=1).generate_batch(
            [r.prompt], n=1, params=greedy, max_tokens=10
        )[0]
        assert r.tokens == alone.tokens
        assert_close(r.logprobs, alone.logprobs, atol=1e-5, rtol=1e-5)
    assert eng.num_free_slots == 4 and not eng.has_work


def test_seeded_sampling_batched_equals_alone_and_n_beyond_max_seqs(model, tok):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    eng = Engine(model, tok, max_seqs=4)
    # n=6 > max_seqs=4: split into requests of 4 and 2, seeds 11..16 all the same
    together = eng.generate_batch(prompts(tok), n=6, params=params, max_tokens=10)
    assert len(together) == 18
    for r in together[:6] + together[-6:]:
        p = SamplingParams(temperature=1.0, top_p=0.95, seed=11 + r.sample_index)
        alone = Engine(model, tok, max_seqs=1).generate_batch(
            [r.prompt], n=1, params=p, max_tokens=10
        )[0]
        assert r.tokens == alone.tokens
    samples = {tuple(r.tokens) for r in together[:6]}
    assert len(samples) > 3  # really different samples of one prompt


def test_engine_events_match_rollouts(model, tok):
    """The HTTP path and the rollout path are one decoder: same seed, same tokens."""
    params = SamplingParams(temperature=1.0, seed=3)
    p = prompts(tok)[1]
    out = Engine(model, tok).run([GenerationRequest(p, params, 10, n=2)])[0]
    rollouts = Engine(model, tok).generate_batch(
        [p], n=2, params=params, max_tokens=10, stop_token_ids=set()
    )
    assert [r.tokens for r in rollouts] == out


def test_bad_batches_are_refused_before_anything_runs(model, tok):
    eng = Engine(model, tok, max_seqs=2, max_len=20)
    with pytest.raises(GlassboxError, match="max_len=20"):
        eng.generate_batch([prompts(tok)[0], [tok.eot_id] * 15], n=2, max_tokens=10)
    with pytest.raises(GlassboxError, match="prompt token id"):
        eng.generate_batch([[10**6]], n=1, max_tokens=3)
    assert not eng.has_work and eng.num_free_slots == 2


def test_top_logprobs_skip_padding_ids_and_share_the_raw_normalisation(model, tok):
    eng = Engine(model, tok, max_seqs=1)
    p = prompts(tok)[0]
    req = GenerationRequest(p, SamplingParams(temperature=0.0), 3, logprobs=model.cfg.vocab_size)
    events = [ev for ev in eng.generate(req) if ev.token is not None]
    ids = list(p)
    for ev in events:
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), -1)  # all 320
        top_ids = [t for t, _ in ev.top_logprobs]
        assert len(top_ids) == tok.vocab_size and max(top_ids) < tok.vocab_size
        assert_close(ev.logprob, float(ref[ev.token]), atol=1e-4, rtol=1e-4)
        assert_close([v for _, v in ev.top_logprobs[:5]], ref[top_ids[:5]].tolist(), atol=1e-4,
                     rtol=1e-4)  # fmt: skip
        ids.append(ev.token)
