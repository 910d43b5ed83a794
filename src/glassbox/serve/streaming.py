"""Server-sent events: one chunk per event, all choices interleaved, then [DONE].

A failure after the 200 has gone out is sent as an OpenAI error event
(``data: {"error": {...}}``) followed by ``data: [DONE]``, as vLLM does; server faults
carry a generic message and the request id, the detail goes to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from glassbox.infer.engine import RequestStream, TokenEvent
from glassbox.serve.errors import APIError, internal_error
from glassbox.serve.loading import ServedModel
from glassbox.serve.metrics import Metrics
from glassbox.serve.render import Renderer

log = logging.getLogger("glassbox.serve")

DONE = "data: [DONE]\n\n"


async def sse(
    render: Renderer,
    events,  # generation.Events
    first: tuple[int, TokenEvent] | None,
    streams: list[RequestStream],
    metrics: Metrics,
    sm: ServedModel,
    rid: str,
) -> AsyncIterator[str]:
    """The body of a streaming response; ``first`` is the event already received."""
    outcome = "error"
    try:
        if render.chat:
            yield render.role_chunk(len(streams) * render.n)
        offsets: dict[int, int] = {}
        item = first
        while item is not None:
            i, ev = item
            render.add(i, ev)
            k = render.index(i, ev)
            chunk = render.event_chunk(i, ev, offsets.get(k, 0))
            offsets[k] = offsets.get(k, 0) + len(ev.text)
            if chunk:
                yield chunk
            item = await events.next()
        outcome = "disconnected" if events.disconnected else "ok"
        for i, s in enumerate(streams):
            metrics.observe(sm.name, s, len(s.request.prompt), render.count_tokens(i))
        if render.include_usage:
            yield render.chunk([], render.usage(streams))
        yield DONE
    except APIError as e:  # a deadline passed mid-stream
        outcome = "timeout" if e.code in ("request_timeout", "queue_timeout") else "error"
        yield f"data: {json.dumps(e.body())}\n\n"
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "disconnected"
        raise
    except Exception as e:
        log.error("request %s failed mid-stream", rid, exc_info=e)
        yield f"data: {json.dumps(internal_error(rid).body())}\n\n"
        yield DONE
    finally:
        events.close()
        metrics.outcome(sm.name, outcome)
