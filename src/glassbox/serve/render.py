"""Engine events -> OpenAI response bodies and stream chunks (no I/O here)."""

from __future__ import annotations

import json
import time

from glassbox.infer.engine import RequestStream, TokenEvent
from glassbox.serve.loading import ServedModel


class Renderer:
    """Accumulates one request's events into a response body, or renders stream chunks.

    Choice ``prompt_i * n + ev.index`` is choice ``ev.index`` of prompt ``prompt_i``.
    """

    def __init__(self, sm: ServedModel, body, rid: str, chat: bool, logprobs: int | None):
        self.sm, self.body, self.rid, self.chat, self.n = sm, body, rid, chat, body.n
        self.logprobs = logprobs
        self.created = int(time.time())
        self.text: dict[int, list[str]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.lps: dict[int, list[TokenEvent]] = {}
        self.finish: dict[int, str | None] = {}
        self.object = "chat.completion" if chat else "text_completion"

    def index(self, prompt_i: int, ev: TokenEvent) -> int:
        return prompt_i * self.n + ev.index

    def count_tokens(self, prompt_i: int) -> int:
        return sum(len(v) for k, v in self.tokens.items() if k // self.n == prompt_i)

    def add(self, prompt_i: int, ev: TokenEvent) -> None:
        i = self.index(prompt_i, ev)
        self.text.setdefault(i, []).append(ev.text)
        if ev.token is not None:
            self.tokens.setdefault(i, []).append(ev.token)
            if ev.logprob is not None:
                self.lps.setdefault(i, []).append(ev)
        if ev.finish_reason is not None:
            self.finish[i] = ev.finish_reason

    def usage(self, streams: list[RequestStream]) -> dict:
        prompt = sum(len(s.request.prompt) for s in streams)
        completion = sum(len(v) for v in self.tokens.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    # -- logprobs ---------------------------------------------------------------------

    def _token_str(self, token: int) -> tuple[str, list[int]]:
        return self.sm.token_text(token)

    def logprobs_obj(self, events: list[TokenEvent], offset: int = 0) -> dict | None:
        if self.logprobs is None:
            return None
        if self.chat:
            content = []
            for ev in events:
                s, b = self._token_str(ev.token)
                tops = []
                for t, lp in ev.top_logprobs or []:
                    ts, tb = self._token_str(t)
                    tops.append({"token": ts, "logprob": lp, "bytes": tb})
                content.append(
                    {"token": s, "logprob": ev.logprob, "bytes": b, "top_logprobs": tops}
                )
            return {"content": content}
        tokens, lps, tops, offsets = [], [], [], []
        for ev in events:
            s, _ = self._token_str(ev.token)
            tokens.append(s)
            lps.append(ev.logprob)
            tops.append({self._token_str(t)[0]: lp for t, lp in ev.top_logprobs or []})
            offsets.append(offset)
            offset += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    # -- bodies -------------------------------------------------------------------------

    def response(self, streams: list[RequestStream]) -> dict:
        """The whole non-streaming body."""
        choices = []
        for i in sorted(self.text):
            text = "".join(self.text[i])
            lp = self.logprobs_obj(self.lps.get(i, []))
            if self.chat:
                msg = {"role": "assistant", "content": text}
                choice = {"index": i, "message": msg, "logprobs": lp}
            else:
                choice = {"index": i, "text": text, "logprobs": lp}
            choice["finish_reason"] = self.finish.get(i)
            choices.append(choice)
        return {
            "id": self.rid, "object": self.object, "created": self.created,
            "model": self.sm.name, "choices": choices, "usage": self.usage(streams),
            "system_fingerprint": None,
        }  # fmt: skip

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        """One server-sent event."""
        body = {
            "id": self.rid, "object": self.object + (".chunk" if self.chat else ""),
            "created": self.created, "model": self.sm.name, "choices": choices,
            "system_fingerprint": None,
        }  # fmt: skip
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def role_chunk(self, choices: int) -> str:
        """Chat streams open with the assistant role for every choice."""
        return self.chunk(
            [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
                for i in range(choices)
            ]
        )  # fmt: skip

    @property
    def include_usage(self) -> bool:
        so = self.body.stream_options
        return bool(so and so.include_usage)

    def event_chunk(self, prompt_i: int, ev: TokenEvent, offset: int) -> str | None:
        """The chunk for one event (None when it carries nothing to show)."""
        i = self.index(prompt_i, ev)
        lp_events = [ev] if ev.logprob is not None else []
        if not ev.text and ev.finish_reason is None and not lp_events:
            return None
        lp = self.logprobs_obj(lp_events, offset) if lp_events else None
        if self.chat:
            delta = {"content": ev.text} if ev.text else {}
            choice = {"index": i, "delta": delta, "logprobs": lp}
        else:
            choice = {"index": i, "text": ev.text, "logprobs": lp}
        choice["finish_reason"] = ev.finish_reason
        return self.chunk([choice])
