"""`glassbox chat`: a terminal chat with history, streaming and a context-window meter.

The conversation is rendered with the one chat format (glassbox.conversation, as the
server does) on every turn. When history + the next reply no longer fit in the context
window, the oldest user/assistant turns are dropped (the system prompt is always kept)
and the chat says so.
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


class ChatSession:
    """Multi-turn history on top of an :class:`Engine` (no server needed)."""

    def __init__(
        self,
        engine: Engine,
        system: str | None = None,
        max_tokens: int = 256,
        params: SamplingParams | None = None,
    ):
        if engine.tokenizer is None:
            raise GlassboxError("Chat needs a tokenizer.")
        self.engine, self.tok = engine, engine.tokenizer
        self.context = engine.context_length
        self.max_tokens = max_tokens
        self.params = (params or SamplingParams()).validate(engine.vocab_size)
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, str]] = []

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.system + self.turns

    def tokens_used(self, generation_prompt: bool = False) -> int:
        return len(self.tok.encode_chat(self.messages, add_generation_prompt=generation_prompt))

    def reserve(self) -> int:
        """Room kept for the reply: max_tokens, but never more than half the window."""
        return max(1, min(self.max_tokens, self.context // 2))

    def fit(self) -> int:
        """Drop the oldest turns until the prompt plus a reply fits; returns how many
        messages were dropped. The system prompt and the newest message stay."""
        dropped = 0
        while self.tokens_used(True) + self.reserve() > self.context and len(self.turns) > 1:
            self.turns.pop(0)
            dropped += 1
            if self.turns and self.turns[0]["role"] == "assistant":  # keep user-first order
                self.turns.pop(0)
                dropped += 1
        if self.tokens_used(True) >= self.context:
            self.turns.pop()
            raise GlassboxError(
                f"This message alone needs {self.tokens_used(True)}+ tokens with the system "
                f"prompt, but the context window is {self.context} tokens; send a shorter one."
            )
        return dropped

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> ChatReply:
        """Add a user message, generate the reply (streamed to ``on_text``), keep both."""
        self.turns.append({"role": "user", "content": text})
        dropped = self.fit()
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
        return ChatReply(reply, finish, dropped, self.tokens_used(), self.context)

    def reset(self) -> None:
        self.turns.clear()


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
    session = ChatSession(Engine(model, tok, max_seqs=1), system, max_tokens, params)
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
        note = " - reply cut at max tokens" if reply.finish_reason == "length" else ""
        console.print(f"[dim]context {escape(meter(reply.used, reply.context))}{note}[/dim]")
