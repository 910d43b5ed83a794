"""Incremental detokenization: token ids in, text pieces out, O(new tokens) per step.

Decoding a sequence's whole history for every new token costs O(length) per token, so a
1000-token answer decodes half a million tokens. Instead (as vLLM and TGI do) only a
small window is decoded: the ids from ``prefix`` (the start of the last emitted piece,
kept as left context) to the end. The new text is what the window decodes to beyond its
already-emitted part ``ids[prefix:read]``.

A token can end in the middle of a UTF-8 character (byte-level BPE splits characters);
then the window decodes to a trailing U+FFFD and nothing is emitted until the character
completes. Every emitted piece therefore ends on a character boundary, where UTF-8
decoding restarts cleanly, so the pieces concatenate to ``decode(all ids)`` exactly
(``flush`` returns whatever was still held back at the end).
"""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing sequence of token ids into text pieces, never splitting a character.

    ``push(id)`` returns the newly complete text (often ""), ``flush()`` the rest.
    Only the current window of ids is kept: memory and time per token are O(window).
    """

    def __init__(self, tokenizer: _Decoder):
        self.tokenizer = tokenizer
        self.window: list[int] = []  # ids from the start of the last emitted piece
        self.read = 0  # window[:read] is already emitted text

    def push(self, token_id: int) -> str:
        self.window.append(token_id)
        emitted = self.tokenizer.decode(self.window[: self.read]) if self.read else ""
        text = self.tokenizer.decode(self.window)
        if len(text) <= len(emitted) or text.endswith(_REPLACEMENT):
            return ""  # an incomplete character (or nothing visible yet): wait for more
        piece = text[len(emitted) :]
        # The ids just emitted become the left context of the next window.
        self.window = self.window[self.read :]
        self.read = len(self.window)
        return piece

    def flush(self) -> str:
        """Text still held back (an unfinished or invalid UTF-8 tail); resets the window."""
        if len(self.window) == self.read:
            return ""
        emitted = self.tokenizer.decode(self.window[: self.read]) if self.read else ""
        piece = self.tokenizer.decode(self.window)[len(emitted) :]
        self.window, self.read = [], 0
        return piece
