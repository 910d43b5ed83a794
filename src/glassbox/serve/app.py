"""The OpenAI-compatible HTTP server (FastAPI): text and JSON at the edge, token ids inside.

    client --HTTP--> CORS --> guard (request id, Host, API key, body size: guard.py)
           --> endpoint (endpoints/*.py): parse (protocol.py), caps (limits.py), tokenize
           --> generation.py: grammar, submit to AsyncEngine (bounded queue, 429 when full)
           <-- TokenEvents (asyncio queues) -- render.py / streaming.py: JSON body or SSE

Endpoints: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics, one
module each; ``playground=True`` adds the page at / and /v1/glassbox/ (playground.py).
Errors are OpenAI-style bodies (errors.py). Models are loaded by loading.py.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from glassbox import __version__
from glassbox.errors import GlassboxError
from glassbox.serve.endpoints import ENDPOINTS
from glassbox.serve.errors import REQUEST_ID_HEADER, install_error_handlers
from glassbox.serve.guard import GuardMiddleware
from glassbox.serve.limits import ServeLimits
from glassbox.serve.loading import ServedEncoder, ServedModel, load_served_models
from glassbox.serve.metrics import Metrics
from glassbox.serve.state import ServerState

__all__ = ["ServedModel", "ServeLimits", "create_app", "load_served_models"]


def create_app(
    models: dict[str, ServedModel | ServedEncoder],
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
    max_body_bytes: int = 1 << 20,
    limits: ServeLimits | None = None,
    allowed_hosts: list[str] | None = None,
    playground: bool = False,
    arena_dir: str | Path = "runs/arena",
    diffusion: dict | None = None,
    vision: dict | None = None,
) -> FastAPI:
    """Build the FastAPI app serving ``models`` (name -> ServedModel, or ServedEncoder
    for a contrastive run, which answers /v1/embeddings only).

    ``api_key`` None serves without a key, to loopback Hosts only (plus
    ``allowed_hosts``); an empty key is refused rather than read as "no key".
    ``playground`` adds the page at ``/`` and its API under /v1/glassbox/ (arena votes
    go to ``arena_dir``; ``diffusion`` maps names to DiffusionPipelines and ``vision`` to
    vision-language runs for its Images view; docs/playground.md).
    """
    if not models:
        raise GlassboxError("No models to serve.")
    if api_key is not None and not api_key.strip():
        raise GlassboxError(
            "The API key is empty, which would turn authentication off; give a non-empty "
            "key (--api-key or GLASSBOX_API_KEY), or none at all to serve on localhost only."
        )
    encoders = {n: m for n, m in models.items() if isinstance(m, ServedEncoder)}
    models = {n: m for n, m in models.items() if not isinstance(m, ServedEncoder)}
    state = ServerState(models, limits or ServeLimits(), Metrics(models), encoders=encoders)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for sm in models.values():
            sm.engine.start()
        try:
            yield
        finally:
            for sm in models.values():
                sm.engine.stop()
            state.grammar_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="Glassbox", version=__version__, lifespan=lifespan,
        redoc_url=None, swagger_ui_oauth2_redirect_url=None,  # fewer open paths
    )  # fmt: skip
    app.state.glassbox = state
    app.state.models, app.state.metrics = models, state.metrics  # for tests and benchmarks
    install_error_handlers(app)
    for endpoint in ENDPOINTS:
        app.include_router(endpoint.router)
    open_paths: frozenset[str] = frozenset()
    if playground:
        from glassbox.serve.endpoints import playground as playground_api
        from glassbox.serve.endpoints import playground_diffusion, playground_vision
        from glassbox.serve.playground_page import page_router

        served_vlms = {
            n: playground_vision.VisionRun(sm.vision, sm.tokenizer)
            for n, sm in models.items() if sm.vision is not None
        }  # fmt: skip
        app.state.playground = playground_api.PlaygroundConfig(
            Path(arena_dir), diffusion or {}, served_vlms | (vision or {})
        )
        for router in (playground_api, playground_diffusion, playground_vision):
            app.include_router(router.router)
        page, open_paths = page_router()
        app.include_router(page)
    # Added first = innermost: the guard runs inside CORS, so its 401/403/413 answers
    # carry CORS headers, and preflight requests (no key by design) never reach it.
    app.add_middleware(
        GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes,
        allowed_hosts=allowed_hosts, open_paths=open_paths,
    )  # fmt: skip
    if cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"],
            allow_headers=["*"], expose_headers=[REQUEST_ID_HEADER],
        )  # fmt: skip
    return app
