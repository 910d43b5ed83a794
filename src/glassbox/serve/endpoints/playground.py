"""The playground's API, under the extension prefix /v1/glassbox/ (same key as /v1):

    POST /v1/glassbox/tokenize       text or chat messages -> tokens with ids and text
    POST /v1/glassbox/chat_context   chat history -> what fits: used, left, dropped
    POST /v1/glassbox/next_token     prompt -> top candidates before/after each filter
    POST /v1/glassbox/attention      prompt -> attention weights (layers x heads x T x T)
    POST /v1/glassbox/arena/vote     one blind vote, appended to the arena's JSONL
    GET  /v1/glassbox/arena/leaderboard   Bradley-Terry and Elo with 95% intervals
    GET  /v1/glassbox/arena/votes    the votes file (preferences or ties) as JSONL
    GET  /v1/glassbox/info           what the page needs to draw itself
    POST /v1/glassbox/diffusion      denoising trajectory (playground_diffusion.py)
    POST /v1/glassbox/vision         a question about an image (playground_vision.py)

Registered only with ``glassbox serve --playground``; the page itself is served by
serve/playground_page.py. Model work runs off the event loop, so streams keep flowing.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from glassbox.errors import GlassboxError
from glassbox.infer.explain import attention_maps, next_token_logits, step_distribution
from glassbox.infer.sampling import SamplingParams
from glassbox.serve import arena
from glassbox.serve.errors import bad_request
from glassbox.serve.loading import ServedModel
from glassbox.serve.state import get_state

router = APIRouter(prefix="/v1/glassbox")

MAX_TOP_N = 100  # candidates shown per explorer step
MAX_ATTENTION_TOKENS = 256  # tokens of an attention request
MAX_ATTENTION_CELLS = 8_000_000  # layers x heads x T x T numbers in one answer
MAX_RESPONSE_CHARS = 100_000  # characters of one arena response


class LogitsCache:
    """The last few contexts' logits, so moving a slider does not rerun the model."""

    def __init__(self, size: int = 64):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, sm: ServedModel, ids: list[int]) -> torch.Tensor:
        key = (sm.name, tuple(ids))
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        limit = sm.engine.engine.vocab_limit
        logits = next_token_logits(sm.engine.engine.model, ids)[:limit]  # padding rows cut
        with self.lock:
            self.items[key] = logits
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return logits


@dataclass
class PlaygroundConfig:
    """What ``--playground`` turned on (``app.state.playground``)."""

    arena_dir: Path
    diffusion: dict = field(default_factory=dict)  # name -> DiffusionPipeline
    vision: dict = field(default_factory=dict)  # name -> playground_vision.VisionRun
    logits: LogitsCache = field(default_factory=LogitsCache)


def playground(request: Request) -> PlaygroundConfig:
    return request.app.state.playground


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Base):
    role: Literal["system", "user", "assistant"]
    content: str


class TokenizeRequest(_Base):
    model: str
    text: str | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True


class ContextRequest(_Base):
    model: str
    messages: list[Message]
    max_tokens: int = Field(256, description="Room kept for the reply (at most half the window).")


class NextTokenRequest(_Base):
    model: str
    prompt: str | None = Field(None, description="Text; starts with <|endoftext|> as in training.")
    token_ids: list[int] | None = Field(None, description="Or the context as token ids.")
    chat: bool = Field(False, description="Render `prompt` as one user message in the chat format.")
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    top_n: int = 20
    seed: int = 0


class AttentionRequest(_Base):
    model: str
    prompt: str | None = None
    token_ids: list[int] | None = None


class Contestant(_Base):
    name: str = Field(..., min_length=1, max_length=200)
    content: str


class VoteRequest(_Base):
    prompt: list[Message] = Field(..., min_length=1)
    a: Contestant
    b: Contestant
    outcome: Literal["a", "b", "tie", "both_bad"]


# -- helpers --------------------------------------------------------------------------


def token_display(sm: ServedModel, token: int) -> str:
    """A token's text, or its bytes as <0xNN> when they are part of a UTF-8 character."""
    text, raw = sm.token_text(token)
    return "".join(f"<0x{b:02X}>" for b in raw) if "\ufffd" in text else text


def _tokens(sm: ServedModel, ids: list[int]) -> list[dict]:
    return [{"id": i, "text": token_display(sm, i)} for i in ids]


def _context_ids(
    sm: ServedModel, prompt: str | None, ids: list[int] | None, chat: bool
) -> list[int]:
    """The request's context as ids, checked against the vocabulary and the window."""
    if (prompt is None) == (ids is None):
        raise bad_request("Give exactly one of prompt (text) and token_ids.", "prompt")
    if ids is None:
        if chat:
            ids = sm.tokenizer.encode_chat([{"role": "user", "content": prompt or ""}])
        else:
            ids = [sm.tokenizer.eot_id, *sm.tokenizer.encode(prompt or "")]
    if not ids:
        raise bad_request("token_ids is empty; send at least one token.", "token_ids")
    bad = next((t for t in ids if not 0 <= t < sm.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of range; use 0..{sm.vocab_size - 1}.",
                          "token_ids")  # fmt: skip
    if len(ids) >= sm.context_length:
        raise bad_request(
            f"The context has {len(ids)} tokens; this model's window is {sm.context_length}, "
            "so at most "
            f"{sm.context_length - 1} leave room for a next token. Shorten the prompt.",
            "prompt" if prompt is not None else "token_ids",
            "context_length_exceeded",
        )
    return ids


def _sampling(body: NextTokenRequest, vocab_size: int) -> SamplingParams:
    """The four filters, validated exactly as the engine validates them (400 per field)."""
    for name in ("temperature", "top_k", "top_p", "min_p"):
        try:
            SamplingParams(**{name: getattr(body, name)}).validate(vocab_size)
        except GlassboxError as e:
            raise bad_request(str(e), name) from None
    return SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                          min_p=body.min_p)  # fmt: skip


# -- endpoints ------------------------------------------------------------------------


@router.get("/info")
async def info(request: Request) -> dict:
    """Served models (with context windows and shapes) and the arena's directory."""
    state = get_state(request)
    models = []
    for name, sm in state.models.items():
        cfg = sm.engine.engine.model.cfg
        models.append({"id": name, "context_length": sm.context_length,
                       "n_layer": cfg.n_layer, "n_head": cfg.n_head})  # fmt: skip
    from glassbox.serve.endpoints.playground_diffusion import describe

    pg = playground(request)
    return {
        "models": models,
        "diffusion": [{"id": n, "condition": describe(p)} for n, p in pg.diffusion.items()],
        "vision": [{"id": n, "image_size": r.image_size} for n, r in pg.vision.items()],
        "arena_dir": str(pg.arena_dir),
        "limits": {"max_top_n": MAX_TOP_N, "max_attention_tokens": MAX_ATTENTION_TOKENS},
    }


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    """Text (no special tokens added) or chat messages (the chat template) as tokens."""
    sm = get_state(request).model(body.model)
    if (body.text is None) == (body.messages is None):
        raise bad_request("Give exactly one of text and messages.", "text")
    _check_chars(request, (body.text or "") + "".join(m.content for m in body.messages or []))
    if body.text is not None:
        ids = await asyncio.to_thread(sm.tokenizer.encode, body.text)
    else:
        msgs = [m.model_dump() for m in body.messages or []]
        ids = await asyncio.to_thread(sm.tokenizer.encode_chat, msgs, body.add_generation_prompt)
    return {"tokens": _tokens(sm, ids), "count": len(ids), "context_length": sm.context_length}


def _check_chars(request: Request, text: str) -> None:
    cap = get_state(request).limits.max_prompt_chars
    if len(text) > cap:
        raise bad_request(f"The text has {len(text)} characters; this server allows at most "
                          f"{cap} (--max-prompt-chars).", "text")  # fmt: skip


@router.post("/chat_context")
async def chat_context(body: ContextRequest, request: Request) -> dict:
    """The context rule of `glassbox chat` (serve/chat.py ChatSession.fit): keep the system
    prompt and the newest message, drop the oldest turns until prompt + reply fit."""
    from glassbox.serve.chat import ChatSession

    sm = get_state(request).model(body.model)
    if body.max_tokens < 1:
        raise bad_request(f"max_tokens={body.max_tokens} must be >= 1.", "max_tokens")
    msgs = [m.model_dump() for m in body.messages]
    _check_chars(request, "".join(m["content"] for m in msgs))
    system = [m for m in msgs if m["role"] == "system"]
    turns = [m for m in msgs if m["role"] != "system"]
    if len(system) > 1 or (system and msgs[0]["role"] != "system"):
        raise bad_request("Give at most one system message, first.", "messages")
    if not turns:
        raise bad_request("messages has no user message.", "messages")

    def fit() -> dict:
        session = ChatSession(sm.engine.engine, system[0]["content"] if system else None,
                              body.max_tokens)  # fmt: skip
        session.turns = list(turns)
        try:
            session.fit()  # drops from session.turns (no compression: that calls the model)
        except GlassboxError as e:
            raise bad_request(str(e), "messages", "context_length_exceeded") from None
        used = session.tokens_used(True)
        return {
            "messages": session.messages, "dropped": len(turns) - len(session.turns), "used": used,
            "reserve": session.reserve(), "left": sm.context_length - used,
            "context_length": sm.context_length,
        }  # fmt: skip

    return await asyncio.to_thread(fit)


@router.post("/next_token")
async def next_token(body: NextTokenRequest, request: Request) -> dict:
    """One step of the explorer: the top candidates at each stage and the draw."""
    sm = get_state(request).model(body.model)
    if not 1 <= body.top_n <= MAX_TOP_N:
        raise bad_request(f"top_n={body.top_n} is out of range; use 1..{MAX_TOP_N}.", "top_n")
    if not 0 <= body.seed < 2**63:
        raise bad_request(f"seed={body.seed} is out of range; use [0, 2**63).", "seed")
    params = _sampling(body, sm.vocab_size)
    _check_chars(request, body.prompt or "")

    def run() -> dict:
        ids = _context_ids(sm, body.prompt, body.token_ids, body.chat)
        logits = playground(request).logits.get(sm, ids)
        gen = torch.Generator().manual_seed(body.seed)
        d = step_distribution(logits, params, body.top_n, gen)
        text = {c.id: token_display(sm, c.id) for c in d.candidates}
        chosen_p = float(d.log_probs_final[d.chosen].exp())
        return {
            "token_ids": ids,
            "tokens": _tokens(sm, ids),
            "candidates": [asdict(c) | {"text": text[c.id]} for c in d.candidates],
            "survivors": d.survivors,
            "vocab_size": int(logits.shape[0]),
            "entropy_raw": d.entropy_raw,
            "entropy_final": d.entropy_final,
            "chosen": {"id": d.chosen, "text": token_display(sm, d.chosen), "p_final": chosen_p},
            "stop": d.chosen in sm.stop_ids,
        }

    return await asyncio.to_thread(run)


@router.post("/attention")
async def attention(body: AttentionRequest, request: Request) -> dict:
    """Attention weights of every layer and head for a prompt of up to 256 tokens."""
    sm = get_state(request).model(body.model)
    _check_chars(request, body.prompt or "")
    model = sm.engine.engine.model
    cfg = model.cfg

    def run() -> dict:
        ids = _context_ids(sm, body.prompt, body.token_ids, False)
        T = len(ids)
        param = "prompt" if body.prompt is not None else "token_ids"
        if T > MAX_ATTENTION_TOKENS:
            raise bad_request(
                f"{param} has {T} tokens; the attention view takes at most "
                f"{MAX_ATTENTION_TOKENS}. Send a shorter prompt.", param,
            )  # fmt: skip
        cells = cfg.n_layer * cfg.n_head * T * T
        if cells > MAX_ATTENTION_CELLS:
            most = int((MAX_ATTENTION_CELLS / (cfg.n_layer * cfg.n_head)) ** 0.5)
            raise bad_request(
                f"{param} has {T} tokens: {cells} attention weights for this model's "
                f"{cfg.n_layer} layers x {cfg.n_head} heads, over the limit of "
                f"{MAX_ATTENTION_CELLS}; send at most {most} tokens.", param,
            )  # fmt: skip
        weights, _ = attention_maps(model, ids)  # (L, H, T, T)
        return {
            "tokens": _tokens(sm, ids), "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "weights": weights.round(decimals=5).tolist(),
        }  # fmt: skip

    return await asyncio.to_thread(run)


@router.post("/arena/vote")
async def vote(body: VoteRequest, request: Request) -> dict:
    """Append one vote (see serve/arena.py for the two files and their forms)."""
    for side in ("a", "b"):
        c = getattr(body, side)
        if len(c.content) > MAX_RESPONSE_CHARS:
            raise bad_request(f"{side}.content has {len(c.content)} characters; at most "
                              f"{MAX_RESPONSE_CHARS}.", f"{side}.content")  # fmt: skip
    if body.a.name == body.b.name:
        raise bad_request(f"a and b are the same contestant ({body.a.name!r}); an arena vote "
                          "compares two.", "b.name")  # fmt: skip
    _check_chars(request, "".join(m.content for m in body.prompt))
    prompt = [m.model_dump() for m in body.prompt]
    shown = [(body.a.name, body.a.content), (body.b.name, body.b.content)]
    name, record = arena.vote_record(prompt, shown, body.outcome)
    path = playground(request).arena_dir / name
    await asyncio.to_thread(arena.append_line, path, record)
    return {"id": record["id"], "file": str(path), "outcome": body.outcome}


@router.get("/arena/leaderboard")
async def leaderboard(request: Request, rounds: int = 200) -> dict:
    """Bradley-Terry and Elo scores with 95% bootstrap intervals."""
    if not 0 <= rounds <= 2000:
        raise bad_request(f"rounds={rounds} is out of range; use 0..2000.", "rounds")
    arena_dir = playground(request).arena_dir

    def run() -> dict:
        return arena.leaderboard(arena.read_games(arena_dir), rounds)

    return await asyncio.to_thread(run)


@router.get("/arena/votes")
async def export_votes(request: Request, file: Literal["preferences", "ties"] = "preferences"):
    """The votes file as JSONL: ``preferences`` (what `glassbox reward` trains on) or ties."""
    path = playground(request).arena_dir / (arena.PREFERENCES if file == "preferences"
                                            else arena.TIES)  # fmt: skip
    data = await asyncio.to_thread(lambda: path.read_bytes() if path.is_file() else b"")
    return Response(data, media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="{path.name}"'})  # fmt: skip
