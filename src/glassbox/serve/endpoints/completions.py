"""POST /v1/completions: text (or token-id) prompts, continued."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from glassbox.serve.errors import bad_request
from glassbox.serve.generation import BIG_PROMPT_CHARS, generate, off_loop
from glassbox.serve.limits import ServeLimits, check_range, over
from glassbox.serve.protocol import CompletionRequest
from glassbox.serve.state import get_state
from glassbox.tokenizer import Tokenizer

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    """OpenAI's completions API; ``logprobs`` is the number of alternatives (0-5)."""
    state = get_state(request)
    sm = state.model(body.model)
    limits = state.limits
    with state.counting_rejections(sm):
        if body.echo:
            raise bad_request("echo=true is not supported.", "echo")
        if body.suffix:
            raise bad_request("suffix is not supported.", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of must equal n (or be omitted).", "best_of")
        if body.logprobs is not None:
            check_range("logprobs", body.logprobs, 0, limits.max_logprobs, "max_logprobs")
        count, chars = prompt_shape(body.prompt, limits)
        body.check_limits(limits, count)
        prompts = await off_loop(
            completion_prompts, body.prompt, sm.tokenizer, heavy=chars > BIG_PROMPT_CHARS
        )
    return await generate(request, state, sm, body, prompts, body.logprobs, False, "prompt")


def prompt_shape(prompt, limits: ServeLimits) -> tuple[int, int]:
    """(number of prompts, characters of text) within the caps, before any tokenizing."""
    if isinstance(prompt, str):
        count, chars = 1, len(prompt)
    elif not prompt:
        raise bad_request("prompt is empty; send text or token ids.", "prompt")
    elif all(isinstance(p, int) for p in prompt):
        count, chars = 1, 0
    else:
        count, chars = len(prompt), sum(len(p) for p in prompt if isinstance(p, str))
    if count > limits.max_prompts:
        raise over("prompt", "entries", count, limits.max_prompts, "max_prompts")
    if chars > limits.max_prompt_chars:
        raise over("prompt", "characters", chars, limits.max_prompt_chars, "max_prompt_chars")
    return count, chars


def completion_prompts(prompt, tok: Tokenizer) -> list[list[int]]:
    """Text prompts start with <|endoftext|> (as in training); token prompts are as given."""
    if isinstance(prompt, str):
        return [[tok.eot_id, *tok.encode(prompt)]]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [[tok.eot_id, *tok.encode(p)] if isinstance(p, str) else list(p) for p in prompt]
