"""From a validated request to engine work and back: the part both generation endpoints
share (/v1/completions, /v1/chat/completions).

    prompts (token ids) --compile grammar (worker thread, time limit)
      --submit one engine request per prompt--> RequestStreams
      --Events: merged, deadlines, disconnect watch--> JSON body | SSE (serve/streaming.py)

Every request ends with one outcome in the metrics (see serve/metrics.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from glassbox.errors import ContextLengthError, GlassboxError
from glassbox.infer.engine import EngineDeadError, RequestStream, TokenEvent
from glassbox.infer.structured import Grammar
from glassbox.serve.errors import APIError, bad_request, from_glassbox, request_id_of
from glassbox.serve.limits import ServeLimits
from glassbox.serve.loading import ServedModel
from glassbox.serve.protocol import ChatCompletionRequest, CompletionRequest
from glassbox.serve.render import Renderer
from glassbox.serve.state import ServerState
from glassbox.serve.streaming import sse

# Prompts longer than this are tokenized on a worker thread, not the event loop.
BIG_PROMPT_CHARS = 4096
TIMEOUT_CODES = ("request_timeout", "queue_timeout")
Body = CompletionRequest | ChatCompletionRequest


def engine_unavailable() -> APIError:
    """The engine thread has ended (a crash, or shutdown): the server, not the request."""
    return APIError(
        503,
        "The model's engine is not running (the server is shutting down or has failed); "
        "retry later or on another replica. /health reports it.",
        "server_error",
        None,
        "engine_unavailable",
    )


async def off_loop(fn: Callable[..., Any], *args: Any, heavy: bool = True) -> Any:
    """Run ``fn`` on a worker thread when it is heavy, so other streams keep flowing."""
    return await asyncio.to_thread(fn, *args) if heavy else fn(*args)


async def compile_grammar(state: ServerState, sm: ServedModel, body: Body) -> Grammar | None:
    """The request's grammar, compiled once, off the event loop, within a time limit."""
    found = body.constraint(state.limits)
    if found is None:
        return None
    param, constraint = found
    limit = state.limits.grammar_timeout
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(state.grammar_pool, sm.compiler.compile, constraint)
    try:
        return await asyncio.wait_for(job, limit)
    except TimeoutError:
        # The worker finishes on its own (llguidance's parser limits bound it).
        raise bad_request(
            f"{param} took longer than {limit} s to compile; simplify it (the operator sets "
            "the limit with --grammar-timeout).",
            param,
            "grammar_too_complex",
        ) from None
    except GlassboxError as e:
        raise bad_request(str(e), param) from None


class Events:
    """The events of one HTTP request's engine streams, merged in arrival order, with the
    queue-wait and request deadlines, and a watch that cancels everything when the client
    disconnects."""

    def __init__(
        self, request: Request, streams: list[RequestStream], limits: ServeLimits, arrived: float
    ):
        self.streams = streams
        self.queue: asyncio.Queue = asyncio.Queue()
        self.open = len(streams)
        self.started = False
        self.disconnected = False
        self.limits = limits
        rt, qw = limits.request_timeout, limits.max_queue_wait
        self.deadline = arrived + rt if rt else None
        self.first_deadline = arrived + qw if qw else None
        self.pumps = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]
        self.watcher = asyncio.create_task(self._watch(request))

    async def _pump(self, i: int, stream: RequestStream) -> None:
        try:
            async for ev in stream:
                await self.queue.put((i, ev))
        except Exception as e:  # an engine failure: delivered to the reader
            await self.queue.put((i, e))
        await self.queue.put((i, None))

    async def _watch(self, request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self.cancel_streams()
                return

    def cancel_streams(self) -> None:
        for s in self.streams:
            s.cancel()

    def _wait_limit(self) -> tuple[float | None, str | None]:
        """Seconds left and which deadline that is."""
        now = time.monotonic()
        options = [(self.deadline, "request_timeout")]
        if not self.started:
            options.append((self.first_deadline, "queue_timeout"))
        options = [(d, code) for d, code in options if d is not None]
        if not options:
            return None, None
        d, code = min(options)
        return max(0.0, d - now), code

    async def next(self) -> tuple[int, TokenEvent] | None:
        """The next (prompt index, event), or None when every stream has finished.
        Raises APIError at a deadline and the engine's exception on a failure."""
        while self.open:
            timeout, code = self._wait_limit()
            try:
                i, ev = await asyncio.wait_for(self.queue.get(), timeout)
            except TimeoutError:
                self.cancel_streams()
                raise self._timeout_error(code) from None
            if ev is None:
                self.open -= 1
                continue
            if isinstance(ev, BaseException):
                self.cancel_streams()
                if isinstance(ev, EngineDeadError):
                    raise engine_unavailable() from ev
                raise ev
            self.started = True
            return i, ev
        return None

    def _timeout_error(self, code: str | None) -> APIError:
        if code == "queue_timeout":
            return APIError(
                429,
                f"The request waited longer than {self.limits.max_queue_wait} s for a slot; "
                "the server is busy (the operator sets the limit with --max-queue-wait). "
                "Retry shortly.",
                "rate_limit_error",
                None,
                "queue_timeout",
            )
        return APIError(
            504,
            f"The request ran longer than {self.limits.request_timeout} s (the operator sets "
            "the limit with --request-timeout); ask for fewer tokens (max_tokens) or fewer "
            "choices (n).",
            "server_error",
            None,
            "request_timeout",
        )

    def close(self) -> None:
        """Stop watching and abort whatever is still running (idempotent)."""
        self.watcher.cancel()
        for p in self.pumps:
            p.cancel()
        self.cancel_streams()


def check_token_ids(prompts: list[list[int]], vocab_size: int) -> None:
    """400 naming ``prompt`` for an empty token list or an id outside the vocabulary."""
    for p in prompts:
        if not p:
            raise bad_request("prompt has an empty list of token ids; send at least one.", "prompt")
        bad = next((t for t in p if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request(
                f"prompt token id {bad} is out of range; use 0..{vocab_size - 1}.", "prompt"
            )


def submit(
    state: ServerState,
    sm: ServedModel,
    body: Body,
    prompts: list[list[int]],
    logprobs: int | None,
    grammar: Grammar | None,
    rid: str,
    prompt_param: str,
    embeds: list | None = None,
) -> list[RequestStream]:
    """One engine request per prompt (``embeds[i]``: prompt i's input vectors, or None);
    on any refusal, the ones already queued are aborted."""
    params = body.sampling_params(sm.vocab_size)
    if body.n > sm.max_seqs:
        raise bad_request(
            f"n={body.n} exceeds this model's {sm.max_seqs} sequence slots (the operator sets "
            "them with --max-seqs); lower n.",
            "n",
        )
    check_token_ids(prompts, sm.vocab_size)
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            req = body.engine_request(prompt, dataclasses.replace(params), sm.stop_ids, logprobs)
            req.grammar, req.request_id = grammar, f"{rid}-{i}"
            req.prompt_embeds = embeds[i] if embeds else None
            streams.append(sm.engine.submit(req))
    except EngineDeadError:
        for s in streams:
            s.cancel()
        raise engine_unavailable() from None
    except GlassboxError as e:
        for s in streams:
            s.cancel()
        if isinstance(e, ContextLengthError):
            raise bad_request(str(e), prompt_param, "context_length_exceeded") from None
        raise from_glassbox(e) from None
    return streams


async def generate(
    request: Request,
    state: ServerState,
    sm: ServedModel,
    body: Body,
    prompts: list[list[int]],
    logprobs: int | None,
    chat: bool,
    prompt_param: str,
    embeds: list | None = None,
) -> Response:
    """Run a validated request and answer it, streaming or not (``embeds``: per prompt,
    input vectors for a vision-language prompt, or None)."""
    # Deadlines count from arrival (the guard's clock), tokenizing included.
    arrived = getattr(request.state, "arrived", None) or time.monotonic()
    rid = request_id_of(request)
    with state.counting_rejections(sm):
        grammar = await compile_grammar(state, sm, body)
        streams = submit(state, sm, body, prompts, logprobs, grammar, rid, prompt_param, embeds)
    render = Renderer(sm, body, ("chatcmpl-" if chat else "cmpl-") + rid, chat, logprobs)
    events = Events(request, streams, state.limits, arrived)
    if body.stream:
        return await start_stream(state, sm, render, events, streams, rid)
    outcome = "error"
    try:
        while (item := await events.next()) is not None:
            render.add(*item)
        outcome = "disconnected" if events.disconnected else "ok"
    except APIError as e:
        outcome = "timeout" if e.code in TIMEOUT_CODES else "error"
        raise
    except asyncio.CancelledError:
        outcome = "disconnected"
        raise
    finally:
        events.close()
        state.metrics.outcome(sm.name, outcome)
    for i, s in enumerate(streams):
        state.metrics.observe(sm.name, s, len(s.request.prompt), render.count_tokens(i))
    # Logprobs make big bodies: build and serialize them on a worker thread.
    content = await off_loop(_json_bytes, render, streams, heavy=logprobs is not None)
    return Response(content, media_type="application/json")


def _json_bytes(render: Renderer, streams: list[RequestStream]) -> bytes:
    return json.dumps(render.response(streams)).encode()


async def start_stream(
    state: ServerState,
    sm: ServedModel,
    render: Renderer,
    events: Events,
    streams: list[RequestStream],
    rid: str,
) -> Response:
    """Wait for the first event before answering 200, so a queue timeout or a failed
    prefill is still a real HTTP status; then stream the rest as server-sent events."""
    try:
        first = await events.next()
    except APIError as e:
        events.close()
        state.metrics.outcome(sm.name, "timeout" if e.code in TIMEOUT_CODES else "error")
        raise
    except BaseException:
        events.close()
        state.metrics.outcome(sm.name, "error")
        raise
    return StreamingResponse(
        sse(render, events, first, streams, state.metrics, sm, rid),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
