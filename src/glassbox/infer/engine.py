"""The inference engine: token ids in, token ids out, many sequences at once.

One KV cache with ``max_seqs`` rows ("slots") is allocated up front; each running
sequence owns one slot. Every :meth:`Engine.step`:

    1. admit waiting requests while slots are free, and prefill each one alone
       (its prompt fills its slot; the last position's logits give its first token);
    2. decode one token for every other running sequence in ONE forward pass: a ragged
       batch of (B, 1) tokens, each row at its own position in its own cache slot;
    3. per row: logit_bias, penalties, grammar mask -> sample -> stop rules.

Requests join and leave between steps (continuous batching); nothing is padded.
Greedy decoding gives the same tokens alone or batched (see tests/infer/test_engine.py).

:class:`AsyncEngine` runs an engine on one background thread that owns the model; the
HTTP server submits requests from its event loop and receives tokens on asyncio queues.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from glassbox.errors import GlassboxError
from glassbox.infer.generate import StopStrings, fit_context
from glassbox.infer.sampling import (
    SamplingParams,
    apply_penalties,
    make_generator,
    sample_rows,
    token_logprobs,
    uses_history,
)
from glassbox.infer.structured import Grammar, TokenMatcher, bitmask_words, unpack_bitmask_np
from glassbox.model import KVCache, Transformer
from glassbox.tokenizer import StreamDecoder, Tokenizer

MAX_N = 16
MAX_TOP_LOGPROBS = 20


# ---------------------------------------------------------------------------------------
# Requests and their outputs
# ---------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    """One request: a prompt of token ids and how to continue it."""

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None = the rest of the context window
    n: int = 1  # independent continuations (choice i uses seed + i when seeded)
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer)
    stop_token_ids: frozenset[int] = frozenset()  # end the sequence, not shown
    logprobs: int | None = None  # None = off; k = also return the k most likely tokens
    truncate_prompt_tokens: int | None = None  # keep only the last N prompt tokens
    grammar: Grammar | None = None  # structured output
    request_id: str = ""


@dataclass
class TokenEvent:
    """What one sequence produced in one step."""

    index: int  # which of the request's n choices
    token: int | None  # None when the event only ends the sequence (stop token, abort)
    text: str = ""  # newly visible text (stop strings held back and removed)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or None (still running)


@dataclass
class Sequence:
    """The engine's state for one choice of one request."""

    seq_id: int
    index: int
    request: GenerationRequest
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    matcher: TokenMatcher | None = None
    decoder: StreamDecoder | None = None
    stops: StopStrings | None = None
    output: list[int] = field(default_factory=list)
    slot: int = -1
    finish_reason: str | None = None
    on_event: Callable[[TokenEvent], None] | None = None
    owner: Any = None  # whoever submitted it (AsyncEngine: the RequestStream)

    @property
    def pos(self) -> int:
        """Cache position of the next token to feed (the last sampled one)."""
        return len(self.prompt) + len(self.output) - 1

    def history(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.prompt + self.output, device=device)


# ---------------------------------------------------------------------------------------
# The forward passes, one function per phase
# ---------------------------------------------------------------------------------------


@torch.inference_mode()
def prefill(model: Transformer, cache: KVCache, prompt: torch.Tensor, slot: int) -> torch.Tensor:
    """Run a whole prompt (T,) into cache row ``slot``; return next-token logits (1, V)."""
    T = prompt.shape[0]
    input_pos = torch.arange(T, device=prompt.device).view(1, T)  # (1, T)
    rows = torch.tensor([slot], device=prompt.device)
    return model(prompt.view(1, T), cache, input_pos, rows, last_only=True)[:, -1]  # (1, V)


@torch.inference_mode()
def decode_one_token(
    model: Transformer,
    cache: KVCache,
    tokens: torch.Tensor,  # (B,) last token of each sequence
    input_pos: torch.Tensor,  # (B,) its position
    rows: torch.Tensor | None,  # (B,) cache slots; None = slots 0..B-1
) -> torch.Tensor:
    """One decoding step for a ragged batch; returns next-token logits (B, V)."""
    return model(tokens.view(-1, 1), cache, input_pos.view(-1, 1), rows)[:, -1]  # (B, V)


# ---------------------------------------------------------------------------------------
# The synchronous engine
# ---------------------------------------------------------------------------------------


class Engine:
    """Continuous-batching scheduler around one model and one KV cache.

    Not thread-safe: one thread calls :meth:`add`, :meth:`abort` and :meth:`step`
    (:class:`AsyncEngine` is that thread for the server).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        max_seqs: int = 16,
        max_len: int | None = None,
        max_prefill_tokens: int = 512,
    ):
        self.model = model
        # Prompt tokens prefilled per step (at least one request): a burst of arrivals
        # is admitted over several steps, so running sequences keep decoding and first
        # tokens go out sooner.
        self.max_prefill_tokens = max_prefill_tokens
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.device = model.embed.weight.device
        self.context_length = model.cfg.context_length
        self.max_seqs = max_seqs
        self.cache = KVCache(
            model.cfg, max_seqs, max_len or model.cfg.context_length, self.device,
            model.embed.weight.dtype,
        )  # fmt: skip
        self.vocab_size = model.cfg.vocab_size
        # Ids past the tokenizer's vocabulary (padding rows of the embedding) decode to
        # nothing, so they are never sampled when text matters.
        self.vocab_limit = tokenizer.vocab_size if tokenizer else self.vocab_size
        self.waiting: deque[list[Sequence]] = deque()  # one entry per request
        self.running: list[Sequence] = []  # sorted by slot
        self.free_slots = list(range(max_seqs))
        self._ids = itertools.count()
        self._bitmask = torch.zeros(max_seqs, bitmask_words(self.vocab_size), dtype=torch.int32)
        self.tokens_generated = 0
        self.on_admit: Callable[[GenerationRequest], None] | None = None

    # -- requests ---------------------------------------------------------------------

    def prepare(self, req: GenerationRequest) -> GenerationRequest:
        """Validate a request and apply the context rule; returns it with the final
        prompt and max_tokens. Raises GlassboxError (ContextLengthError) on bad input."""
        req.params.validate(self.vocab_size)
        if not 1 <= req.n <= MAX_N:
            raise GlassboxError(f"n={req.n} is out of range; use a value in [1, {MAX_N}].")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise GlassboxError(
                f"top_logprobs={req.logprobs} is out of range; use a value in "
                f"[0, {MAX_TOP_LOGPROBS}]."
            )
        if req.n > self.max_seqs:
            raise GlassboxError(f"n={req.n} exceeds the engine's {self.max_seqs} sequence slots.")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise GlassboxError(f"max_tokens={req.max_tokens} must be >= 1.")
        if req.stop and self.tokenizer is None:
            raise GlassboxError("Stop strings need a tokenizer; this engine has none.")
        if len(req.stop) > 8:
            raise GlassboxError(f"stop has {len(req.stop)} strings; give at most 8.")
        bad = [t for t in req.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise GlassboxError(
                f"prompt token id {bad[0]} is out of range; use 0..{self.vocab_size - 1}."
            )
        prompt = list(req.prompt)
        if req.truncate_prompt_tokens is not None:
            if req.truncate_prompt_tokens < 1:
                raise GlassboxError(
                    f"truncate_prompt_tokens={req.truncate_prompt_tokens} must be >= 1."
                )
            prompt = prompt[-req.truncate_prompt_tokens :]
        keep, max_new = fit_context(len(prompt), req.max_tokens, self.context_length)
        req.prompt, req.max_tokens = prompt[len(prompt) - keep :], max_new
        return req

    def add(
        self,
        req: GenerationRequest,
        on_event: Callable[[TokenEvent], None] | None = None,
        prepared: bool = False,
        owner: Any = None,
    ) -> list[Sequence]:
        """Queue a request (n sequences); events go to ``on_event`` as they happen."""
        if not prepared:
            self.prepare(req)
        assert req.max_tokens is not None
        seqs = []
        for i in range(req.n):
            seed = None if req.params.seed is None else req.params.seed + i
            seq = Sequence(
                seq_id=next(self._ids), index=i, request=req, prompt=req.prompt,
                max_tokens=req.max_tokens, params=req.params,
                generator=make_generator(seed, self.device),
                matcher=req.grammar.matcher() if req.grammar else None,
                on_event=on_event, owner=owner,
            )  # fmt: skip
            if self.tokenizer is not None:
                seq.decoder = self.tokenizer.stream_decoder()
                seq.stops = StopStrings(req.stop) if req.stop else None
            seqs.append(seq)
        self.waiting.append(seqs)
        return seqs

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop sequences (the client went away): free their slots, emit nothing."""
        for group in list(self.waiting):
            if group and group[0].request is seqs[0].request:
                self.waiting.remove(group)
        for seq in seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        self._release()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- one scheduling step ----------------------------------------------------------

    def step(self) -> list[tuple[Sequence, TokenEvent]]:
        """Admit + prefill new requests, then decode one token for the others."""
        events: list[tuple[Sequence, TokenEvent]] = []
        decoding = list(self.running)
        self._admit(events)
        decoding = [s for s in decoding if s.finish_reason is None]
        if decoding:
            tokens = torch.tensor([s.output[-1] for s in decoding], device=self.device)
            input_pos = torch.tensor([s.pos for s in decoding], device=self.device)
            slots = [s.slot for s in decoding]
            rows = (
                None
                if slots == list(range(len(slots)))
                else torch.tensor(slots, device=self.device)
            )
            logits = decode_one_token(self.model, self.cache, tokens, input_pos, rows)
            self._sample(decoding, logits, events)
        self._release()
        for seq, ev in events:
            if seq.on_event is not None:
                seq.on_event(ev)
        return events

    def _admit(self, events: list[tuple[Sequence, TokenEvent]]) -> None:
        budget = self.max_prefill_tokens
        while self.waiting and len(self.waiting[0]) <= len(self.free_slots):
            if budget < len(self.waiting[0][0].prompt) and budget < self.max_prefill_tokens:
                break  # this step's prefill budget is spent (one request always fits)
            group = self.waiting.popleft()
            budget -= len(group[0].prompt)
            if self.on_admit is not None:
                self.on_admit(group[0].request)
            prompt = torch.tensor(group[0].prompt, device=self.device)
            logits = None
            for seq in group:
                seq.slot = self.free_slots.pop(0)
                # The n choices share a prompt: prefill once, copy the cache row.
                if logits is None:
                    logits = prefill(self.model, self.cache, prompt, seq.slot)
                    first = seq.slot
                else:
                    T = prompt.shape[0]
                    self.cache.k[:, seq.slot, :T] = self.cache.k[:, first, :T]
                    self.cache.v[:, seq.slot, :T] = self.cache.v[:, first, :T]
                self.running.append(seq)
            self.running.sort(key=lambda s: s.slot)
            self._sample(group, logits.expand(len(group), -1), events)

    def _sample(
        self,
        seqs: list[Sequence],
        logits: torch.Tensor,  # (B, V)
        events: list[tuple[Sequence, TokenEvent]],
    ) -> None:
        logits = logits.float().clone()
        if self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.logit_bias or uses_history(p):
                hist = seq.history(self.device) if uses_history(p) else logits.new_empty(0).long()
                logits[i] = apply_penalties(logits[i], hist, p)
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            bits = self._bitmask[: len(constrained)]
            for j, i in enumerate(constrained):
                seqs[i].matcher.fill_bitmask(bits[j])
            allowed = unpack_bitmask_np(bits, logits.shape[-1])  # (C, V) numpy bool
            for j in np.flatnonzero(~allowed.any(-1)):  # a grammar in error: end the row
                stop_ids = list(seqs[constrained[j]].request.stop_token_ids)
                allowed[j, stop_ids or slice(None)] = True
            if logits.device.type == "cpu":
                # numpy, one thread: torch's bool kernels over a 50k vocabulary cost
                # milliseconds here when the cores are shared.
                rows = logits.numpy()
                for j, i in enumerate(constrained):
                    rows[i, ~allowed[j]] = -np.inf
            else:
                mask = torch.from_numpy(np.ascontiguousarray(allowed)).to(self.device)
                logits[constrained] = logits[constrained].masked_fill(~mask, float("-inf"))
        tokens = sample_rows(logits, [s.params for s in seqs], [s.generator for s in seqs])
        top_n = max((s.request.logprobs or 0) for s in seqs)
        want_lp = any(s.request.logprobs is not None for s in seqs)
        if want_lp:
            chosen, top_v, top_i = token_logprobs(logits, tokens, top_n)
            chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            ev = self._advance(seq, token)
            if want_lp and seq.request.logprobs is not None and ev.token is not None:
                k = seq.request.logprobs
                ev.logprob = chosen[i]
                ev.top_logprobs = list(zip(top_i[i][:k], top_v[i][:k], strict=True))
            events.append((seq, ev))

    def _advance(self, seq: Sequence, token: int) -> TokenEvent:
        """Apply one sampled token to a sequence: grammar, stop rules, text, limits."""
        self.tokens_generated += 1
        if token in seq.request.stop_token_ids:
            seq.finish_reason = "stop"
            return TokenEvent(seq.index, None, self._flush(seq), finish_reason="stop")
        seq.output.append(token)
        ev = TokenEvent(seq.index, token)
        if seq.matcher is not None:
            if not seq.matcher.accept(token) or seq.matcher.done:
                seq.finish_reason = "stop"  # grammar complete (or, defensively, broken)
        if seq.decoder is not None:
            piece = seq.decoder.push(token)
            if seq.stops is not None:
                piece = seq.stops.feed(piece)
                if seq.stops.stopped:
                    seq.finish_reason = "stop"
            ev.text = piece
        if seq.finish_reason is None and len(seq.output) >= seq.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            ev.text += self._flush(seq)
            ev.finish_reason = seq.finish_reason
        return ev

    @staticmethod
    def _flush(seq: Sequence) -> str:
        return seq.stops.flush() if seq.stops is not None else ""

    def _release(self) -> None:
        done = [s for s in self.running if s.finish_reason is not None]
        for s in done:
            self.free_slots.append(s.slot)
            s.slot = -1
        if done:
            self.running = [s for s in self.running if s.finish_reason is None]
            self.free_slots.sort()

    # -- conveniences -----------------------------------------------------------------

    def generate(self, req: GenerationRequest) -> Iterator[TokenEvent]:
        """Run one request to completion on this thread, yielding its events."""
        out: list[TokenEvent] = []
        seqs = self.add(req, on_event=out.append)
        while any(s.finish_reason is None for s in seqs):
            self.step()
            yield from out
            out.clear()

    def run(self, reqs: list[GenerationRequest]) -> list[list[list[int]]]:
        """Run requests together to completion; returns output ids per request, per choice."""
        groups = [self.add(r) for r in reqs]
        while self.has_work:
            self.step()
        return [[s.output for s in g] for g in groups]


# ---------------------------------------------------------------------------------------
# The engine on a background thread, for asyncio callers
# ---------------------------------------------------------------------------------------


class QueueFullError(GlassboxError):
    """The waiting queue is full; try again later (HTTP 429)."""


_STOP = object()


class RequestStream:
    """Events of one submitted request, as an async iterator; cancel() aborts it."""

    def __init__(self, owner: AsyncEngine, req: GenerationRequest):
        self.owner = owner
        self.request = req
        self.queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.seqs: list[Sequence] = []
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self._open = req.n
        self.loop = asyncio.get_running_loop()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while self._open > 0:
            ev = await self.queue.get()
            if isinstance(ev, BaseException):
                raise ev
            if ev.token is not None and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if ev.finish_reason is not None:
                self._open -= 1
            yield ev

    @property
    def finished(self) -> bool:
        return self._open == 0

    def cancel(self) -> None:
        if not self.finished:
            self.owner._commands.put(("abort", self))


class AsyncEngine:
    """Owns an :class:`Engine` on one thread; asyncio code submits and streams."""

    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine = engine
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # requests submitted but not yet admitted to a slot
        self._thread: threading.Thread | None = None
        self._running = False
        engine.on_admit = self._admitted

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="glassbox-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._running = False
            self._commands.put((_STOP, None))
            self._thread.join(timeout=10)
            self._thread = None

    # -- state, read from other threads -------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    # -- submission (event-loop thread) -----------------------------------------------

    def submit(self, req: GenerationRequest) -> RequestStream:
        """Validate and enqueue a request. Raises GlassboxError for bad input and
        QueueFullError when ``max_queue`` requests are already waiting."""
        self.engine.prepare(req)  # pure validation: safe to run off the engine thread
        with self._lock:
            if self._queued >= self.max_queue:
                raise QueueFullError(
                    f"The server is busy: {self._queued} requests are waiting (limit "
                    f"{self.max_queue}). Retry shortly."
                )
            self._queued += 1
        stream = RequestStream(self, req)
        self._commands.put(("add", stream))
        return stream

    def _admitted(self, req: GenerationRequest) -> None:
        with self._lock:
            self._queued -= 1

    # -- the engine thread ------------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            block = not self.engine.has_work
            try:
                while True:
                    cmd, stream = self._commands.get(block=block, timeout=0.5 if block else None)
                    block = False
                    if cmd is _STOP:
                        return
                    self._handle(cmd, stream)
            except queue.Empty:
                pass
            if not self.engine.has_work:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug, not user input: fail the running requests
                self._fail_all(e)
                continue
            by_stream: dict[int, tuple[RequestStream, list[TokenEvent]]] = {}
            for seq, ev in events:
                stream = seq.owner
                by_stream.setdefault(id(stream), (stream, []))[1].append(ev)
            for stream, evs in by_stream.values():
                stream.loop.call_soon_threadsafe(_put_all, stream.queue, evs)

    def _handle(self, cmd: str, stream: RequestStream) -> None:
        if cmd == "add":
            try:
                stream.seqs = self.engine.add(stream.request, prepared=True, owner=stream)
            except Exception as e:
                self._admitted(stream.request)
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, e)
        elif cmd == "abort" and stream.seqs:
            if any(stream.seqs[0] is g[0] for g in self.engine.waiting):
                self._admitted(stream.request)  # it never reached a slot
            live = [s for s in stream.seqs if s.finish_reason is None]
            self.engine.abort(stream.seqs)
            # End the stream for anyone still iterating it.
            evs = [TokenEvent(s.index, None, finish_reason="abort") for s in live]
            if evs:
                stream.loop.call_soon_threadsafe(_put_all, stream.queue, evs)

    def _fail_all(self, error: Exception) -> None:
        seqs = list(self.engine.running)
        for group in self.engine.waiting:
            seqs += group
        streams = {id(s.owner): s.owner for s in seqs}
        for s in seqs:
            s.finish_reason = "abort"
        self.engine.waiting.clear()
        self.engine._release()
        with self._lock:
            self._queued = 0
        for stream in streams.values():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)


def _put_all(q: asyncio.Queue, items: list) -> None:
    for item in items:
        q.put_nowait(item)
