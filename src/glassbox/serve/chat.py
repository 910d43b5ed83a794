"""`glassbox chat`: a terminal chat with history, streaming and a context-window meter.

The conversation is rendered with the one chat format (glassbox.conversation, as the
server does) on every turn. When history + the next reply no longer fit in the context
window, the oldest user/assistant turns are dropped (the system prompt is always kept)
and the chat says so. With ``compress`` (``glassbox chat --compress``) they are
summarized by the same model instead, and the summary (which absorbs earlier summaries)
rides in the system turn; the meter shows how many messages it stands for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from glassbox.errors import GlassboxError
from glassbox.infer.engine import Engine, GenerationRequest
from glassbox.infer.sampling import SamplingParams


@dataclass
class ChatReply:
    text: str
    finish_reason: str
    dropped: int  # messages dropped from the start of history before this turn
    used: int  # tokens in the context after the reply
    context: int  # the model's context window
    compressed: int = 0  # messages summarized (not dropped) before this turn


class ChatSession:
    """Multi-turn history on top of an :class:`Engine` (no server needed)."""

    def __init__(
        self,
        engine: Engine,
        system: str | None = None,
        max_tokens: int = 256,
        params: SamplingParams | None = None,
        compress: bool = False,
    ):
        if engine.tokenizer is None:
            raise GlassboxError("Chat needs a tokenizer.")
        self.engine, self.tok = engine, engine.tokenizer
        self.context = engine.context_length
        self.max_tokens = max_tokens
        self.params = (params or SamplingParams()).validate(engine.vocab_size)
        self.system_prompt = system
        self.turns: list[dict[str, str]] = []
        self.compress = compress
        self.summary = ""  # of the turns compressed away so far
        self.summarized = 0  # how many messages the summary stands for
        self._compressed_now = 0  # messages folded into the summary by the current turn

    @property
    def system(self) -> list[dict[str, str]]:
        parts = [self.system_prompt] if self.system_prompt else []
        if self.summary:
            parts.append(f"Summary of the earlier conversation: {self.summary}")
        return [{"role": "system", "content": "\n\n".join(parts)}] if parts else []

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.system + self.turns

    def tokens_used(self, generation_prompt: bool = False) -> int:
        return len(self.tok.encode_chat(self.messages, add_generation_prompt=generation_prompt))

    def reserve(self) -> int:
        """Room kept for the reply: max_tokens, but never more than half the window."""
        return max(1, min(self.max_tokens, self.context // 2))

    def fit(self) -> tuple[int, int]:
        """Make the prompt plus a reply fit: take the oldest turns out (the system prompt
        and the newest message stay) and drop them, or with ``compress`` fold them into
        the summary. Returns (messages dropped, messages compressed)."""
        taken: list[dict[str, str]] = []
        while self.tokens_used(True) + self.reserve() > self.context and len(self.turns) > 1:
            taken.append(self.turns.pop(0))
            if self.turns and self.turns[0]["role"] == "assistant":  # keep user-first order
                taken.append(self.turns.pop(0))
            if self.compress:
                self._fold(taken)
                taken = []
        if self.tokens_used(True) + self.reserve() > self.context and self.summary:
            self.summary, self.summarized = "", 0  # the summary itself no longer fits
        if self.tokens_used(True) >= self.context:
            self.turns.pop()
            raise GlassboxError(
                f"This message alone needs {self.tokens_used(True)}+ tokens with the system "
                f"prompt, but the context window is {self.context} tokens; send a shorter one."
            )
        return len(taken), 0 if not self.compress else self._compressed_now

    def _fold(self, turns: list[dict[str, str]]) -> None:
        """Summarize the old summary plus ``turns`` into a new summary of at most an
        eighth of the window (so it always leaves room)."""
        text = "\n".join(f"{m['role']}: {m['content']}" for m in turns)
        if self.summary:
            text = f"Earlier: {self.summary}\n{text}"
        budget = max(8, self.context // 8)
        prompt = self.tok.encode_chat([
            {"role": "system", "content": "Summarize this conversation in one or two sentences."},
            {"role": "user", "content": text},
        ])[-(self.context - budget) :]  # fmt: skip
        req = GenerationRequest(prompt, SamplingParams(temperature=0.0), budget,
                                stop_token_ids=self.engine.stop_ids)  # fmt: skip
        self.summary = "".join(ev.text or "" for ev in self.engine.generate(req)).strip()
        self.summarized += len(turns)
        self._compressed_now += len(turns)

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> ChatReply:
        """Add a user message, generate the reply (streamed to ``on_text``), keep both."""
        self.turns.append({"role": "user", "content": text})
        self._compressed_now = 0
        dropped, compressed = self.fit()
        prompt = self.tok.encode_chat(self.messages)
        max_new = min(self.max_tokens, self.context - len(prompt))
        req = GenerationRequest(prompt, self.params, max_new, stop_token_ids=self.engine.stop_ids)
        pieces, finish = [], "length"
        for ev in self.engine.generate(req):
            if ev.text:
                pieces.append(ev.text)
                if on_text:
                    on_text(ev.text)
            if ev.finish_reason:
                finish = ev.finish_reason
        reply = "".join(pieces)
        self.turns.append({"role": "assistant", "content": reply})
        return ChatReply(reply, finish, dropped, self.tokens_used(), self.context, compressed)

    def reset(self) -> None:
        self.turns.clear()
        self.summary, self.summarized = "", 0


def meter(used: int, context: int, width: int = 20) -> str:
    """A one-line context meter: ``[#####-----] 512/1024 tokens (50%)``."""
    frac = min(1.0, used / context)
    bar = "#" * round(frac * width) + "-" * (width - round(frac * width))
    return f"[{bar}] {used}/{context} tokens ({frac:.0%})"


def run_chat(
    checkpoint: str,
    system: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    device: str,
    dtype: str = "auto",
    compress: bool = False,
) -> None:
    """The interactive loop behind `glassbox chat`."""
    from rich.console import Console
    from rich.markup import escape

    from glassbox.serve.loading import load_for_decoding

    console = Console(highlight=False)
    model, tok, _ = load_for_decoding(
        checkpoint, device, dtype, lambda s: console.print(f"[dim]{escape(s)}[/dim]")
    )
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    session = ChatSession(Engine(model, tok, max_seqs=1), system, max_tokens, params, compress)
    console.print(
        f"[dim]chat with {checkpoint} ({session.context}-token context). "
        "Commands: /reset, /exit. Ctrl-D quits.[/dim]"
    )
    while True:
        try:
            text = console.input("[bold green]you> [/bold green]")
        except EOFError:
            console.print()
            return
        if text.strip() in {"/exit", "/quit"}:
            return
        if text.strip() == "/reset":
            session.reset()
            console.print("[dim]history cleared (system prompt kept)[/dim]")
            continue
        if not text.strip():
            continue
        console.print("[bold blue]assistant> [/bold blue]", end="")
        try:
            reply = session.send(text, on_text=lambda s: console.out(s, end=""))
        except GlassboxError as e:
            console.print(f"\n[red]{e}[/red]")
            continue
        console.print()
        if reply.dropped:
            console.print(
                f"[yellow]context full: dropped the {reply.dropped} oldest messages to make "
                "room (system prompt kept)[/yellow]"
            )
        if reply.compressed:
            console.print(
                f"[yellow]context full: summarized the {reply.compressed} oldest messages "
                f"(the summary now stands for {session.summarized})[/yellow]"
            )
        note = " - reply cut at max tokens" if reply.finish_reason == "length" else ""
        if session.summarized:
            note += f" - {session.summarized} earlier messages as a summary"
        console.print(f"[dim]context {escape(meter(reply.used, reply.context))}{note}[/dim]")
