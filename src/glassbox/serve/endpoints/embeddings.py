"""POST /v1/embeddings: text embeddings from a served language model.

A text's vector is the model's final hidden states averaged over its tokens and
normalised to unit length (glassbox.rag.index.Embedder: the same vectors `glassbox rag
index --model` stores), so cosine similarity is a dot product. ``input`` is a string,
a list of strings, a list of token ids, or a list of such lists (OpenAI's forms);
``encoding_format`` is ``float`` or ``base64`` (little-endian float32, as OpenAI's
client decodes it). ``dimensions`` is refused unless it equals the model's width: the
vectors are not trained to be truncated.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

import numpy as np
import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from glassbox.serve.errors import APIError
from glassbox.serve.state import get_state

router = APIRouter()


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def _inputs(body: EmbeddingsRequest, vocab: int, context: int, limits) -> list[list[int] | str]:
    """The request's inputs as strings or token-id lists, checked against the caps."""
    raw = body.input
    items: list = [raw] if isinstance(raw, str) else list(raw)
    if items and all(isinstance(t, int) for t in items):
        items = [items]  # one list of token ids
    if not items:
        raise APIError(400, "input is empty; give a string or a list of strings.", param="input")
    if len(items) > limits.max_prompts * 8:
        raise APIError(
            400, f"input has {len(items)} entries; at most {limits.max_prompts * 8} per request.",
            param="input",
        )  # fmt: skip
    chars = sum(len(t) for t in items if isinstance(t, str))
    if chars > limits.max_prompt_chars:
        raise APIError(
            400, f"input has {chars} characters; at most {limits.max_prompt_chars} per request.",
            param="input",
        )  # fmt: skip
    for i, t in enumerate(items):
        if isinstance(t, str) and not t:
            raise APIError(400, f"input[{i}] is an empty string.", param=f"input[{i}]")
        if isinstance(t, list):
            if not t:
                raise APIError(400, f"input[{i}] is an empty token list.", param=f"input[{i}]")
            bad = [x for x in t if not 0 <= x < vocab]
            if bad:
                raise APIError(
                    400, f"input[{i}] has token id {bad[0]}, outside 0..{vocab - 1}.",
                    param=f"input[{i}]",
                )  # fmt: skip
            if len(t) > context:
                raise APIError(
                    400, f"input[{i}] has {len(t)} tokens; this model's window is {context}.",
                    param=f"input[{i}]",
                )  # fmt: skip
    return items


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> dict:
    state = get_state(request)
    sm = state.model(body.model)
    model = sm.engine.engine.model
    width, context = model.cfg.d_model, sm.context_length
    if body.dimensions is not None and body.dimensions != width:
        raise APIError(
            400, f"dimensions={body.dimensions} is not supported; this model's embeddings have "
            f"{width} dimensions (omit the parameter).", param="dimensions",
        )  # fmt: skip
    items = _inputs(body, sm.vocab_size, context, state.limits)

    def run() -> tuple[torch.Tensor, int]:
        from glassbox.rag.index import Embedder

        ids = [sm.tokenizer.encode(t) if isinstance(t, str) else t for t in items]
        for i, t in enumerate(ids):
            if len(t) > context:
                raise APIError(
                    400, f"input[{i}] has {len(t)} tokens; this model's window is {context}.",
                    param=f"input[{i}]",
                )  # fmt: skip
        emb = Embedder(model, sm.tokenizer)
        return emb.embed_ids([t or [sm.tokenizer.eot_id] for t in ids]), sum(map(len, ids))

    vectors, tokens = await asyncio.to_thread(run)
    data = []
    for i, v in enumerate(vectors):
        if body.encoding_format == "base64":
            emb: list[float] | str = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
        else:
            emb = np.asarray(v, dtype=np.float32).tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list", "data": data, "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }  # fmt: skip
