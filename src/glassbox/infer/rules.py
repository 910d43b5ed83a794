"""The rules every decoder applies: the context window, stop tokens and stop strings."""

from __future__ import annotations

from glassbox.errors import ContextLengthError, GlassboxError


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


def stop_token_ids(tokenizer) -> frozenset[int]:
    """The special tokens that end a generation: the tokenizer's ``stop_ids`` when it
    declares them (end of text, end of turn), else <|endoftext|> and <|end|>."""
    ids = getattr(tokenizer, "stop_ids", None)
    if ids is None:
        ids = {tokenizer.eot_id, tokenizer.end_id}
    return frozenset(int(i) for i in ids)


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
