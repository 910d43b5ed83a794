"""Fault isolation and cancellation: a failing request fails alone, slots and counters
never leak, and a dead engine thread says so.

Faults are injected into the real model's forward pass for one chosen request; every
check reads the engine's counters after the events arrived (the engine releases slots
before it dispatches events), never a sleep."""

from __future__ import annotations

import asyncio
import threading

import pytest

from glassbox.infer.engine import (
    AsyncEngine,
    Engine,
    EngineDeadError,
    GenerationRequest,
    RequestStream,
)
from glassbox.infer.sampling import SamplingParams
from glassbox.model import Transformer

GREEDY = SamplingParams(temperature=0.0)


def prompts(tok) -> list[list[int]]:
    texts = ["faults stay", "the others", "finish 0123", "with their request"]
    return [[tok.eot_id, *tok.encode(t)] for t in texts]


@pytest.fixture(scope="module")
def alone(model, tok) -> list[list[int]]:
    """Each prompt's greedy output with nothing else running (no faults)."""
    return [Engine(model, tok).run([GenerationRequest(p, GREEDY, 12)])[0][0] for p in prompts(tok)]


def patch_forward(monkeypatch, model, should_fail) -> None:
    """Make model.forward raise when ``should_fail(idx, rows)`` says so."""
    original = Transformer.forward

    def forward(idx, cache=None, input_pos=None, rows=None, last_only=False, embeds=None):
        if should_fail(idx, rows):
            raise RuntimeError("injected fault")
        return original(model, idx, cache, input_pos, rows, last_only, embeds=embeds)

    monkeypatch.setattr(model, "forward", forward)


def prefills(idx, prompt: list[int]) -> bool:
    """Whether a forward prefills ``prompt`` whole: one row of a batched prefill, which
    left-pads its rows, so a row's prompt is its last tokens."""
    return idx.shape[1] > 1 and any(row[-len(prompt) :] == prompt for row in idx.tolist())


def rows_of(idx, rows) -> list[int]:
    return list(range(idx.shape[0])) if rows is None else rows.tolist()


def assert_idle(eng: Engine) -> None:
    assert eng.num_free_slots == eng.max_seqs and eng.num_running == 0
    assert eng.num_waiting == 0 and not eng.has_work


# ---------------------------------------------------------------------------------------
# The synchronous engine
# ---------------------------------------------------------------------------------------


def run_all(eng: Engine, reqs: list[GenerationRequest]) -> list[list]:
    groups = [eng.add(r) for r in reqs]
    while eng.has_work:
        eng.step()
    return groups


def test_prefill_fault_fails_only_that_request(monkeypatch, model, tok, alone):
    ps = prompts(tok)
    victim = ps[1]
    patch_forward(monkeypatch, model, lambda idx, rows: prefills(idx, victim))
    eng = Engine(model, tok, max_seqs=3)  # 2 + 2 + 1 + 1 sequences: some must queue
    reqs = [GenerationRequest(p, GREEDY, 12, n=2 if i < 2 else 1) for i, p in enumerate(ps)]
    groups = run_all(eng, reqs)
    assert [s.finish_reason for s in groups[1]] == ["error", "error"]
    assert all(str(s.error) == "injected fault" for s in groups[1])
    for i in (0, 2, 3):
        assert [s.output for s in groups[i]] == [alone[i]] * len(groups[i])
        assert all(s.finish_reason == "length" for s in groups[i])
    assert_idle(eng)


def test_decode_fault_is_attributed_to_its_row(monkeypatch, model, tok, alone):
    eng = Engine(model, tok, max_seqs=4)
    groups = [eng.add(GenerationRequest(p, GREEDY, 12)) for p in prompts(tok)]
    victim = groups[2][0]

    def fails(idx, rows):  # the victim's 4th decode step, batched or alone
        return idx.shape[1] == 1 and len(victim.output) >= 4 and victim.slot in rows_of(idx, rows)

    patch_forward(monkeypatch, model, fails)
    while eng.has_work:
        eng.step()
    assert victim.finish_reason == "error" and victim.output == alone[2][:4]
    for i in (0, 1, 3):
        assert groups[i][0].output == alone[i] and groups[i][0].finish_reason == "length"
    assert_idle(eng)


def test_batch_only_fault_is_retried_row_by_row(monkeypatch, model, tok, alone):
    """A step that fails batched but works row by row (say, out of memory) loses nothing."""
    calls = {"batched_failures": 0}

    def fails(idx, rows):
        if idx.shape[1] == 1 and idx.shape[0] > 1 and calls["batched_failures"] < 3:
            calls["batched_failures"] += 1
            return True
        return False

    patch_forward(monkeypatch, model, fails)
    eng = Engine(model, tok, max_seqs=4)
    groups = run_all(eng, [GenerationRequest(p, GREEDY, 12) for p in prompts(tok)])
    assert calls["batched_failures"] == 3
    assert [g[0].output for g in groups] == alone
    assert_idle(eng)


def test_a_broken_model_fails_everyone_but_leaks_nothing(monkeypatch, model, tok):
    eng = Engine(model, tok, max_seqs=2)
    groups = [eng.add(GenerationRequest(p, GREEDY, 12)) for p in prompts(tok)]
    eng.step()  # prefill works...
    patch_forward(monkeypatch, model, lambda idx, rows: True)  # ...then nothing does
    while eng.has_work:
        eng.step()
    assert all(g[0].finish_reason == "error" for g in groups)
    assert_idle(eng)


def test_sampling_fault_fails_only_that_request(model, tok, alone):
    eng = Engine(model, tok, max_seqs=4)
    groups = [eng.add(GenerationRequest(p, GREEDY, 12)) for p in prompts(tok)]
    eng.step()

    class BrokenMatcher:  # a grammar whose state machine crashes mid-way
        def fill_bitmask(self, row):
            raise ValueError("matcher crashed")

    groups[0][0].matcher = BrokenMatcher()
    while eng.has_work:
        eng.step()
    assert groups[0][0].finish_reason == "error"
    assert isinstance(groups[0][0].error, ValueError)
    assert [g[0].output for g in groups[1:]] == alone[1:]
    assert_idle(eng)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_fail_only_their_row(monkeypatch, model, tok, alone, temperature):
    """A forward pass that succeeds but returns NaN for one row: the batched sampler
    refuses, the row-by-row retry finds the row, and only its request fails."""
    eng = Engine(model, tok, max_seqs=4)
    params = [SamplingParams(temperature=temperature, seed=0), GREEDY, GREEDY, GREEDY]
    pairs = zip(prompts(tok), params, strict=True)
    groups = [eng.add(GenerationRequest(p, q, 12)) for p, q in pairs]
    victim = groups[0][0]
    original = Transformer.forward

    def forward(idx, cache=None, input_pos=None, rows=None, last_only=False, embeds=None):
        out = original(model, idx, cache, input_pos, rows, last_only, embeds=embeds)
        if idx.shape[1] == 1 and len(victim.output) >= 2 and victim.slot in rows_of(idx, rows):
            out[rows_of(idx, rows).index(victim.slot)] = float("nan")
        return out

    monkeypatch.setattr(model, "forward", forward)
    while eng.has_work:
        eng.step()
    assert victim.finish_reason == "error" and "NaN" in str(victim.error)
    assert len(victim.output) == 2
    assert [g[0].output for g in groups[1:]] == alone[1:]
    assert_idle(eng)


def test_generate_raises_the_error_and_frees_the_slot(monkeypatch, model, tok):
    patch_forward(monkeypatch, model, lambda idx, rows: idx.shape[1] == 1)
    eng = Engine(model, tok, max_seqs=1)
    with pytest.raises(RuntimeError, match="injected fault"):
        list(eng.generate(GenerationRequest(prompts(tok)[0], GREEDY, 5)))
    assert_idle(eng)


# ---------------------------------------------------------------------------------------
# The async engine
# ---------------------------------------------------------------------------------------


async def collect(stream: RequestStream) -> tuple[list[int], list[str], BaseException | None]:
    """(tokens, finish reasons, error) of a stream; a hung stream fails the test."""
    tokens, reasons = [], []

    async def read():
        async for ev in stream:
            if ev.token is not None:
                tokens.append(ev.token)
            if ev.finish_reason is not None:
                reasons.append(ev.finish_reason)

    try:
        await asyncio.wait_for(read(), timeout=30)
    except TimeoutError:
        raise AssertionError("the stream never ended") from None
    except Exception as e:
        return tokens, reasons, e
    return tokens, reasons, None


def assert_async_idle(ae: AsyncEngine) -> None:
    assert ae.alive
    assert ae.free_slots == ae.engine.max_seqs and ae.num_running == 0
    assert ae.num_waiting == 0 and ae.queue_depth == 0


def run_async(model, tok, main, max_seqs: int = 2, max_queue: int = 8):
    async def outer():
        ae = AsyncEngine(Engine(model, tok, max_seqs=max_seqs), max_queue=max_queue)
        ae.start()
        try:
            await main(ae)
        finally:
            ae.stop()

    asyncio.run(outer())


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_async_fault_reaches_only_its_stream(monkeypatch, model, tok, alone, phase):
    ps = prompts(tok)
    victim_streams: list[RequestStream] = []

    def fails(idx, rows):
        if not victim_streams or not victim_streams[0].seqs:
            return False
        v = victim_streams[0].seqs[0]
        if phase == "prefill":
            return prefills(idx, ps[1])
        return idx.shape[1] == 1 and len(v.output) >= 3 and v.slot in rows_of(idx, rows)

    patch_forward(monkeypatch, model, fails)

    async def main(ae: AsyncEngine):
        # 2 slots, 4 requests: two wait in the queue while the victim fails
        streams = [ae.submit(GenerationRequest(p, GREEDY, 12)) for p in ps]
        victim_streams.append(streams[1])
        results = [await collect(s) for s in streams]
        tokens, _, error = results[1]
        assert isinstance(error, RuntimeError) and str(error) == "injected fault"
        assert len(tokens) == (0 if phase == "prefill" else 3)
        for i in (0, 2, 3):
            assert results[i] == (alone[i], ["length"], None)
        assert_async_idle(ae)
        after = await collect(ae.submit(GenerationRequest(ps[0], GREEDY, 12)))
        assert after == (alone[0], ["length"], None)  # the engine is still healthy

    run_async(model, tok, main)


class Gate:
    """Blocks the engine thread inside forward() when ``when(idx, rows)`` first holds,
    until the test opens it: the engine's state is then frozen between two steps."""

    def __init__(self, monkeypatch, model, when):
        self.when, self.blocked, self.opened, self.used = (
            when,
            threading.Event(),
            threading.Event(),
            False,
        )
        original = Transformer.forward

        def forward(idx, cache=None, input_pos=None, rows=None, last_only=False, embeds=None):
            if not self.used and self.when(idx, rows):
                self.used = True
                self.blocked.set()
                self.opened.wait(10)
            return original(model, idx, cache, input_pos, rows, last_only, embeds=embeds)

        monkeypatch.setattr(model, "forward", forward)

    async def wait_blocked(self) -> None:
        assert await asyncio.to_thread(self.blocked.wait, 10)


def test_cancel_while_queued(monkeypatch, model, tok, alone):
    ps = prompts(tok)
    gate = Gate(monkeypatch, model, lambda idx, rows: idx.shape[1] == 1)  # A's first decode

    async def main(ae: AsyncEngine):
        a = ae.submit(GenerationRequest(ps[0], GREEDY, 12))
        await gate.wait_blocked()  # A holds the only slot, mid-step
        b = ae.submit(GenerationRequest(ps[1], GREEDY, 12))
        assert ae.queue_depth == 1
        b.cancel()
        gate.opened.set()
        assert await collect(b) == ([], ["abort"], None)
        assert await collect(a) == (alone[0], ["length"], None)
        assert_async_idle(ae)
        assert ae.engine.tokens_generated == 12  # B never ran

    run_async(model, tok, main, max_seqs=1)


def test_cancel_during_prefill(monkeypatch, model, tok, alone):
    ps = prompts(tok)
    streams: list[RequestStream] = []

    def cancel_in_prefill(idx, rows):
        if prefills(idx, ps[1]):
            streams[1].cancel()  # arrives while the engine thread is inside prefill
        return False

    patch_forward(monkeypatch, model, cancel_in_prefill)

    async def main(ae: AsyncEngine):
        streams.append(ae.submit(GenerationRequest(ps[0], GREEDY, 12)))
        streams.append(ae.submit(GenerationRequest(ps[1], GREEDY, 12, n=2)))
        tokens, reasons, error = await collect(streams[1])
        assert error is None and reasons == ["abort", "abort"] and len(tokens) <= 2
        assert await collect(streams[0]) == (alone[0], ["length"], None)
        assert_async_idle(ae)

    run_async(model, tok, main, max_seqs=4)


def test_cancel_while_decoding_and_after_finishing(monkeypatch, model, tok, alone):
    ps = prompts(tok)
    streams: list[RequestStream] = []

    def b_has_three(idx, rows):
        return len(streams) > 1 and bool(streams[1].seqs) and len(streams[1].seqs[0].output) >= 3

    gate = Gate(monkeypatch, model, b_has_three)

    async def main(ae: AsyncEngine):
        streams.append(ae.submit(GenerationRequest(ps[0], GREEDY, 4)))
        first = await collect(streams[0])
        assert first == (alone[0][:4], ["length"], None)
        streams[0].cancel()  # after finishing: nothing to do, nothing breaks
        streams.append(ae.submit(GenerationRequest(ps[1], GREEDY, 12)))
        await gate.wait_blocked()
        streams[1].cancel()
        gate.opened.set()
        tokens, reasons, error = await collect(streams[1])
        assert error is None and reasons == ["abort"] and tokens == alone[1][: len(tokens)]
        assert 3 <= len(tokens) < 12
        assert_async_idle(ae)

    run_async(model, tok, main, max_seqs=2)


def test_unattributable_step_error_fails_in_flight_keeps_counts(monkeypatch, model, tok, alone):
    ps = prompts(tok)
    gate = Gate(monkeypatch, model, lambda idx, rows: idx.shape[1] == 1)

    async def main(ae: AsyncEngine):
        eng = ae.engine
        a = ae.submit(GenerationRequest(ps[0], GREEDY, 12))
        await gate.wait_blocked()
        b = ae.submit(GenerationRequest(ps[1], GREEDY, 12))  # will wait inside the engine
        c = ae.submit(GenerationRequest(ps[2], GREEDY, 12))
        step = eng.step
        state = {"broke": False}

        def broken_step():  # a bug outside any one request, once B waits in the engine
            if eng.num_waiting and not state["broke"]:
                state["broke"] = True
                raise RuntimeError("scheduler bug")
            return step()

        monkeypatch.setattr(eng, "step", broken_step)
        gate.opened.set()
        results = [await collect(s) for s in (a, b, c)]
        assert all(isinstance(r[2], RuntimeError) for r in results)
        assert_async_idle(ae)
        assert await collect(ae.submit(GenerationRequest(ps[3], GREEDY, 12))) == (
            alone[3], ["length"], None,
        )  # fmt: skip

    run_async(model, tok, main, max_seqs=1)


def test_engine_thread_death_fails_everyone_and_reports_it(monkeypatch, model, tok):
    ps = prompts(tok)
    gate = Gate(monkeypatch, model, lambda idx, rows: idx.shape[1] == 1)

    async def main(ae: AsyncEngine):
        a = ae.submit(GenerationRequest(ps[0], GREEDY, 12))
        await gate.wait_blocked()
        b = ae.submit(GenerationRequest(ps[1], GREEDY, 12))  # still a command, unread

        def crash(events):
            raise RuntimeError("dispatch bug")

        monkeypatch.setattr(ae, "_dispatch", crash)
        gate.opened.set()
        for s in (a, b):
            _, _, error = await collect(s)
            assert isinstance(error, EngineDeadError) and "dispatch bug" in str(error)
        assert not ae.alive and isinstance(ae.death, RuntimeError)
        assert ae.queue_depth == 0 and ae.free_slots == 1
        with pytest.raises(EngineDeadError):
            ae.submit(GenerationRequest(ps[2], GREEDY, 12))

    run_async(model, tok, main, max_seqs=1)


def test_alive_follows_start_and_stop(model, tok):
    async def main():
        ae = AsyncEngine(Engine(model, tok, max_seqs=1))
        assert not ae.alive
        ae.start()
        assert ae.alive
        ae.stop()
        assert not ae.alive
        with pytest.raises(EngineDeadError, match="stopped"):
            ae.submit(GenerationRequest(prompts(tok)[0], GREEDY, 2))

    asyncio.run(main())
