"""The OpenAI-compatible HTTP server (FastAPI): text and JSON at the edge, token ids inside.

    client --HTTP--> route: parse, template, tokenize, validate (400s happen here)
           --submit--> AsyncEngine (bounded queue, 429 when full; one model thread)
           <--TokenEvents (asyncio queue)-- route: detokenized text, SSE chunks, usage

Endpoints: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.
Errors are OpenAI-style bodies: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from glassbox.errors import ContextLengthError, GlassboxError
from glassbox.infer.engine import (
    AsyncEngine,
    Engine,
    GenerationRequest,
    QueueFullError,
    RequestStream,
    TokenEvent,
)
from glassbox.infer.structured import GrammarCompiler
from glassbox.serve.protocol import ChatCompletionRequest, CompletionRequest
from glassbox.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code,
        )  # fmt: skip


def error_body(message: str, type: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


def _from_glassbox(e: GlassboxError) -> APIError:
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", None, "queue_full")
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), "invalid_request_error", "messages", "context_length_exceeded")
    msg = str(e)
    param = msg.split("=", 1)[0] if "=" in msg.split(" ", 1)[0] else None
    return APIError(400, msg, "invalid_request_error", param, None)


# ---------------------------------------------------------------------------------------
# Served models and metrics
# ---------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """One checkpoint being served under ``name``."""

    name: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    compiler: GrammarCompiler
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context_length(self) -> int:
        return self.engine.engine.context_length

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.tokenizer.eot_id, self.tokenizer.end_id})

    @classmethod
    def from_engine(cls, name: str, engine: Engine, max_queue: int = 64) -> ServedModel:
        tok = engine.tokenizer
        if tok is None:
            raise GlassboxError("A served engine needs a tokenizer.")
        compiler = GrammarCompiler(tok, engine.vocab_size, [tok.end_id, tok.eot_id])
        return cls(name, AsyncEngine(engine, max_queue), tok, compiler)


class Metrics:
    """Prometheus metrics on a private registry (one per app)."""

    def __init__(self, models: dict[str, ServedModel]):
        self.registry = r = CollectorRegistry()
        lab = ["model"]
        self.queue_depth = Gauge("glassbox_queue_depth", "Requests waiting", lab, registry=r)
        self.running = Gauge("glassbox_running_sequences", "Sequences decoding", lab, registry=r)
        for name, sm in models.items():
            self.queue_depth.labels(name).set_function(lambda e=sm.engine: e.queue_depth)
            self.running.labels(name).set_function(lambda e=sm.engine: e.num_running)
        self.requests = Counter(
            "glassbox_requests", "Requests by outcome", ["model", "status"], registry=r
        )
        self.prompt_tokens = Counter("glassbox_prompt_tokens", "Prompt tokens", lab, registry=r)
        self.generation_tokens = Counter(
            "glassbox_generation_tokens", "Generated tokens", lab, registry=r
        )
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram(
            "glassbox_time_to_first_token_seconds", "Time to first token", lab,
            buckets=buckets, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "glassbox_e2e_request_latency_seconds", "Request latency", lab,
            buckets=buckets, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "glassbox_time_per_output_token_seconds", "Time per output token after the first",
            lab, buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28), registry=r,
        )  # fmt: skip

    def observe(self, model: str, stream: RequestStream, prompt_tokens: int, n_tokens: int):
        now = time.perf_counter()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(n_tokens)
        self.latency.labels(model).observe(now - stream.submitted)
        if stream.first_token_at is not None:
            self.ttft.labels(model).observe(stream.first_token_at - stream.submitted)
            if n_tokens > 1:
                self.tpot.labels(model).observe((now - stream.first_token_at) / (n_tokens - 1))


# ---------------------------------------------------------------------------------------
# Middleware: API key and request size
# ---------------------------------------------------------------------------------------


class GuardMiddleware:
    """Pure ASGI: 401 without the API key on /v1/*, 413 for bodies over the limit."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            if headers.get("authorization", "") != f"Bearer {self.api_key}":
                err = APIError(
                    401, "Missing or invalid API key; send 'Authorization: Bearer <key>'.",
                    "invalid_request_error", None, "invalid_api_key",
                )  # fmt: skip
                return await _error_response(err)(scope, receive, send)
        too_big = APIError(
            413, f"Request body is larger than {self.max_body_bytes} bytes.",
            "invalid_request_error", None, "request_too_large",
        )  # fmt: skip
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _error_response(too_big)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise APIError(413, too_big.message, too_big.type, None, too_big.code)
            return message

        return await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------


def create_app(
    models: dict[str, ServedModel],
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """Build the FastAPI app serving ``models`` (name -> ServedModel)."""
    if not models:
        raise GlassboxError("No models to serve.")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for sm in models.values():
            sm.engine.start()
        try:
            yield
        finally:
            for sm in models.values():
                sm.engine.stop()

    app = FastAPI(title="Glassbox", version="0.1.0", lifespan=lifespan)
    metrics = Metrics(models)
    app.state.models, app.state.metrics = models, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(GlassboxError)
    async def _glassbox_error(request: Request, e: GlassboxError):
        return _error_response(_from_glassbox(e))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problems)"
        return _error_response(APIError(400, msg, "invalid_request_error", param, None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(
            APIError(e.status_code, str(e.detail), "invalid_request_error", None, code)
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return _error_response(APIError(500, f"Internal error: {e!r}", "server_error"))

    if cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)

    def get_model(name: str) -> ServedModel:
        if name not in models:
            raise APIError(
                404, f"The model {name!r} does not exist; served models: {sorted(models)}.",
                "invalid_request_error", "model", "model_not_found",
            )  # fmt: skip
        return models[name]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": sorted(models)}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": sm.created,
                    "owned_by": "glassbox",
                    "max_model_len": sm.context_length,
                }  # fmt: skip
                for name, sm in models.items()
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        sm = get_model(body.model)
        if body.echo:
            raise APIError(400, "echo=true is not supported.", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported.", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (or be omitted).", param="best_of")
        prompts = _completion_prompts(body.prompt, sm.tokenizer)
        reqs = [body.engine_request(p, sm.stop_ids, body.logprobs) for p in prompts]
        return await _run(sm, body, reqs, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        sm = get_model(body.model)
        if body.tools:
            raise APIError(400, "tools (function calling) are not supported.", param="tools")
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
        prompt = sm.tokenizer.encode_chat(body.chat_messages())
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        req = body.engine_request(prompt, sm.stop_ids, logprobs)
        return await _run(sm, body, [req], request, chat=True)

    async def _run(sm: ServedModel, body, reqs: list[GenerationRequest], request: Request, chat):
        constraint = body.constraint()
        grammar = sm.compiler.compile(constraint) if constraint is not None else None
        streams: list[RequestStream] = []
        try:
            for req in reqs:
                req.grammar = grammar
                req.request_id = uuid.uuid4().hex
                streams.append(sm.engine.submit(req))
        except GlassboxError as e:
            for s in streams:
                s.cancel()
            metrics.requests.labels(sm.name, "rejected").inc()
            raise _from_glassbox(e) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + reqs[0].request_id
        render = _Renderer(sm, body, rid, chat, n=body.n, logprobs=reqs[0].logprobs)
        if body.stream:
            return StreamingResponse(
                _sse(render, streams, request, metrics, sm), media_type="text/event-stream"
            )
        watcher = asyncio.create_task(_watch_disconnect(request, streams))
        try:
            for i, stream in enumerate(streams):
                async for ev in stream:
                    render.add(i, ev)
        finally:
            watcher.cancel()
            for s in streams:
                s.cancel()
        for i, s in enumerate(streams):
            metrics.observe(sm.name, s, len(s.request.prompt), render.count_tokens(i))
        metrics.requests.labels(sm.name, "ok").inc()
        return render.response(streams)

    return app


def _completion_prompts(prompt, tok: Tokenizer) -> list[list[int]]:
    """Text prompts start with <|endoftext|> (as in training); token prompts are as given."""
    if isinstance(prompt, str):
        return [[tok.eot_id, *tok.encode(prompt)]]
    if not prompt:
        raise APIError(400, "prompt is empty.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if len(prompt) > 16:
        raise APIError(400, f"prompt has {len(prompt)} entries; send at most 16.", param="prompt")
    return [[tok.eot_id, *tok.encode(p)] if isinstance(p, str) else list(p) for p in prompt]


async def _watch_disconnect(request: Request, streams: list[RequestStream]) -> None:
    """Cancel the request's sequences when the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for s in streams:
                s.cancel()
            return


class _Renderer:
    """Accumulates events into OpenAI response bodies and stream chunks."""

    def __init__(self, sm: ServedModel, body, rid: str, chat: bool, n: int, logprobs):
        self.sm, self.body, self.rid, self.chat, self.n = sm, body, rid, chat, n
        self.logprobs = logprobs
        self.created = int(time.time())
        self.text: dict[int, list[str]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.lps: dict[int, list[TokenEvent]] = {}
        self.finish: dict[int, str | None] = {}
        self.object = "chat.completion" if chat else "text_completion"

    def index(self, prompt_i: int, ev: TokenEvent) -> int:
        return prompt_i * self.n + ev.index

    def count_tokens(self, prompt_i: int) -> int:
        return sum(len(v) for k, v in self.tokens.items() if k // self.n == prompt_i)

    def add(self, prompt_i: int, ev: TokenEvent) -> None:
        i = self.index(prompt_i, ev)
        self.text.setdefault(i, []).append(ev.text)
        if ev.token is not None:
            self.tokens.setdefault(i, []).append(ev.token)
            if ev.logprob is not None:
                self.lps.setdefault(i, []).append(ev)
        if ev.finish_reason is not None:
            self.finish[i] = ev.finish_reason

    def usage(self, streams: list[RequestStream]) -> dict:
        prompt = sum(len(s.request.prompt) for s in streams)
        completion = sum(len(v) for v in self.tokens.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    # -- logprobs ---------------------------------------------------------------------

    def _token_str(self, token: int) -> tuple[str, list[int]]:
        raw = self.sm.compiler.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def logprobs_obj(self, events: list[TokenEvent], offset: int = 0) -> dict | None:
        if self.logprobs is None:
            return None
        if self.chat:
            content = []
            for ev in events:
                s, b = self._token_str(ev.token)
                tops = []
                for t, lp in ev.top_logprobs or []:
                    ts, tb = self._token_str(t)
                    tops.append({"token": ts, "logprob": lp, "bytes": tb})
                content.append(
                    {"token": s, "logprob": ev.logprob, "bytes": b, "top_logprobs": tops}
                )
            return {"content": content}
        tokens, lps, tops, offsets = [], [], [], []
        for ev in events:
            s, _ = self._token_str(ev.token)
            tokens.append(s)
            lps.append(ev.logprob)
            tops.append({self._token_str(t)[0]: lp for t, lp in ev.top_logprobs or []})
            offsets.append(offset)
            offset += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    # -- bodies -------------------------------------------------------------------------

    def response(self, streams: list[RequestStream]) -> dict:
        choices = []
        for i in sorted(self.text):
            text = "".join(self.text[i])
            lp = self.logprobs_obj(self.lps.get(i, []))
            if self.chat:
                msg = {"role": "assistant", "content": text}
                choice = {"index": i, "message": msg, "logprobs": lp}
            else:
                choice = {"index": i, "text": text, "logprobs": lp}
            choice["finish_reason"] = self.finish.get(i)
            choices.append(choice)
        return {
            "id": self.rid, "object": self.object, "created": self.created,
            "model": self.sm.name, "choices": choices, "usage": self.usage(streams),
            "system_fingerprint": None,
        }  # fmt: skip

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {
            "id": self.rid, "object": self.object + (".chunk" if self.chat else ""),
            "created": self.created, "model": self.sm.name, "choices": choices,
            "system_fingerprint": None,
        }  # fmt: skip
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    @property
    def include_usage(self) -> bool:
        so = self.body.stream_options
        return bool(so and so.include_usage)

    def event_chunk(self, prompt_i: int, ev: TokenEvent, offset: int) -> str | None:
        i = self.index(prompt_i, ev)
        lp_events = [ev] if ev.logprob is not None else []
        if not ev.text and ev.finish_reason is None and not lp_events:
            return None
        lp = self.logprobs_obj(lp_events, offset) if lp_events else None
        if self.chat:
            delta = {"content": ev.text} if ev.text else {}
            choice = {"index": i, "delta": delta, "logprobs": lp}
        else:
            choice = {"index": i, "text": ev.text, "logprobs": lp}
        choice["finish_reason"] = ev.finish_reason
        return self.chunk([choice])


async def _sse(
    render: _Renderer,
    streams: list[RequestStream],
    request: Request,
    metrics: Metrics,
    sm: ServedModel,
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per event, all choices interleaved, then [DONE]."""
    watcher = asyncio.create_task(_watch_disconnect(request, streams))
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for ev in stream:
                await merged.put((i, ev))
        except Exception as e:  # deliver engine failures to the SSE loop
            await merged.put((i, e))
        await merged.put((i, None))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        if render.chat:
            yield render.chunk(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
                    for i in range(len(streams) * render.n)
                ]
            )  # fmt: skip
        open_pumps, offsets = len(pumps), {}
        while open_pumps:
            i, ev = await merged.get()
            if ev is None:
                open_pumps -= 1
                continue
            if isinstance(ev, BaseException):
                err = error_body(f"Internal error: {ev!r}", "server_error")
                yield f"data: {json.dumps(err)}\n\n"
                break
            render.add(i, ev)
            k = render.index(i, ev)
            chunk = render.event_chunk(i, ev, offsets.get(k, 0))
            offsets[k] = offsets.get(k, 0) + len(ev.text)
            if chunk:
                yield chunk
        for i, s in enumerate(streams):
            metrics.observe(sm.name, s, len(s.request.prompt), render.count_tokens(i))
        metrics.requests.labels(sm.name, "ok").inc()
        if render.include_usage:
            yield render.chunk([], render.usage(streams))
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        for p in pumps:
            p.cancel()
        for s in streams:
            s.cancel()


# ---------------------------------------------------------------------------------------
# Loading checkpoints
# ---------------------------------------------------------------------------------------


def load_served_models(
    specs: list[str], device: str = "auto", max_seqs: int = 16, max_queue: int = 64
) -> dict[str, ServedModel]:
    """``runs/base`` or ``name=runs/base`` -> ServedModel named ``base`` (or ``name``)."""
    from glassbox.checkpoint import load_model_dir
    from glassbox.device import resolve_device

    models: dict[str, ServedModel] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or Path(path).resolve().name
        if name in models:
            raise GlassboxError(f"Two models are named {name!r}; use name=path to rename one.")
        model, tok, _ = load_model_dir(path, resolve_device(device))
        engine = Engine(model, tok, max_seqs=max_seqs)
        models[name] = ServedModel.from_engine(name, engine, max_queue)
    return models
