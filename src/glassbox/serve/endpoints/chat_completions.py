"""POST /v1/chat/completions: messages through the chat template, one reply (n choices).

Image content parts (``image_url`` with a data URL) go to a vision-language model's
image encoder; the prompt then reaches the engine as ids plus input vectors, the image
vectors at the ``<image>`` slots (glassbox.vision.api)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import Response

from glassbox.conversation import encode_prompt
from glassbox.serve.errors import bad_request
from glassbox.serve.generation import BIG_PROMPT_CHARS, generate, off_loop
from glassbox.serve.limits import check_range, over
from glassbox.serve.protocol import ChatCompletionRequest, content_chars, image_parts
from glassbox.serve.state import get_state

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI's chat completions API (text, images for a vision-language model, tool
    calling; docs/serving.md)."""
    state = get_state(request)
    sm = state.model(body.model)
    limits = state.limits
    with state.counting_rejections(sm):
        plan = body.plan_tools(limits, sm.tokenizer.is_foreign)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true.", "top_logprobs")
        if body.top_logprobs is not None:
            check_range("top_logprobs", body.top_logprobs, 0, limits.max_top_logprobs,
                        "max_top_logprobs")  # fmt: skip
        messages = body.chat_messages(limits)
        images = image_parts(messages)
        if images and sm.vision is None:
            raise bad_request(
                f"{images[0]} is an image, but the model {sm.name!r} reads text only; send "
                "text, or ask a vision-language model (`glassbox vlm train`).", images[0]
            )  # fmt: skip
        if images and plan.tools:
            raise bad_request("tools cannot be combined with image inputs here; send the "
                              "image and the tools in separate requests.", "tools")  # fmt: skip
        chars = sum(content_chars(m) for m in messages)
        chars += sum(len(json.dumps(m.get("tool_calls", ""))) for m in messages)
        if chars > limits.max_prompt_chars:
            raise over("messages", "characters of content", chars, limits.max_prompt_chars,
                       "max_prompt_chars")  # fmt: skip
        body.check_limits(limits, 1)
        tools = plan.tools or None
        embeds = None
        if images:  # decode, check and encode the images; ids + input vectors
            from glassbox.vision.api import chat_prompt

            prompt, embeds = await off_loop(chat_prompt, sm.vision, sm.tokenizer, messages, limits)
        else:
            heavy = chars > BIG_PROMPT_CHARS or tools is not None
            prompt = await off_loop(encode_prompt, sm.tokenizer, messages, tools, heavy=heavy)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await generate(request, state, sm, body, [prompt], logprobs, True, "messages", [embeds])
