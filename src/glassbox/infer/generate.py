"""Text in, text out: one prompt continued through the engine (the only decoder).

``generate_text`` is what `glassbox generate` and the pretraining samples call; it
builds a one-slot :class:`~glassbox.infer.engine.Engine` sized to the request and
streams its text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from glassbox.infer.engine import Engine, GenerationRequest
from glassbox.infer.rules import StopStrings, fit_context, stop_token_ids
from glassbox.infer.sampling import SamplingParams
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer

__all__ = ["Generation", "StopStrings", "fit_context", "generate_text", "stop_token_ids"]


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated ids (the stop token that ended it excluded)
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
    on_text: Callable[[str], object] | None = None,
    compile: str = "off",
) -> Generation:
    """Generate a continuation of ``prompt`` (text, or token ids), streaming pieces of
    text to ``on_text``. Stops at the tokenizer's stop tokens (end of text, end of
    turn), a stop string, or the limit; ``truncate`` drops the oldest prompt tokens
    to fit the context window; ``compile`` is the Engine's (off, on, auto)."""
    params = (params or SamplingParams()).validate(model.cfg.vocab_size)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    keep, max_new = fit_context(len(ids), max_new_tokens, model.cfg.context_length, truncate)
    ids = ids[len(ids) - keep :]
    engine = Engine(model, tokenizer, max_seqs=1, max_len=len(ids) + max_new, compile=compile)
    req = GenerationRequest(
        ids, params, max_new, stop=list(stop or []), stop_token_ids=engine.stop_ids
    )
    pieces: list[str] = []
    out_ids: list[int] = []
    finish = "length"
    for ev in engine.generate(req):
        if ev.token is not None:
            out_ids.append(ev.token)
        if ev.text:
            pieces.append(ev.text)
            if on_text:
                on_text(ev.text)
        if ev.finish_reason is not None:
            finish = ev.finish_reason
    return Generation("".join(pieces), out_ids, finish, len(ids))
