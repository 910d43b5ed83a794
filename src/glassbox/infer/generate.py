"""Token-by-token generation with a KV cache, stop strings and the context-window rule."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from glassbox.errors import ContextLengthError, GlassboxError
from glassbox.infer.sampling import SamplingParams, apply_penalties, sample
from glassbox.model import KVCache, Transformer
from glassbox.tokenizer import Tokenizer


def fit_context(
    prompt_len: int, max_new_tokens: int | None, context_length: int, truncate: bool = False
) -> tuple[int, int]:
    """Apply the context rule. Returns (prompt tokens to keep from the end, max new tokens).

    Prompt + new tokens must fit in the context window. ``max_new_tokens=None`` means
    "the rest of the context". Over the limit is an error unless ``truncate`` asks to
    drop the oldest prompt tokens.
    """
    if prompt_len == 0:
        raise GlassboxError("The prompt is empty; give at least one token of prompt.")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise GlassboxError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    if max_new_tokens is None:
        if prompt_len < context_length:
            return prompt_len, context_length - prompt_len
        if not truncate:
            raise ContextLengthError(context_length, prompt_len, 1)
        max_new_tokens = 1
    if prompt_len + max_new_tokens <= context_length:
        return prompt_len, max_new_tokens
    if not truncate:
        raise ContextLengthError(context_length, prompt_len, max_new_tokens)
    if max_new_tokens >= context_length:
        raise GlassboxError(
            f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a "
            f"{context_length}-token context; ask for at most {context_length - 1}."
        )
    return context_length - max_new_tokens, max_new_tokens


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop_ids: set[int] | frozenset[int] = frozenset(),
) -> Iterator[int]:
    """Yield new token ids one at a time: prefill the prompt, then decode with the cache.

    Stops after ``max_new_tokens`` or when a token in ``stop_ids`` is produced (that
    token is yielded so callers can see why generation ended).
    """
    device = model.embed.weight.device
    if len(prompt) + max_new_tokens > model.cfg.context_length:
        raise ContextLengthError(model.cfg.context_length, len(prompt), max_new_tokens)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    cache = KVCache(model.cfg, 1, len(prompt) + max_new_tokens, device, model.embed.weight.dtype)
    seen = torch.tensor(prompt, device=device)
    logits = model(seen.view(1, -1), cache=cache, last_only=True)[:, -1]  # (1, V) prefill
    pos = len(prompt)
    for _ in range(max_new_tokens):
        logits = apply_penalties(logits[0], seen, params).unsqueeze(0)
        token = int(sample(logits, params, gen)[0])
        yield token
        if token in stop_ids:
            return
        seen = torch.cat([seen, seen.new_tensor([token])])
        step = torch.tensor([[token]], device=device)
        logits = model(step, cache=cache, input_pos=torch.tensor([[pos]], device=device))[:, -1]
        pos += 1


class StopStrings:
    """Finds stop strings in streamed text, even across token boundaries.

    ``feed`` returns the text that is safe to show: anything that might be the start
    of a stop string is held back until the next piece decides it.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[: min(hits)], ""
            return out
        hold = 0
        for s in self.stops:  # longest suffix of buffer that is a prefix of a stop string
            for k in range(min(len(s) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(out) :]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int


def generate_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    max_new_tokens: int | None = None,
    params: SamplingParams | None = None,
    stop: list[str] | None = None,
    truncate: bool = False,
    on_text=None,
) -> Generation:
    """Generate a continuation of ``prompt`` (text, or token ids), streaming pieces of
    text to ``on_text``. Stops at <|endoftext|>, <|end|>, a stop string, or the limit."""
    params = (params or SamplingParams()).validate(model.cfg.vocab_size)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    keep, max_new = fit_context(len(ids), max_new_tokens, model.cfg.context_length, truncate)
    ids = ids[len(ids) - keep :]
    stops = StopStrings(stop or [])
    decoder = tokenizer.stream_decoder()
    stop_ids = {tokenizer.eot_id, tokenizer.end_id}
    out_ids: list[int] = []
    pieces: list[str] = []
    finish = "length"
    for token in generate_ids(model, ids, max_new, params, stop_ids):
        if token in stop_ids:
            finish = "stop"
            break
        out_ids.append(token)
        shown = stops.feed(decoder.push(token))
        if shown:
            pieces.append(shown)
            if on_text:
                on_text(shown)
        if stops.stopped:
            finish = "stop"
            break
    tail = stops.flush()
    if tail:
        pieces.append(tail)
        if on_text:
            on_text(tail)
    return Generation("".join(pieces), out_ids, finish, len(ids))
