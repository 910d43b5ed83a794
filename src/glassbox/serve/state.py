"""What the endpoint handlers share: the served models, the caps, the metrics."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import Request

from glassbox.serve.errors import APIError
from glassbox.serve.limits import ServeLimits
from glassbox.serve.loading import ServedEncoder, ServedModel
from glassbox.serve.metrics import Metrics


@dataclass
class ServerState:
    """One app's shared state (``app.state.glassbox``)."""

    models: dict[str, ServedModel]
    limits: ServeLimits
    metrics: Metrics
    # Grammar compiles run here, off the event loop; two workers, so a slow schema
    # delays other schemas a little but never a stream.
    grammar_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="glassbox-grammar")
    )
    encoders: dict[str, ServedEncoder] = field(default_factory=dict)  # /v1/embeddings only

    def model(self, name: str) -> ServedModel:
        """The generating model called ``name``; a 400 for a contrastive run (it only
        embeds), a 404 listing the served ones for anything else."""
        if name in self.encoders:
            raise APIError(
                400, f"The model {name!r} is a contrastive image-text model; it serves "
                "/v1/embeddings, not generation. Ask one of: "
                f"{sorted(self.models)}.", "invalid_request_error", "model", "model_not_supported",
            )  # fmt: skip
        if name not in self.models:
            raise APIError(
                404, f"The model {name!r} does not exist; served models: "
                f"{sorted(self.models | self.encoders)}.",
                "invalid_request_error", "model", "model_not_found",
            )  # fmt: skip
        return self.models[name]

    @contextmanager
    def counting_rejections(self, sm: ServedModel) -> Iterator[None]:
        """Count an APIError raised inside as a 'rejected' (4xx) or 'error' request."""
        try:
            yield
        except APIError as e:
            self.metrics.outcome(sm.name, "rejected" if e.status < 500 else "error")
            raise


def get_state(request: Request) -> ServerState:
    """The shared state of the app that received ``request``."""
    return request.app.state.glassbox
