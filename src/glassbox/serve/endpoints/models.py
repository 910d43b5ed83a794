"""GET /v1/models: the served names and their context windows."""

from __future__ import annotations

from fastapi import APIRouter, Request

from glassbox.serve.state import get_state

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """OpenAI's model list, plus vLLM's ``max_model_len`` and what each model takes
    (``glassbox.kind``: language, vision-language, or contrastive for /v1/embeddings)."""
    state = get_state(request)
    served = [(n, sm, "vision-language" if sm.vision is not None else "language")
              for n, sm in state.models.items()]  # fmt: skip
    served += [(n, enc, "contrastive") for n, enc in state.encoders.items()]
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": m.created,
                "owned_by": "glassbox",
                "max_model_len": m.context_length,
                "glassbox": {"kind": kind},
            }
            for name, m, kind in served
        ],
    }
