"""Speculative decoding, single stream: a cheap proposer guesses k tokens, the target
model checks all of them in ONE forward pass, and the standard acceptance rule keeps
the output distribution exactly the target's.

Proposers:
    - a draft model (any smaller run with the same tokenizer), sampling from its own
      processed distribution q;
    - prompt lookup: the tokens that followed the last occurrence of the context's
      final n-gram (n = N, N-1, ..., 1), a deterministic proposal (q is one-hot).

One round, with the context ``ctx`` (the target's cache holds ctx[:-1]):

    propose d_1..d_k (and q_1..q_k)
    target forward of [ctx[-1], d_1..d_k]  ->  p_1..p_{k+1}       (one (1, k+1) pass)
    for i in 1..k: accept d_i with probability min(1, p_i(d_i) / q_i(d_i));
                   on the first rejection draw from norm(max(0, p_i - q_i)) and stop
    all accepted: draw a bonus token from p_{k+1}

so every round emits between 1 and k + 1 tokens, each distributed as the target would
sample it (Leviathan et al. 2023; Chen et al. 2023). p and q are the *processed*
distributions: logit_bias, penalties (over each position's own history), temperature,
top-k, top-p, min-p, as the engine applies them. Greedy (temperature 0) reduces to
"accept while the proposal is the target's argmax", so the tokens are exactly the
target's greedy tokens. A rejected tail needs no cache rollback: positions are
rewritten before they are read again, and the attention mask hides positions past the
one being decoded.

This is a single-stream mode (batch size 1, its own KV caches), not part of the
continuous-batching engine; it does not do grammar-constrained requests or stop
strings at the token level (stop strings are cut from the text by the caller). With
sampling, the tokens are distributed as the target's but are not the same tokens a
seeded plain decode draws (the random numbers are used differently).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from glassbox.errors import GlassboxError
from glassbox.infer.detokenize import IncrementalDetokenizer
from glassbox.infer.generate import Generation
from glassbox.infer.rules import StopStrings, fit_context, stop_token_ids
from glassbox.infer.sampling import (
    SamplingParams,
    apply_penalties,
    filter_logits,
    make_generator,
)
from glassbox.model import KVCache, Transformer
from glassbox.tokenizer import Tokenizer


@dataclass
class SpeculativeStats:
    """What one speculative generation did."""

    proposed: int = 0  # draft tokens offered to the target
    accepted: int = 0  # of those, accepted
    rounds: int = 0  # target forward passes (after the prompt)
    emitted: int = 0  # tokens produced (accepted + one correction or bonus per round)
    seconds: float = 0.0  # wall time, prompt prefill included

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens per target forward (plain decoding gives 1)."""
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.emitted / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"speculative: acceptance {self.acceptance_rate:.1%} ({self.accepted}/"
            f"{self.proposed}), {self.tokens_per_round:.2f} tokens per target pass, "
            f"{self.tokens_per_second:.1f} tok/s"
        )


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, target_path="", draft_path=""):
    """Raise GlassboxError unless the two tokenizers have the same vocabulary and merges."""
    if target.hf.to_str() != draft.hf.to_str():
        raise GlassboxError(
            f"The draft {draft_path or 'model'} has a different tokenizer than the target "
            f"{target_path or 'model'} (vocabulary or merges differ); a draft must share the "
            "target's tokenizer.json (train it with --tokenizer pointing at the target's)."
        )


# ---------------------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------------------


def processed_probs(
    logits: torch.Tensor,  # (T, V) raw logits for T consecutive positions
    history: list[int],  # tokens before the first of those positions
    proposals: list[int],  # the tokens at those positions (T - 1 or T of them)
    params: SamplingParams,
    vocab_limit: int,
) -> torch.Tensor:
    """The distribution each position samples from, after every processor, the way the
    engine processes a row: (T, vocab_limit) float. Greedy: one-hot at the argmax.
    Row i's penalties see ``history + proposals[:i]``."""
    logits = logits[:, :vocab_limit].float()
    if params.logit_bias or _uses_history(params):
        rows = []
        for i in range(logits.shape[0]):
            hist = torch.tensor(history + proposals[:i], dtype=torch.long, device=logits.device)
            rows.append(apply_penalties(logits[i], hist, params))
        logits = torch.stack(rows)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), vocab_limit).float()
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    return filtered.softmax(-1)


def _uses_history(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(
        params.presence_penalty or params.frequency_penalty
    )


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from ``probs`` (V,) (a zero-probability token is never drawn)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def accept_tokens(
    proposals: list[int],  # d_1..d_k
    q: torch.Tensor | None,  # (k, V) the proposer's distributions; None = deterministic
    p: torch.Tensor,  # (k + 1, V) the target's distributions
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """The acceptance rule. Returns (emitted tokens, number of proposals accepted): the
    accepted prefix, then one token drawn from the residual or (all accepted) from
    p_{k+1}. ``q=None`` is a deterministic proposal (one-hot q)."""
    out: list[int] = []
    for i, d in enumerate(proposals):
        p_d = float(p[i, d])
        q_d = 1.0 if q is None else float(q[i, d])
        u = float(torch.rand(1, generator=generator))
        if q_d > 0 and u < p_d / q_d:  # accept with probability min(1, p/q)
            out.append(d)
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p will do
            residual = p[i]
        out.append(_draw(residual, generator))
        return out, i
    out.append(_draw(p[len(proposals)], generator))
    return out, len(proposals)


def lookup_proposals(ctx: list[int], max_ngram: int, k: int) -> list[int]:
    """Prompt lookup: find earlier occurrences of the context's last n tokens (n from
    ``max_ngram`` down to 1) and propose up to k tokens that followed one: the latest
    occurrence with k tokens after it, else the one with the most (an occurrence just
    before the end, as in a run of repeats, leaves only a few)."""
    for n in range(min(max_ngram, len(ctx) - 1), 0, -1):
        tail, best = ctx[-n:], []
        for start in range(len(ctx) - n - 1, -1, -1):
            if ctx[start : start + n] == tail:
                follow = ctx[start + n : start + n + k]
                if len(follow) > len(best):
                    best = follow
                if len(best) == k:
                    break
        if best:
            return best
    return []


# ---------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------


class _Cached:
    """A model with a one-row KV cache that holds ``valid`` positions of a context."""

    def __init__(self, model: Transformer, max_len: int):
        self.model = model
        self.device = model.embed.weight.device
        self.cache = KVCache(model.cfg, 1, max_len, self.device, model.embed.weight.dtype)
        self.valid = 0

    @torch.inference_mode()
    def feed(self, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        """Run ``tokens`` at positions valid.. ; returns logits (T, V), or the last
        position's (1, V)."""
        start, T = self.valid, len(tokens)
        idx = torch.tensor([tokens], device=self.device)  # (1, T)
        pos = torch.arange(start, start + T, device=self.device).view(1, T)
        logits = self.model(idx, self.cache, pos, None, last_only=not all_logits)[0]
        self.valid += T
        return logits  # (T, V) or (1, V)


class SpeculativeDecoder:
    """Single-stream speculative decoding of ``target`` with a ``draft`` model or
    prompt lookup (``prompt_lookup`` = the longest n-gram to match; 0 = off)."""

    def __init__(
        self,
        target: Transformer,
        tokenizer: Tokenizer | None = None,
        draft: Transformer | None = None,
        prompt_lookup: int = 0,
        k: int = 4,
    ):
        if (draft is None) == (prompt_lookup <= 0):
            raise GlassboxError(
                "Speculative decoding needs exactly one proposer: a draft model or "
                f"prompt lookup (got draft={'yes' if draft is not None else 'none'}, "
                f"prompt_lookup={prompt_lookup})."
            )
        if not 1 <= k <= 32:
            raise GlassboxError(f"num_speculative={k} is out of range; use 1..32 tokens.")
        if draft is not None and draft.cfg.vocab_size < (
            tokenizer.vocab_size if tokenizer else target.cfg.vocab_size
        ):
            raise GlassboxError(
                f"The draft's vocab_size {draft.cfg.vocab_size} is smaller than the target's "
                "tokenizer; use a draft trained with the target's tokenizer."
            )
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.prompt_lookup, self.k = prompt_lookup, k
        self.vocab_limit = tokenizer.vocab_size if tokenizer else target.cfg.vocab_size
        if draft is not None:
            self.vocab_limit = min(self.vocab_limit, draft.cfg.vocab_size)
        self.stats = SpeculativeStats()

    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_tokens: int,
        stop_ids: frozenset[int] = frozenset(),
    ) -> Iterator[int]:
        """Yield generated token ids (a stop token ends it and is not yielded). The
        prompt + max_tokens must fit the target's (and the draft's) context."""
        params.validate(self.target.cfg.vocab_size)
        if not prompt:
            raise GlassboxError("Speculative decoding needs a prompt of at least one token.")
        max_len = len(prompt) + max_tokens
        for m in (self.target, self.draft):
            if m is not None and max_len > m.cfg.context_length:
                raise GlassboxError(
                    f"The prompt ({len(prompt)} tokens) + max_tokens={max_tokens} exceed a "
                    f"model's context of {m.cfg.context_length} tokens; lower max_tokens."
                )
        self.stats = SpeculativeStats()
        t0 = time.perf_counter()
        gen = make_generator(params.seed, self.target.embed.weight.device)
        target = _Cached(self.target, max_len)
        draft = _Cached(self.draft, max_len) if self.draft is not None else None
        if len(prompt) > 1:  # invariant: the caches hold ctx[:-1]
            target.feed(prompt[:-1])
        ctx, produced = list(prompt), 0
        try:
            while produced < max_tokens:
                k = min(self.k, max_tokens - produced - 1)  # the round adds <= k + 1 tokens
                proposals, q = self._propose(draft, ctx, params, k, gen)
                p_logits = target.feed([ctx[-1], *proposals], all_logits=True)  # (k+1, V)
                p = processed_probs(p_logits, ctx, proposals, params, self.vocab_limit)
                out, n_acc = accept_tokens(proposals, q, p, gen)
                self._account(len(proposals), n_acc, len(out))
                target.valid = len(ctx) + n_acc  # = len(new ctx) - 1
                if draft is not None:
                    draft.valid = min(draft.valid, len(ctx) + n_acc)
                for tok in out:
                    if tok in stop_ids:
                        return
                    ctx.append(tok)
                    produced += 1
                    self.stats.seconds = time.perf_counter() - t0
                    yield tok
        finally:
            self.stats.seconds = time.perf_counter() - t0

    def _account(self, proposed: int, accepted: int, emitted: int) -> None:
        s = self.stats
        s.proposed, s.accepted = s.proposed + proposed, s.accepted + accepted
        s.rounds, s.emitted = s.rounds + 1, s.emitted + emitted

    def _propose(
        self,
        draft: _Cached | None,
        ctx: list[int],
        params: SamplingParams,
        k: int,
        gen: torch.Generator | None,
    ) -> tuple[list[int], torch.Tensor | None]:
        """k proposals and their distributions q (k, V) (None for prompt lookup)."""
        if k <= 0:
            return [], None
        if draft is None:
            return lookup_proposals(ctx, self.prompt_lookup, k), None
        proposals: list[int] = []
        qs: list[torch.Tensor] = []
        logits = draft.feed(ctx[draft.valid :])  # catch up: the tokens it has not seen
        for i in range(k):
            q = processed_probs(logits[-1:], ctx + proposals, [], params, self.vocab_limit)[0]
            d = int(q.argmax()) if params.greedy else _draw(q, gen)
            proposals.append(d)
            qs.append(q)
            if i < k - 1:
                logits = draft.feed([d])
        return proposals, torch.stack(qs)


def speculative_generate_text(
    decoder: SpeculativeDecoder,
    prompt: list[int],
    max_new_tokens: int | None = None,
    params: SamplingParams | None = None,
    stop: list[str] | None = None,
    truncate: bool = False,
    on_text: Callable[[str], object] | None = None,
) -> Generation:
    """:func:`glassbox.infer.generate.generate_text` through a speculative decoder:
    stop tokens, stop strings and streamed text the same way."""
    tok = decoder.tokenizer
    if tok is None:
        raise GlassboxError("speculative_generate_text needs the decoder's tokenizer.")
    params = (params or SamplingParams()).validate(decoder.target.cfg.vocab_size)
    ctx_len = decoder.target.cfg.context_length
    if decoder.draft is not None:
        ctx_len = min(ctx_len, decoder.draft.cfg.context_length)
    keep, max_new = fit_context(len(prompt), max_new_tokens, ctx_len, truncate)
    ids = list(prompt)[len(prompt) - keep :]
    detok, stops = IncrementalDetokenizer(tok), StopStrings(stop) if stop else None
    pieces, out_ids, finish = [], [], "stop"

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text:
                on_text(piece)

    for t in decoder.generate(ids, params, max_new, stop_token_ids(tok)):
        out_ids.append(t)
        piece = detok.push(t)
        if stops is not None:
            piece = stops.feed(piece)
        emit(piece)
        if stops is not None and stops.stopped:
            break
    else:
        finish = "length" if len(out_ids) >= max_new else "stop"
    tail = detok.flush()
    if stops is not None:
        tail = (stops.feed(tail) if tail and not stops.stopped else "") + stops.flush()
    emit(tail)
    return Generation("".join(pieces), out_ids, finish, len(ids))
