"""Images in OpenAI chat requests: ``image_url`` content parts with data URLs, checked.

    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}},
        {"type": "text", "text": "How many red shapes are there?"}]}

:func:`request_images` turns such messages into plain-text messages with an
``<image>`` marker where each image was (:func:`glassbox.vision.vlm.flatten_content_parts`)
and the decoded images, or raises :class:`~glassbox.serve.errors.APIError` (a 400 naming
the field, e.g. ``messages[0].content[0].image_url``) for:

* a remote URL (``http(s)://...``): the server never fetches; send a data URL;
* a data URL that is not ``data:image/...;base64,`` or whose base64 does not decode;
* more than ``max_images`` images, more than ``max_image_bytes`` bytes in one image, or
  more than ``max_image_pixels`` pixels (checked from the header, before decoding);
* bytes that are not an image Pillow reads (corrupt, truncated, unsupported mode).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import torch

from glassbox.errors import GlassboxError
from glassbox.serve.errors import APIError
from glassbox.serve.limits import FLAGS, ServeLimits
from glassbox.vision.scenes import IMAGE_SIZE, load_image
from glassbox.vision.vlm import flatten_content_parts

_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?,(.*)", re.S)


def decode_data_url(url: Any, param: str, limits: ServeLimits) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL; anything else is a 400 on ``param``."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{param}.url must be a non-empty string.", param=param)
    if re.match(r"[a-z][a-z0-9+.-]*://", url, re.I):
        raise APIError(
            400, f"{param}.url is a remote URL ({url[:60]}); this server never fetches URLs. "
            "Send the image inline as data:image/png;base64,...", param=param,
        )  # fmt: skip
    m = _DATA_URL.fullmatch(url)
    if m is None or not m.group(1) or "base64" not in (m.group(2) or ""):
        raise APIError(
            400, f"{param}.url must be a data URL of the form data:image/png;base64,<data>.",
            param=param,
        )  # fmt: skip
    payload = m.group(3)
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise APIError(
            400, f"{param} has about {len(payload) * 3 // 4} bytes; this server allows at most "
            f"{limits.max_image_bytes} bytes per image ({FLAGS['max_image_bytes']}). Send a "
            "smaller image.", param=param,
        )  # fmt: skip
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{param}.url has invalid base64 ({e}).", param=param) from e


def request_images(
    messages: list[dict], limits: ServeLimits, image_size: int = IMAGE_SIZE
) -> tuple[list[dict], list[torch.Tensor]]:
    """(plain-text messages with ``<image>`` markers, images as (3, S, S) uint8)."""
    try:
        flat, parts = flatten_content_parts(messages)
    except GlassboxError as e:
        raise APIError(400, str(e), param="messages") from e
    if len(parts) > limits.max_images:
        raise APIError(
            400, f"messages has {len(parts)} images; this server allows at most "
            f"{limits.max_images} per request ({FLAGS['max_images']}).", param="messages",
        )  # fmt: skip
    return flat, [decode_image(obj, param, limits, image_size) for param, obj in parts]


def decode_image(
    image_url: Any, param: str, limits: ServeLimits, image_size: int = IMAGE_SIZE
) -> torch.Tensor:
    """An ``image_url`` object (``{"url": "data:..."}``, or the URL string itself) as a
    (3, S, S) uint8 image; a 400 on ``param`` for anything :func:`decode_data_url` or
    Pillow refuses."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    data = decode_data_url(url, param, limits)
    try:
        return load_image(data, image_size, param, limits.max_image_pixels)
    except GlassboxError as e:
        raise APIError(400, str(e), param=param) from e


@torch.no_grad()
def chat_prompt(
    model, tok, messages: list[dict], limits: ServeLimits
) -> tuple[list[int], torch.Tensor | None]:
    """A chat request for a VLM as (prompt ids, input vectors (T, C) or None): image parts
    decoded and checked, the prompt rendered with ``<image>`` markers and spliced, the
    image vectors written at their slots. What an engine prefill with per-position input
    vectors consumes (None: a text-only prompt, plain ids)."""
    from glassbox.vision.vlm import prompt_ids

    flat, images = request_images(messages, limits, model.vision_cfg.image_size)
    try:
        ids, starts = prompt_ids(tok, flat, len(images), model.image_tokens)
    except GlassboxError as e:
        raise APIError(400, str(e), param="messages") from e
    if not images:
        return ids, None
    device = next(model.parameters()).device
    x = torch.stack(images).float().to(device) / 127.5 - 1
    slots = torch.tensor([[0, s] for s in starts], device=device)
    embeds = model.input_embeds(torch.tensor([ids], device=device), x, slots)[0]  # (T, C)
    return ids, embeds
