"""GET /health: 200 while every engine thread runs, 503 when one has died (open without
a key, for load balancers). Reports each engine's slots and queue."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from glassbox.serve.loading import engine_alive, engine_counters
from glassbox.serve.state import get_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness and load of every served model's engine."""
    state = get_state(request)
    models = state.models
    engines = {
        name: {"alive": engine_alive(sm.engine), "max_seqs": sm.max_seqs,
               **engine_counters(sm.engine)}
        for name, sm in models.items()
    }  # fmt: skip
    ok = all(e["alive"] for e in engines.values())
    served = sorted(models | state.encoders)
    body = {"status": "ok" if ok else "unavailable", "models": served, "engines": engines}
    return JSONResponse(body, status_code=200 if ok else 503)
