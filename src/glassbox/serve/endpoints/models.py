"""GET /v1/models: the served names and their context windows."""

from __future__ import annotations

from fastapi import APIRouter, Request

from glassbox.serve.state import get_state

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """OpenAI's model list, plus vLLM's ``max_model_len``."""
    models = get_state(request).models
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": sm.created,
                "owned_by": "glassbox",
                "max_model_len": sm.context_length,
            }
            for name, sm in models.items()
        ],
    }
