"""User-facing errors.

Anything the user can fix (a missing file, an empty corpus, an out-of-range value, a
prompt longer than the context) raises :class:`GlassboxError` with a message that names
the value, the limit and the fix. The CLI prints the message and exits non-zero without
a traceback; the server turns it into a 4xx answer.
"""


class GlassboxError(Exception):
    """An error caused by input the user can correct."""


class ContextLengthError(GlassboxError):
    """The prompt plus the requested new tokens do not fit in the context window."""

    def __init__(self, context_length: int, prompt_tokens: int, max_new_tokens: int):
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        super().__init__(
            f"This model's context window is {context_length} tokens, but the prompt has "
            f"{prompt_tokens} tokens and {max_new_tokens} new tokens were requested "
            f"({prompt_tokens + max_new_tokens} in total). Shorten the prompt, lower the "
            "maximum number of new tokens, or ask for truncation of the oldest prompt tokens."
        )
