"""The inference engine: token ids in, token ids out, many sequences at once. It is the
only decoder: `generate_text`, the terminal chat, the HTTP server and RL rollouts all
run through it.

One KV cache with ``max_seqs`` rows ("slots") is allocated up front; each running
sequence owns one slot. Every :meth:`Engine.step` runs at most ``max_batched_tokens``
tokens: one per decoding sequence, the rest prompt chunks:

    1. prefill: prompts still being prefilled continue, then waiting requests are
       admitted while slots are free; each gets a chunk of its prompt (the whole rest,
       or what the step's budget leaves), and all chunks run in ONE forward pass
       (left-padded to the longest; see :func:`prefill_chunks`). A request whose last
       chunk ran samples its first tokens (its n choices copy the prompt's cache row);
       one still mid-prompt holds its slots and samples nothing yet;
    2. decode one token for every sequence past its prefill in ONE forward pass: a
       ragged batch of (B, 1) tokens, each row at its own position in its own slot
       (with ``compile``: the static-shape step, padded to a batch bucket);
    3. per row: logit_bias, penalties, grammar mask; then ONE vectorized sampling op
       for the whole batch (sampling.py); then per row: stop rules and text.

Requests join and leave between steps (continuous batching); a long prompt is spread
over steps (chunked prefill) so the running sequences still get a token every step.
Greedy and seeded decoding give the same tokens alone or batched, and whatever the
chunking (tests/infer/test_engine.py, test_prefill.py).

Faults stay with their request: an exception while prefilling, decoding or sampling one
request ends that request (finish_reason "error", the exception on its event) and frees
its slots; the others continue. A batched prefill or decode step that raises is retried
row by row, so the error lands on the rows that cause it.

Speculative decoding is a separate single-stream mode: :mod:`glassbox.infer.speculative`.

:class:`AsyncEngine` runs an engine on one background thread that owns the model; the
HTTP server submits requests from its event loop and receives tokens on asyncio queues.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from glassbox.errors import ContextLengthError, GlassboxError
from glassbox.infer.detokenize import IncrementalDetokenizer
from glassbox.infer.rollout import Rollout
from glassbox.infer.rules import StopStrings, fit_context, stop_token_ids
from glassbox.infer.sampling import (
    SamplingParams,
    SamplingTensors,
    apply_penalties,
    make_generator,
    sample_batch,
    token_logprobs,
    uses_history,
)
from glassbox.infer.structured import Grammar, TokenMatcher, bitmask_words, unpack_bitmask_np
from glassbox.model import KVCache, Transformer
from glassbox.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------
# Requests and their outputs
# ---------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    """One request: a prompt of token ids and how to continue it."""

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None = the rest of the engine's window
    n: int = 1  # independent continuations (choice i uses seed + i when seeded)
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer)
    stop_token_ids: frozenset[int] = frozenset()  # end the sequence, not shown
    logprobs: int | None = None  # None = off; k = also return the k most likely tokens
    truncate_prompt_tokens: int | None = None  # keep only the last N prompt tokens
    grammar: Grammar | None = None  # structured output
    request_id: str = ""
    detokenize: bool = True  # False: ids only, no text (rollouts); stop strings need text
    # (T, C) input vectors for the prompt's positions, used at prefill instead of the
    # token embeddings (a vision-language model's prompt: text embeddings with image
    # vectors at the image slots); None = embed(prompt). Decoding embeds sampled tokens.
    prompt_embeds: torch.Tensor | None = None


@dataclass
class TokenEvent:
    """What one sequence produced in one step."""

    index: int  # which of the request's n choices
    token: int | None  # None when the event only ends the sequence (stop token, abort)
    text: str = ""  # newly visible text (stop strings held back and removed)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None
    error: BaseException | None = None  # what ended it, with finish_reason "error"


@dataclass(eq=False)
class Sequence:
    """The engine's state for one choice of one request."""

    seq_id: int
    index: int
    request: GenerationRequest
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    matcher: TokenMatcher | None = None
    decoder: IncrementalDetokenizer | None = None
    stops: StopStrings | None = None
    output: list[int] = field(default_factory=list)  # generated ids, stop token excluded
    logprobs: list[float] | None = None  # per sampled token (stop token included)
    stop_token: int | None = None  # the stop token that ended it, if one did
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache (< len(prompt): still prefilling)
    finish_reason: str | None = None
    error: BaseException | None = None
    group: list[Sequence] = field(default_factory=list)  # all n choices of the request
    on_event: Callable[[TokenEvent], None] | None = None
    owner: Any = None  # whoever submitted it (AsyncEngine: the RequestStream)

    @property
    def pos(self) -> int:
        """Cache position of the next token to feed (the last sampled one)."""
        return len(self.prompt) + len(self.output) - 1

    def history(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.prompt + self.output, device=device)


Events = list[tuple[Sequence, TokenEvent]]


# ---------------------------------------------------------------------------------------
# The forward passes, one function per phase
# ---------------------------------------------------------------------------------------


@torch.inference_mode()
def prefill(model: Transformer, cache: KVCache, prompt: torch.Tensor, slot: int) -> torch.Tensor:
    """Run a whole prompt (T,) into cache row ``slot``; return next-token logits (1, V)."""
    return prefill_chunks(model, cache, [prompt], [0], [slot])


@torch.inference_mode()
def prefill_chunks(
    model: Transformer,
    cache: KVCache,
    chunks: list[torch.Tensor],  # B chunks (c_b,) of prompt tokens
    starts: list[int],  # cache position of each chunk's first token
    slots: list[int],  # cache row of each chunk
    embeds: list[torch.Tensor | None] | None = None,  # per chunk (c_b, C) input vectors
) -> torch.Tensor:
    """Prefill B prompt chunks of different lengths in ONE forward; returns the logits
    after each chunk's last token (B, V).

    Rows are LEFT-padded to the longest chunk so every row's last token is the last
    column (the LM head then runs on one position per row). A padding token sits at
    its row's next position ``start + c``: real tokens (positions < start + c) cannot
    see it, and that cache entry is written again, by the real token, before any real
    token reads it (the next chunk or the first decode step writes position start + c
    first). The prompt + at least one new token fit the cache, so start + c < max_len.

    ``embeds[b]``, when given, replaces chunk b's token embeddings (a VLM's image slots).
    """
    B, T = len(chunks), max(c.shape[0] for c in chunks)
    device = chunks[0].device
    idx = torch.zeros(B, T, dtype=torch.long, device=device)  # (B, T)
    input_pos = torch.empty(B, T, dtype=torch.long, device=device)  # (B, T)
    for b, (chunk, start) in enumerate(zip(chunks, starts, strict=True)):
        c = chunk.shape[0]
        idx[b, T - c :] = chunk
        input_pos[b, T - c :] = torch.arange(start, start + c, device=device)
        input_pos[b, : T - c] = start + c
    rows = torch.tensor(slots, device=device)
    x = None
    if embeds is not None and any(e is not None for e in embeds):
        x = model.embed(idx)  # (B, T, C)
        for b, e in enumerate(embeds):
            if e is not None:
                x[b, T - e.shape[0] :] = e.to(x.dtype)
    return model(idx, cache, input_pos, rows, last_only=True, embeds=x)[:, -1]  # (B, V)


@torch.inference_mode()
def decode_one_token(
    model: Transformer,
    cache: KVCache,
    tokens: torch.Tensor,  # (B,) last token of each sequence
    input_pos: torch.Tensor,  # (B,) its position
    rows: torch.Tensor | None,  # (B,) cache slots; None = slots 0..B-1
) -> torch.Tensor:
    """One decoding step for a ragged batch; returns next-token logits (B, V)."""
    return model(tokens.view(-1, 1), cache, input_pos.view(-1, 1), rows)[:, -1]  # (B, V)


def decode_static(
    model: Transformer,
    cache: KVCache,
    tokens: torch.Tensor,  # (B,)
    input_pos: torch.Tensor,  # (B,)
    rows: torch.Tensor,  # (B,) cache slots
) -> torch.Tensor:
    """The decode step with shapes fixed by B and the cache length alone (attention over
    all ``cache.max_len`` positions, masked past each row's position; no size read from
    the data), so torch.compile and CUDA graphs can capture it. Same math as
    :func:`decode_one_token`; returns (B, V)."""
    pos = input_pos.view(-1, 1)  # (B, 1)
    x = model.embed(tokens.view(-1, 1))  # (B, 1, C)
    cos, sin = model.rope_cos[pos].unsqueeze(1), model.rope_sin[pos].unsqueeze(1)
    S = cache.max_len
    key_pos = torch.arange(S, device=pos.device).view(1, 1, S)
    mask = (key_pos <= pos.unsqueeze(-1)).unsqueeze(1)  # (B, 1, 1, S)
    for block in model.layers:
        x = block(x, cos, sin, cache, pos, rows, mask, S)
    return model.lm_head(model.norm(x))[:, -1]  # (B, V)


def batch_buckets(max_seqs: int) -> list[int]:
    """Batch sizes a captured decode step exists for: powers of two, then max_seqs."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_seqs]
    return [*sizes, max_seqs]


class CompiledDecode:
    """A decode step for fixed batch buckets: a batch of B rows is padded up to the
    next bucket with rows that write to a scratch cache slot (token 0, position 0), so
    the real rows never see them, and the result is cut back to B rows.

    CPU: ``torch.compile`` of :func:`decode_static`, one graph per bucket, built on
    first use. CUDA: one CUDA graph per bucket, captured up front with static input
    buffers (the cache's storage never moves, so replays write into it in place).
    The CUDA path has not been run on a GPU in this project's CI (no GPU there)."""

    def __init__(self, model: Transformer, cache: KVCache, max_seqs: int, scratch: int):
        self.model, self.cache, self.scratch = model, cache, scratch
        self.buckets = batch_buckets(max_seqs)
        self.device = model.embed.weight.device
        self.cuda = self.device.type == "cuda"
        self._graphs: dict[int, tuple] = {}
        if self.cuda:
            for b in self.buckets:
                self._graphs[b] = self._capture(b)
        else:
            self._fn = torch.compile(decode_static, dynamic=False)

    def _inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(b, dtype=torch.long, device=self.device)
        return zeros, zeros.clone(), torch.full_like(zeros, self.scratch)

    @torch.inference_mode()
    def _capture(self, b: int) -> tuple:
        tokens, pos, rows = self._inputs(b)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up off the capture (allocator, kernels)
            for _ in range(2):
                decode_static(self.model, self.cache, tokens, pos, rows)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode_static(self.model, self.cache, tokens, pos, rows)
        return graph, tokens, pos, rows, out

    def __call__(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        B = tokens.shape[0]
        b = next(x for x in self.buckets if x >= B)
        if self.cuda:
            graph, t, p, r, out = self._graphs[b]
            t.zero_(), p.zero_(), r.fill_(self.scratch)
            t[:B], p[:B], r[:B] = tokens, input_pos, rows
            graph.replay()
            return out[:B].clone()
        t, p, r = self._inputs(b)
        t[:B], p[:B], r[:B] = tokens, input_pos, rows
        with torch.no_grad():  # (inference tensors and inductor's CPU graphs do not mix)
            return self._fn(self.model, self.cache, t, p, r)[:B]


# ---------------------------------------------------------------------------------------
# The synchronous engine
# ---------------------------------------------------------------------------------------


def _time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds of ``fn`` after one warm-up call (which compiles)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


class Engine:
    """Continuous-batching scheduler around one model and one KV cache.

    Not thread-safe: one thread calls :meth:`add`, :meth:`abort` and :meth:`step`
    (:class:`AsyncEngine` is that thread for the server). ``max_len`` (default: the
    model's context window) is the most tokens, prompt + output, one sequence may hold.
    ``max_batched_tokens`` bounds one step's tokens (decode + prompt chunks): smaller
    keeps running streams' pace when long prompts arrive, larger admits bursts faster.
    ``compile``: ``off`` (eager), ``on`` (the static-shape decode step through
    torch.compile on CPU, CUDA graphs on CUDA) or ``auto`` (time both at start, keep
    the faster; :attr:`compile_decision` says which and why).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        max_seqs: int = 16,
        max_len: int | None = None,
        max_batched_tokens: int = 256,
        compile: str = "off",
    ):
        ctx = model.cfg.context_length
        max_len = max_len or ctx
        if max_seqs < 1:
            raise GlassboxError(f"max_seqs={max_seqs} must be >= 1 (one slot per sequence).")
        if not 1 <= max_len <= ctx:
            raise GlassboxError(
                f"max_len={max_len} is out of range; use 1..{ctx} (the model's context window)."
            )
        if max_batched_tokens < 1:
            raise GlassboxError(
                f"max_batched_tokens={max_batched_tokens} must be >= 1 (tokens per step)."
            )
        self.model = model
        # Tokens one step may run: one per decoding sequence, the rest prompt chunks.
        # A long prompt is prefilled over several steps while the others keep decoding.
        self.max_batched_tokens = max_batched_tokens
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.device = model.embed.weight.device
        self.context_length = ctx
        self.max_len = max_len
        self.max_seqs = max_seqs
        if compile not in ("off", "on", "auto"):
            raise GlassboxError(f"compile={compile!r} is not one of: auto, on, off.")
        # A compiled decode step pads batches into a spare cache row (slot max_seqs).
        rows = max_seqs + (compile != "off")
        self.cache = KVCache(model.cfg, rows, max_len, self.device, model.embed.weight.dtype)
        self.compiled: CompiledDecode | None = None
        self.compile_decision = "off"
        self.vocab_size = model.cfg.vocab_size
        # Ids past the tokenizer's vocabulary (padding rows of the embedding) decode to
        # nothing, so they are never sampled when text matters.
        self.vocab_limit = tokenizer.vocab_size if tokenizer else self.vocab_size
        self.stop_ids = stop_token_ids(tokenizer) if tokenizer is not None else frozenset()
        self.waiting: deque[list[Sequence]] = deque()  # one entry per request
        self.running: list[Sequence] = []  # sorted by slot
        self.free_slots = list(range(max_seqs))
        self._ids = itertools.count()
        self._bitmask = torch.zeros(max_seqs, bitmask_words(self.vocab_size), dtype=torch.int32)
        self.tokens_generated = 0
        # Called with a request's sequences when they leave the waiting queue for slots.
        self.on_admit: Callable[[list[Sequence]], None] | None = None
        if compile != "off":
            self._set_up_compile(compile)

    # -- compiling the decode step ----------------------------------------------------

    def _set_up_compile(self, mode: str) -> None:
        """``on``: use the compiled decode step. ``auto``: time it against eager on a
        full batch (in the spare row, so no sequence is touched) and keep the faster;
        the decision, with both timings, is in :attr:`compile_decision` and printed."""
        compiled = CompiledDecode(self.model, self.cache, self.max_seqs, self.max_seqs)
        if mode == "on":
            self.compiled, self.compile_decision = compiled, "on"
            return
        B, pos = self.max_seqs, max(0, self.max_len // 4)
        tokens = torch.zeros(B, dtype=torch.long, device=self.device)
        input_pos = torch.full((B,), pos, dtype=torch.long, device=self.device)
        rows = torch.full((B,), self.max_seqs, dtype=torch.long, device=self.device)
        eager = _time(lambda: decode_one_token(self.model, self.cache, tokens, input_pos, rows))
        fast = _time(lambda: compiled(tokens, input_pos, rows))
        kind = "CUDA graphs" if compiled.cuda else "torch.compile"
        if fast < eager:
            self.compiled = compiled
        verdict = "using it" if fast < eager else "staying eager"
        self.compile_decision = (
            f"compile auto: {kind} decode step {1e3 * fast:.1f} ms vs eager "
            f"{1e3 * eager:.1f} ms (batch {B}); {verdict}"
        )
        print(self.compile_decision, flush=True)

    # -- state ------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        """Sequences holding a slot."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for slots."""
        return len(self.waiting)

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    # -- requests ---------------------------------------------------------------------

    def prepare(self, req: GenerationRequest) -> GenerationRequest:
        """Validate a request and apply the context rule; returns it with the final
        prompt and max_tokens. Raises GlassboxError (ContextLengthError) on bad input.

        Only structural rules live here (what this engine can run); policy limits for
        untrusted callers (how many choices, stop strings, top logprobs) are the
        server's."""
        req.params.validate(self.vocab_size)
        if not 1 <= req.n <= self.max_seqs:
            raise GlassboxError(
                f"n={req.n} is out of range; this engine has {self.max_seqs} sequence slots, "
                f"so use 1..{self.max_seqs}."
            )
        if req.logprobs is not None and not 0 <= req.logprobs <= self.vocab_size:
            raise GlassboxError(
                f"top_logprobs={req.logprobs} is out of range; use a value in "
                f"[0, {self.vocab_size}]."
            )
        if req.max_tokens is not None and req.max_tokens < 1:
            raise GlassboxError(f"max_tokens={req.max_tokens} must be >= 1.")
        if req.stop and (self.tokenizer is None or not req.detokenize):
            raise GlassboxError(
                "Stop strings need text: give the engine a tokenizer and keep detokenize=True."
            )
        self._check_ids("prompt token id", req.prompt)
        self._check_ids("stop token id", req.stop_token_ids)
        self._check_embeds(req)
        prompt = list(req.prompt)
        if req.truncate_prompt_tokens is not None:
            if req.truncate_prompt_tokens < 1:
                raise GlassboxError(
                    f"truncate_prompt_tokens={req.truncate_prompt_tokens} must be >= 1."
                )
            prompt = prompt[-req.truncate_prompt_tokens :]
        keep, max_new = self._fit(len(prompt), req.max_tokens)
        req.prompt, req.max_tokens = prompt[len(prompt) - keep :], max_new
        if req.prompt_embeds is not None:  # the same positions as the kept prompt
            req.prompt_embeds = req.prompt_embeds[req.prompt_embeds.shape[0] - keep :]
        return req

    def _check_embeds(self, req: GenerationRequest) -> None:
        e = req.prompt_embeds
        if e is not None and tuple(e.shape) != (len(req.prompt), self.cfg.d_model):
            raise GlassboxError(
                f"prompt_embeds has shape {tuple(e.shape)}; it must be (prompt tokens, d_model)"
                f" = ({len(req.prompt)}, {self.cfg.d_model}), one vector per prompt position."
            )

    def _check_ids(self, what: str, ids) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise GlassboxError(f"{what} {bad[0]} is out of range; use 0..{self.vocab_size - 1}.")

    def _fit(self, prompt_len: int, max_tokens: int | None) -> tuple[int, int]:
        """The context rule against this engine's cache, checked before any prefill."""
        try:
            return fit_context(prompt_len, max_tokens, self.max_len)
        except ContextLengthError as e:
            if self.max_len == self.context_length:
                raise
            raise GlassboxError(
                f"The prompt has {prompt_len} tokens and {max_tokens or 1} new tokens were "
                f"requested, but this engine's cache holds max_len={self.max_len} tokens per "
                f"sequence (the model's context is {self.context_length}). Shorten the prompt, "
                "lower max_tokens, or build the Engine with a larger max_len."
            ) from e

    def add(
        self,
        req: GenerationRequest,
        on_event: Callable[[TokenEvent], None] | None = None,
        prepared: bool = False,
        owner: Any = None,
    ) -> list[Sequence]:
        """Queue a request (n sequences); events go to ``on_event`` as they happen."""
        if not prepared:
            self.prepare(req)
        assert req.max_tokens is not None
        text = self.tokenizer is not None and req.detokenize
        seqs: list[Sequence] = []
        for i in range(req.n):
            seed = None if req.params.seed is None else req.params.seed + i
            seq = Sequence(
                seq_id=next(self._ids), index=i, request=req, prompt=req.prompt,
                max_tokens=req.max_tokens, params=req.params,
                generator=make_generator(seed, self.device),
                matcher=req.grammar.matcher() if req.grammar else None,
                decoder=IncrementalDetokenizer(self.tokenizer) if text else None,
                stops=StopStrings(req.stop) if req.stop else None,
                logprobs=[] if req.logprobs is not None else None,
                group=seqs, on_event=on_event, owner=owner,
            )  # fmt: skip
            seqs.append(seq)
        self.waiting.append(seqs)
        return seqs

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop a request's sequences (the client went away): free their slots, emit
        nothing. Safe in any phase, also after they finished."""
        if not seqs:
            return
        group = seqs[0].group
        self.waiting = deque(g for g in self.waiting if g is not group)
        for seq in seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        self._release()

    def fail_all(self, error: BaseException) -> Events:
        """End every waiting and running request with ``error`` (the last resort when a
        step fails in a way no single request explains); frees every slot."""
        events: Events = []
        for seq in list(self.running):
            self._fail(seq, error, events)
        for group in list(self.waiting):
            self._fail(group[0], error, events)
        self.waiting.clear()
        self._release()
        return events

    # -- one scheduling step ----------------------------------------------------------

    def step(self) -> Events:
        """Prefill prompt chunks (continuing ones first, then newly admitted requests)
        in one forward, then decode one token for every sequence past its prefill."""
        events: Events = []
        decoding = [s for s in self.running if s.output and s.finish_reason is None]
        self._prefill_step(max(1, self.max_batched_tokens - len(decoding)), events)
        decoding = [s for s in decoding if s.finish_reason is None]
        if decoding:
            logits, decoding = self._decode(decoding, events)
            if decoding:
                self._sample(decoding, logits, events)
        self._release()
        for seq, ev in events:
            if seq.on_event is not None:
                seq.on_event(ev)
        return events

    def _prefill_step(self, budget: int, events: Events) -> None:
        """Choose this step's prompt chunks under ``budget`` tokens and run them."""
        work: list[tuple[list[Sequence], int]] = []  # (request's sequences, chunk length)
        for group in self._prefilling():
            if budget <= 0:
                break
            c = min(budget, len(group[0].prompt) - group[0].prefilled)
            work.append((group, c))
            budget -= c
        while budget > 0 and self.waiting and len(self.waiting[0]) <= len(self.free_slots):
            group = self.waiting.popleft()
            for seq in group:  # slots first: whatever happens next, _release returns them
                seq.slot = self.free_slots.pop(0)
                self.running.append(seq)
            self.running.sort(key=lambda s: s.slot)
            if self.on_admit is not None:
                self.on_admit(group)
            c = min(budget, len(group[0].prompt))
            work.append((group, c))
            budget -= c
        if work:
            self._run_prefill(work, events)

    def _prefilling(self) -> list[list[Sequence]]:
        """Requests holding slots whose prompt is not all in the cache, oldest first."""
        groups = {id(s.group): s.group for s in self.running if s.prefilled < len(s.prompt)}
        live = [g for g in groups.values() if g[0].finish_reason is None]
        return sorted(live, key=lambda g: g[0].seq_id)

    def _run_prefill(self, work: list[tuple[list[Sequence], int]], events: Events) -> None:
        """One forward for every chunk. If it raises, retry each chunk alone: the ones
        that fail alone fail their request; the others go on. A request whose last
        chunk ran samples its first tokens."""
        try:
            done = list(zip(work, self._prefill_forward(work), strict=True))
        except Exception as batch_error:
            if len(work) == 1:
                self._fail(work[0][0][0], batch_error, events)
                self._release()
                return
            done = []
            for item in work:  # re-running a chunk rewrites the same cache entries
                try:
                    done.append((item, self._prefill_forward([item])[0]))
                except Exception as e:
                    self._fail(item[0][0], e, events)
        for (group, c), logits in done:
            if group[0].finish_reason is not None:
                continue
            for seq in group:
                seq.prefilled += c
            if group[0].prefilled == len(group[0].prompt):
                self._copy_prompt(group)
                self._sample(group, logits.view(1, -1).expand(len(group), -1), events)
        self._release()

    def _prefill_forward(self, work: list[tuple[list[Sequence], int]]) -> torch.Tensor:
        chunks, starts, slots, embeds = [], [], [], []
        for group, c in work:
            start = group[0].prefilled
            chunks.append(torch.tensor(group[0].prompt[start : start + c], device=self.device))
            starts.append(start)
            slots.append(group[0].slot)
            e = group[0].request.prompt_embeds
            embeds.append(None if e is None else e[start : start + c].to(self.device))
        return prefill_chunks(self.model, self.cache, chunks, starts, slots, embeds)  # (B, V)

    def _copy_prompt(self, group: list[Sequence]) -> None:
        """The n choices of a request share one prefill: copy the first slot's prompt."""
        T, first = len(group[0].prompt), group[0].slot
        for seq in group[1:]:
            self.cache.k[:, seq.slot, :T] = self.cache.k[:, first, :T]
            self.cache.v[:, seq.slot, :T] = self.cache.v[:, first, :T]

    def _decode(self, seqs: list[Sequence], events: Events) -> tuple[torch.Tensor, list[Sequence]]:
        """One batched decode step. If it raises, retry each row alone: rows that fail
        alone are the culprits and fail; the others go on. Returns (logits (B', V), rows)."""
        try:
            return self._decode_forward(seqs), seqs
        except Exception as batch_error:
            if len(seqs) == 1:
                self._fail(seqs[0], batch_error, events)
                return torch.empty(0), []
        # Re-running a row rewrites the same keys/values at the same cache positions,
        # so the failed batch left nothing behind that a retry could trip over.
        done: list[tuple[Sequence, torch.Tensor]] = []
        for seq in seqs:
            if seq.finish_reason is not None:  # a sibling already failed the request
                continue
            try:
                done.append((seq, self._decode_forward([seq])))
            except Exception as e:
                self._fail(seq, e, events)
        done = [(s, row) for s, row in done if s.finish_reason is None]
        if not done:
            return torch.empty(0), []
        return torch.cat([row for _, row in done]), [s for s, _ in done]

    def _decode_forward(self, seqs: list[Sequence]) -> torch.Tensor:
        tokens = torch.tensor([s.output[-1] for s in seqs], device=self.device)  # (B,)
        input_pos = torch.tensor([s.pos for s in seqs], device=self.device)  # (B,)
        slots = [s.slot for s in seqs]
        if self.compiled is not None:
            return self.compiled(tokens, input_pos, torch.tensor(slots, device=self.device))
        # slots 0..B-1 in order: the cache reads plain slices instead of a gather
        rows = None if slots == list(range(len(slots))) else torch.tensor(slots, device=self.device)
        return decode_one_token(self.model, self.cache, tokens, input_pos, rows)  # (B, V)

    # -- sampling ---------------------------------------------------------------------

    def _sample(self, seqs: list[Sequence], raw: torch.Tensor, events: Events) -> None:
        """raw logits (B, V) -> per-row processing -> one batched draw -> per-row rules."""
        logits = raw.float().clone()
        if self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.logit_bias or uses_history(p):
                try:
                    hist = seq.history(self.device) if uses_history(p) else raw.new_empty(0).long()
                    logits[i] = apply_penalties(logits[i], hist, p)
                except Exception as e:
                    self._fail(seq, e, events)
        self._apply_grammars(seqs, logits, events)
        live = [i for i, s in enumerate(seqs) if s.finish_reason is None]
        if len(live) < len(seqs):
            seqs, logits, raw = [seqs[i] for i in live], logits[live], raw[live]
        if not seqs:
            return
        try:
            picks = self._choose(seqs, logits, raw)
        except Exception:  # which row? draw each alone; the rows that still fail, fail
            picks = []
            for i, seq in enumerate(seqs):
                try:
                    picks += self._choose([seq], logits[i : i + 1], raw[i : i + 1])
                except Exception as e:
                    self._fail(seq, e, events)
                    picks.append(None)
        for seq, pick in zip(seqs, picks, strict=True):
            if pick is None or seq.finish_reason is not None:
                continue
            try:
                events.append((seq, self._advance(seq, *pick)))
            except Exception as e:
                self._fail(seq, e, events)

    def _apply_grammars(self, seqs: list[Sequence], logits: torch.Tensor, events: Events) -> None:
        """Set the tokens each constrained row's grammar forbids to -inf, in place."""
        constrained = [i for i, s in enumerate(seqs) if s.matcher and s.finish_reason is None]
        if not constrained:
            return
        bits = self._bitmask[: len(constrained)]
        for j, i in enumerate(constrained):
            try:
                seqs[i].matcher.fill_bitmask(bits[j])
            except Exception as e:
                self._fail(seqs[i], e, events)
                bits[j] = -1  # allow all; the row is dropped before sampling anyway
        allowed = unpack_bitmask_np(bits, logits.shape[-1])  # (C, V) numpy bool
        for j in np.flatnonzero(~allowed.any(-1)):  # a grammar in error: end the row
            stop_ids = list(seqs[constrained[j]].request.stop_token_ids)
            allowed[j, stop_ids or slice(None)] = True
        if logits.device.type == "cpu":
            # numpy, one thread: torch's bool kernels over a 50k vocabulary cost
            # milliseconds here when the cores are shared.
            rows = logits.numpy()
            for j, i in enumerate(constrained):
                rows[i, ~allowed[j]] = -np.inf
        else:
            mask = torch.from_numpy(np.ascontiguousarray(allowed)).to(self.device)
            logits[constrained] = logits[constrained].masked_fill(~mask, float("-inf"))

    def _choose(
        self, seqs: list[Sequence], logits: torch.Tensor, raw: torch.Tensor
    ) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
        """Draw every row's token in one vectorized op, and its log-probability (from
        the raw logits) when asked. Returns (token, logprob, top logprobs) per row."""
        settings = SamplingTensors.from_params([s.params for s in seqs], logits.device)
        tokens = sample_batch(logits, settings, [s.generator for s in seqs])  # (B,)
        token_list = tokens.tolist()
        if all(s.logprobs is None for s in seqs):
            return [(t, None, None) for t in token_list]
        top_n = max(s.request.logprobs or 0 for s in seqs)
        chosen, top_v, top_i = token_logprobs(raw, tokens, top_n, self.vocab_limit)
        chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()
        picks = []
        for i, (seq, t) in enumerate(zip(seqs, token_list, strict=True)):
            if seq.logprobs is None:
                picks.append((t, None, None))
                continue
            k = seq.request.logprobs or 0
            picks.append((t, chosen[i], list(zip(top_i[i][:k], top_v[i][:k], strict=True))))
        return picks

    def _advance(
        self,
        seq: Sequence,
        token: int,
        logprob: float | None,
        top: list[tuple[int, float]] | None,
    ) -> TokenEvent:
        """Apply one sampled token to a sequence: grammar, stop rules, text, limits."""
        self.tokens_generated += 1
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
        if token in seq.request.stop_token_ids:
            seq.stop_token, seq.finish_reason = token, "stop"
            return TokenEvent(seq.index, None, self._finish_text(seq), finish_reason="stop")
        seq.output.append(token)
        ev = TokenEvent(seq.index, token, logprob=logprob, top_logprobs=top)
        if seq.matcher is not None:
            if not seq.matcher.accept(token) or seq.matcher.done:
                seq.finish_reason = "stop"  # grammar complete (or, defensively, broken)
        if seq.decoder is not None:
            piece = seq.decoder.push(token)
            if seq.stops is not None:
                piece = seq.stops.feed(piece)
                if seq.stops.stopped:
                    seq.finish_reason = "stop"
            ev.text = piece
        if seq.finish_reason is None and len(seq.output) >= seq.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            ev.text += self._finish_text(seq)
            ev.finish_reason = seq.finish_reason
        return ev

    @staticmethod
    def _finish_text(seq: Sequence) -> str:
        """Text held back at the end: an unfinished UTF-8 tail, a partial stop string."""
        tail = seq.decoder.flush() if seq.decoder is not None else ""
        if seq.stops is None:
            return tail
        return (seq.stops.feed(tail) if tail else "") + seq.stops.flush()

    # -- endings ----------------------------------------------------------------------

    def _fail(self, seq: Sequence, error: BaseException, events: Events) -> None:
        """End ``seq``'s whole request with ``error``; its slots return at _release."""
        for s in seq.group:
            if s.finish_reason is None:
                s.finish_reason, s.error = "error", error
                events.append((s, TokenEvent(s.index, None, finish_reason="error", error=error)))
        if any(g is seq.group for g in self.waiting):
            self.waiting = deque(g for g in self.waiting if g is not seq.group)

    def _release(self) -> None:
        done = [s for s in self.running if s.finish_reason is not None]
        for s in done:
            self.free_slots.append(s.slot)
            s.slot = -1
        if done:
            self.running = [s for s in self.running if s.finish_reason is None]
            self.free_slots.sort()

    # -- conveniences -----------------------------------------------------------------

    def generate(self, req: GenerationRequest) -> Iterator[TokenEvent]:
        """Run one request to completion on this thread, yielding its events. Raises the
        request's error if it fails; stopping the iteration early aborts it."""
        out: list[TokenEvent] = []
        seqs = self.add(req, on_event=out.append)
        try:
            while any(s.finish_reason is None for s in seqs):
                self.step()
                for ev in out:
                    if ev.error is not None:
                        raise ev.error
                    yield ev
                out.clear()
        finally:
            self.abort(seqs)  # no-op when finished; frees the slots when abandoned

    def run(self, reqs: list[GenerationRequest]) -> list[list[list[int]]]:
        """Run requests together to completion; returns output ids per request, per
        choice. Raises the first failed request's error after the others finished."""
        groups = [self.add(r) for r in reqs]
        self._run_until_done(groups, stop_on_error=False)
        return [[s.output for s in g] for g in groups]

    def generate_batch(
        self,
        prompts: list[list[int]],
        n: int = 1,
        params: SamplingParams | None = None,
        max_tokens: int | None = None,
        stop_token_ids: set[int] | frozenset[int] | None = None,
    ) -> list[Rollout]:
        """Sample ``n`` continuations of every prompt, all together: prompt-major order
        (prompt 0's n samples, then prompt 1's, ...).

        The n samples of a prompt share one prefill; all sequences decode in the same
        batched steps (continuous batching), at most ``max_seqs`` at once, the rest
        queued. ``n`` above ``max_seqs`` is split into requests of at most ``max_seqs``.
        Seeded ``params`` give sample i the seed ``seed + i`` (for every prompt).
        ``stop_token_ids=None`` stops at the tokenizer's stop tokens; pass an empty set
        to always generate ``max_tokens``. Each :class:`Rollout` carries the log-probs
        of the model's raw logits (see glassbox.infer.rollout)."""
        params = params or SamplingParams()
        stops = self.stop_ids if stop_token_ids is None else frozenset(stop_token_ids)
        if n < 1:
            raise GlassboxError(f"n={n} must be >= 1 samples per prompt.")
        reqs: list[tuple[int, int, GenerationRequest]] = []  # (prompt index, first sample, req)
        for p_i, prompt in enumerate(prompts):
            for start in range(0, n, self.max_seqs):
                seeded = params.seed is not None and start > 0
                p = dataclasses.replace(params, seed=params.seed + start) if seeded else params
                req = GenerationRequest(
                    list(prompt), p, max_tokens, n=min(self.max_seqs, n - start),
                    stop_token_ids=stops, logprobs=0, detokenize=False,
                )  # fmt: skip
                reqs.append((p_i, start, self.prepare(req)))  # all checked before any runs
        groups = [self.add(req, prepared=True) for _, _, req in reqs]
        self._run_until_done(groups, stop_on_error=True)
        return [
            Rollout(
                prompt=list(s.prompt),
                tokens=s.output + ([s.stop_token] if s.stop_token is not None else []),
                logprobs=list(s.logprobs or []),
                finish_reason=s.finish_reason or "length",
                prompt_index=p_i,
                sample_index=start + s.index,
            )
            for (p_i, start, _), group in zip(reqs, groups, strict=True)
            for s in group
        ]

    def _run_until_done(self, groups: list[list[Sequence]], stop_on_error: bool) -> None:
        """Step until every sequence of ``groups`` has finished, then raise the first
        error (``stop_on_error``: as soon as one appears, dropping the rest)."""
        seqs = [s for g in groups for s in g]
        try:
            while True:
                failed = next((s for s in seqs if s.error is not None), None)
                live = any(s.finish_reason is None for s in seqs)
                if failed is not None and (stop_on_error or not live):
                    raise failed.error
                if not live:
                    return
                self.step()
        finally:
            for g in groups:
                self.abort(g)  # no-op for finished groups; never leave slots behind


# ---------------------------------------------------------------------------------------
# The engine on a background thread, for asyncio callers
# ---------------------------------------------------------------------------------------


class QueueFullError(GlassboxError):
    """The waiting queue is full; try again later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine thread is not running (it stopped or crashed); the server is unhealthy
    (HTTP 503), not the request wrong."""


_STOP = object()


class RequestStream:
    """Events of one submitted request, as an async iterator; cancel() aborts it.

    Iterating raises the request's error if the engine failed it."""

    def __init__(self, owner: AsyncEngine, req: GenerationRequest):
        self.owner = owner
        self.request = req
        self.queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.seqs: list[Sequence] = []
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.queued = True  # counted in AsyncEngine.queue_depth (until it gets slots)
        self._open = req.n
        self.loop = asyncio.get_running_loop()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while self._open > 0:
            ev = await self.queue.get()
            if isinstance(ev, BaseException):
                self._open = 0
                raise ev
            if ev.token is not None and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if ev.finish_reason is not None:
                self._open -= 1
            yield ev

    @property
    def finished(self) -> bool:
        return self._open == 0

    def cancel(self) -> None:
        if not self.finished:
            self.owner._commands.put(("abort", self))

    def _deliver(self, items: list) -> None:
        """Hand events (or one exception) to the event loop (any thread)."""
        try:
            self.loop.call_soon_threadsafe(_put_all, self.queue, items)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    """Owns an :class:`Engine` on one thread; asyncio code submits and streams.

    Health, readable from any thread: :attr:`alive` (the engine thread is running),
    :attr:`free_slots`, :attr:`num_waiting`, :attr:`num_running`, :attr:`queue_depth`.
    """

    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine = engine
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # requests submitted but not yet given slots (or ended)
        self._thread: threading.Thread | None = None
        self._running = False
        self._dead = False  # set once the thread has ended; submit refuses from then on
        self.death: BaseException | None = None  # what killed the thread, if anything
        engine.on_admit = self._admitted

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None and self.death is None:  # a crashed engine stays down
            self._dead, self._running = False, True
            self._thread = threading.Thread(target=self._loop, name="glassbox-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._running = False
            self._commands.put((_STOP, None))
            self._thread.join(timeout=10)
            self._thread = None

    # -- state, read from other threads -------------------------------------------------

    @property
    def alive(self) -> bool:
        """The engine thread is running and accepting work."""
        t = self._thread
        return t is not None and t.is_alive() and not self._dead

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not yet given slots (nor ended)."""
        return self._queued

    @property
    def num_running(self) -> int:
        """Sequences holding a slot."""
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        """Requests inside the engine waiting for slots (a part of queue_depth)."""
        return self.engine.num_waiting

    @property
    def free_slots(self) -> int:
        return self.engine.num_free_slots

    # -- submission (event-loop thread) -----------------------------------------------

    def submit(self, req: GenerationRequest) -> RequestStream:
        """Validate and enqueue a request. Raises GlassboxError for bad input,
        QueueFullError when ``max_queue`` requests are already waiting, and
        EngineDeadError when the engine thread has ended."""
        self.engine.prepare(req)  # pure validation: safe to run off the engine thread
        stream = RequestStream(self, req)
        with self._lock:  # the engine thread's death handler takes this lock too
            if self._dead:
                raise EngineDeadError(self._dead_message())
            if self._queued >= self.max_queue:
                raise QueueFullError(
                    f"The server is busy: {self._queued} requests are waiting (limit "
                    f"{self.max_queue}). Retry shortly."
                )
            self._queued += 1
            self._commands.put(("add", stream))
        return stream

    def _dequeue(self, stream: RequestStream) -> None:
        """``stream`` stops counting as queued (admitted, failed or aborted); idempotent,
        so the count stays exact whatever path a request takes."""
        with self._lock:
            if stream.queued:
                stream.queued = False
                self._queued -= 1

    def _admitted(self, seqs: list[Sequence]) -> None:
        if seqs and isinstance(seqs[0].owner, RequestStream):
            self._dequeue(seqs[0].owner)

    def _dead_message(self) -> str:
        why = f": {self.death!r}" if self.death is not None else " (stopped)"
        return f"The engine thread is not running{why}. Restart the server."

    # -- the engine thread ------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._running:
                if not self._take_commands(block=not self.engine.has_work):
                    return
                if self.engine.has_work:
                    self._step()
        except BaseException as e:  # a bug in this loop: nothing can continue safely
            self.death = e
        finally:
            self._shut_down()

    def _take_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting up to 0.5 s for one when idle); False on stop."""
        try:
            while True:
                cmd, stream = self._commands.get(block=block, timeout=0.5 if block else None)
                block = False
                if cmd is _STOP:
                    return False
                self._handle(cmd, stream)
        except queue.Empty:
            return True

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # not attributable to one request: fail those in flight
            events = self.engine.fail_all(e)
        self._dispatch(events)

    def _dispatch(self, events: Events) -> None:
        by_stream: dict[int, tuple[RequestStream, list[TokenEvent]]] = {}
        for seq, ev in events:
            stream = seq.owner
            by_stream.setdefault(id(stream), (stream, []))[1].append(ev)
        for stream, evs in by_stream.values():
            error = next((ev.error for ev in evs if ev.error is not None), None)
            if error is not None:
                self._dequeue(stream)  # it may have failed before reaching a slot
                stream._deliver([error])
            else:
                stream._deliver(evs)

    def _handle(self, cmd: str, stream: RequestStream) -> None:
        if cmd == "add":
            try:
                stream.seqs = self.engine.add(stream.request, prepared=True, owner=stream)
            except Exception as e:
                self._dequeue(stream)
                stream._deliver([e])
        elif cmd == "abort" and stream.seqs:
            live = [s for s in stream.seqs if s.finish_reason is None]
            self.engine.abort(stream.seqs)
            self._dequeue(stream)  # it may never have reached a slot
            # End the stream for anyone still iterating it.
            evs = [TokenEvent(s.index, None, finish_reason="abort") for s in live]
            if evs:
                stream._deliver(evs)

    def _shut_down(self) -> None:
        """The thread is ending: refuse new work and fail every request still pending
        (in the engine or not yet handed to it), so no client waits forever."""
        with self._lock:
            self._dead = True
        error = EngineDeadError(self._dead_message())
        if self.death is not None:
            error.__cause__ = self.death
        pending = {id(s.owner): s.owner for s in self.engine.running}
        for group in self.engine.waiting:
            pending.update({id(s.owner): s.owner for s in group})
        try:
            self.engine.fail_all(error)
        except Exception:  # pragma: no cover - best effort; the streams still hear of it
            pass
        while True:
            try:
                cmd, stream = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd == "add":
                pending[id(stream)] = stream
        for stream in pending.values():
            if isinstance(stream, RequestStream):
                self._dequeue(stream)
                stream._deliver([error])


def _put_all(q: asyncio.Queue, items: list) -> None:
    for item in items:
        q.put_nowait(item)
