"""GET /metrics: Prometheus text format (needs the key when the server has one)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from glassbox.serve.state import get_state

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """The server's counters, gauges and histograms."""
    registry = get_state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
