"""POST /v1/embeddings: text embeddings from a served language model, and text and image
embeddings in one shared space from a served contrastive run (``glassbox clip train``).

Language model: a text's vector is the model's final hidden states averaged over its tokens and
normalised to unit length (glassbox.rag.index.Embedder: the same vectors `glassbox rag
index --model` stores), so cosine similarity is a dot product. ``input`` is a string,
a list of strings, a list of token ids, or a list of such lists (OpenAI's forms);
``encoding_format`` is ``float`` or ``base64`` (little-endian float32, as OpenAI's
client decodes it). ``dimensions`` is refused unless it equals the model's width: the
vectors are not trained to be truncated.

Contrastive run: each string goes through the text encoder, and (an extension of
OpenAI's API) each ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,
..."}}`` item of the ``input`` list through the image encoder, both projected into the
same unit-length space: an image's dot product with each caption is what zero-shot
classification ranks. Images obey the chat endpoint's caps (--max-images,
--max-image-bytes, --max-image-pixels); remote URLs are refused.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

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
    # str | list[str] | list[int] | list[list[int]] (OpenAI), and image_url objects
    input: str | list[str | int | list[int] | dict[str, Any]]
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
    if any(isinstance(t, int) for t in items):
        raise APIError(400, "input mixes token ids with other items; send one list of ids, "
                       "or a list of id lists.", param="input")  # fmt: skip
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


def _check_dimensions(body: EmbeddingsRequest, width: int) -> None:
    if body.dimensions is not None and body.dimensions != width:
        raise APIError(
            400, f"dimensions={body.dimensions} is not supported; this model's embeddings have "
            f"{width} dimensions (omit the parameter).", param="dimensions",
        )  # fmt: skip


def _image_items(items: list, limits) -> list[int]:
    """Indices of the image items; 400 for any other object or too many images."""
    images = []
    for i, t in enumerate(items):
        if isinstance(t, dict):
            if t.get("type") != "image_url":
                raise APIError(
                    400, f"input[{i}] is an object of type {t.get('type')!r}; the objects "
                    "input takes are {'type': 'image_url', 'image_url': {'url': "
                    "'data:image/png;base64,...'}}.", param=f"input[{i}]",
                )  # fmt: skip
            images.append(i)
    if len(images) > limits.max_images:
        raise APIError(
            400, f"input has {len(images)} images; this server allows at most "
            f"{limits.max_images} per request (--max-images).", param="input",
        )  # fmt: skip
    return images


def _response(body: EmbeddingsRequest, vectors: torch.Tensor, tokens: int) -> dict:
    data = []
    for i, v in enumerate(vectors.float().cpu()):
        if body.encoding_format == "base64":
            emb: list[float] | str = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
        else:
            emb = np.asarray(v, dtype=np.float32).tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list", "data": data, "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }  # fmt: skip


@torch.no_grad()
def _contrastive(enc, items: list, limits) -> tuple[torch.Tensor, int]:
    """Unit vectors (N, E) of a contrastive run's texts and images, and the words read."""
    from glassbox.errors import GlassboxError
    from glassbox.vision.api import decode_image

    model = enc.model
    device = model.logit_scale.device
    out = torch.empty(len(items), model.config.embed_dim, device=device)
    texts = [i for i, t in enumerate(items) if isinstance(t, str)]
    images = [i for i, t in enumerate(items) if isinstance(t, dict)]
    if any(isinstance(t, list) for t in items):
        raise APIError(400, f"{enc.name!r} is a contrastive model with a word vocabulary; "
                       "send strings or images, not token ids.", param="input")  # fmt: skip
    words = 0
    for i in texts:
        try:
            words += len(model.vocab.encode(items[i]))
        except GlassboxError as e:
            raise APIError(400, f"input[{i}]: {e}", param=f"input[{i}]") from e
    if texts:
        out[texts] = model.encode_text([items[i] for i in texts])
    if images:
        size = model.config.image_size
        pix = [decode_image(items[i].get("image_url"), f"input[{i}].image_url", limits, size)
               for i in images]  # fmt: skip
        out[images] = model.encode_image(torch.stack(pix).float().to(device) / 127.5 - 1)
    return out, words


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> dict:
    state = get_state(request)
    if body.model in state.encoders:
        enc = state.encoders[body.model]
        _check_dimensions(body, enc.model.config.embed_dim)
        items = _inputs(body, len(enc.model.vocab), enc.context_length, state.limits)
        _image_items(items, state.limits)
        vectors, words = await asyncio.to_thread(_contrastive, enc, items, state.limits)
        return _response(body, vectors, words)
    sm = state.model(body.model)
    model = sm.engine.engine.model
    width, context = model.cfg.d_model, sm.context_length
    _check_dimensions(body, width)
    items = _inputs(body, sm.vocab_size, context, state.limits)
    if _image_items(items, state.limits):
        raise APIError(400, f"input has an image, but {body.model!r} is a language model; "
                       "embed images with a contrastive run (`glassbox clip train`).",
                       param="input")  # fmt: skip

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
    return _response(body, vectors, tokens)
