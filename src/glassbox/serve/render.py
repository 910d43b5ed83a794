"""Engine events -> OpenAI response bodies and stream chunks (no I/O here)."""

from __future__ import annotations

import json
import time

from glassbox.infer.engine import RequestStream, TokenEvent
from glassbox.serve.loading import ServedModel
from glassbox.serve.tools import ToolCallStream, message_with_calls


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
        # Tool calling: the reply's text is parsed into tool_calls (see serve/tools.py).
        plan = getattr(body, "tool_plan", None) if chat else None
        self.tool_names = plan.names if plan is not None and plan.parses else None
        self.tool_streams: dict[int, ToolCallStream] = {}

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
            finish = self.finish.get(i)
            if self.chat:
                msg, called = {"role": "assistant", "content": text}, False
                if self.tool_names is not None:
                    msg, called = message_with_calls(text, self.tool_names)
                if called and finish == "stop":
                    finish = "tool_calls"
                choice = {"index": i, "message": msg, "logprobs": lp}
            else:
                choice = {"index": i, "text": text, "logprobs": lp}
            choice["finish_reason"] = finish
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
        if self.tool_names is not None:
            return self._tool_event_chunks(prompt_i, ev, offset)
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

    def _tool_event_chunks(self, prompt_i: int, ev: TokenEvent, offset: int) -> str | None:
        """With tools: content and tool-call deltas from the choice's ToolCallStream; the
        last chunk of a choice carries the finish reason ("tool_calls" after calls)."""
        i = self.index(prompt_i, ev)
        stream = self.tool_streams.setdefault(i, ToolCallStream(self.tool_names))
        deltas = stream.feed(ev.text)
        finish = ev.finish_reason
        if finish is not None:
            deltas += stream.finish()
            if stream.calls and finish == "stop":
                finish = "tool_calls"
        lp = self.logprobs_obj([ev], offset) if ev.logprob is not None else None
        if not deltas and finish is None and lp is None:
            return None
        deltas = deltas or [{}]
        chunks = []
        for k, delta in enumerate(deltas):
            last = k == len(deltas) - 1
            choice = {"index": i, "delta": delta, "logprobs": lp if k == 0 else None,
                      "finish_reason": finish if last else None}  # fmt: skip
            chunks.append(self.chunk([choice]))
        return "".join(chunks)
