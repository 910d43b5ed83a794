"""Logits -> next token. The one sampling module: the engine (and so generate, chat,
the server and trainers' batches) samples here.

Order of operations for each row of logits (V,):
    logit_bias -> repetition/presence/frequency penalties -> temperature
    -> top-k -> top-p -> min-p -> softmax -> draw (or argmax when temperature == 0)

Rows are sampled together: temperature, top-k, top-p and min-p are per-row tensors
(:class:`SamplingTensors`) applied in one batched pass, and the draw is one vectorized
inverse-CDF step. Only the random numbers are per row: each row takes ONE uniform from
its own generator, so a seeded sequence draws the same tokens alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from glassbox.errors import GlassboxError


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise GlassboxError naming the parameter and its valid range."""
        ranges = [
            ("temperature", self.temperature, 0.0, 100.0),
            ("top_p", self.top_p, 0.0, 1.0),
            ("min_p", self.min_p, 0.0, 1.0),
            ("repetition_penalty", self.repetition_penalty, 0.01, 100.0),
            ("presence_penalty", self.presence_penalty, -2.0, 2.0),
            ("frequency_penalty", self.frequency_penalty, -2.0, 2.0),
        ]
        for name, value, lo, hi in ranges:
            if not (lo <= value <= hi):
                raise GlassboxError(f"{name}={value} is out of range; use a value in [{lo}, {hi}].")
        if self.top_p == 0.0:
            raise GlassboxError("top_p=0 keeps no tokens; use a value in (0, 1].")
        if self.top_k < 0:
            raise GlassboxError(f"top_k={self.top_k} must be >= 0 (0 turns it off).")
        for tok, bias in self.logit_bias.items():
            if vocab_size is not None and not (0 <= int(tok) < vocab_size):
                raise GlassboxError(
                    f"logit_bias token id {tok} is out of range; use 0..{vocab_size - 1}."
                )
            if not (-100.0 <= bias <= 100.0):
                raise GlassboxError(
                    f"logit_bias value {bias} for token {tok} is outside [-100, 100]."
                )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---------------------------------------------------------------------------------------
# Penalties (per row: they depend on each sequence's own history)
# ---------------------------------------------------------------------------------------


def apply_penalties(
    logits: torch.Tensor,  # (V,)
    prev_ids: torch.Tensor,  # (N,) tokens seen so far (prompt + output)
    params: SamplingParams,
) -> torch.Tensor:
    """logit_bias, then repetition (CTRL-style), presence and frequency penalties."""
    if params.logit_bias:
        ids = torch.tensor([int(k) for k in params.logit_bias], device=logits.device)
        logits = logits.clone()
        logits[ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device)
    if prev_ids.numel() == 0:
        return logits
    if params.repetition_penalty != 1.0:
        logits = logits.clone()
        seen = torch.unique(prev_ids)
        vals = logits[seen]
        logits[seen] = torch.where(
            vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty
        )
    if params.presence_penalty or params.frequency_penalty:
        counts = torch.bincount(prev_ids, minlength=logits.shape[-1])[: logits.shape[-1]]
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    return logits


def uses_history(params: SamplingParams) -> bool:
    """Whether the penalties need the tokens seen so far (logit_bias alone does not)."""
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


# ---------------------------------------------------------------------------------------
# Per-row settings as tensors, and the batched filter
# ---------------------------------------------------------------------------------------


@dataclass
class SamplingTensors:
    """The filtering settings of B rows, one tensor each, so one op serves the batch."""

    temperature: torch.Tensor  # (B,) float, 0 = greedy
    top_k: torch.Tensor  # (B,) long, 0 = off
    top_p: torch.Tensor  # (B,) float, 1 = off
    min_p: torch.Tensor  # (B,) float, 0 = off

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu"
    ) -> SamplingTensors:
        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=col([p.temperature for p in params], torch.float32),
            top_k=col([p.top_k for p in params], torch.long),
            top_p=col([p.top_p for p in params], torch.float32),
            min_p=col([p.min_p for p in params], torch.float32),
        )

    @property
    def greedy(self) -> torch.Tensor:  # (B,) bool
        return self.temperature == 0.0


def _as_rows(value: float | torch.Tensor, B: int, device, dtype) -> torch.Tensor:
    """A scalar or a (B,) tensor -> a (B, 1) column."""
    return torch.as_tensor(value, dtype=dtype, device=device).expand(B).reshape(B, 1)


def filter_logits(
    logits: torch.Tensor,  # (B, V)
    temperature: float | torch.Tensor = 1.0,  # scalar or (B,)
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Scale by temperature and set filtered-out tokens to -inf, every row with its own
    settings, in one batched pass. Returns float (B, V).

    top-k keeps the k highest logits (ties with the k-th are kept); top-p then keeps the
    smallest most-likely set whose mass (renormalised over the top-k survivors) reaches p;
    min-p keeps tokens at least ``min_p`` times as likely as the most likely one.
    """
    B, V = logits.shape
    dev = logits.device
    temp = _as_rows(temperature, B, dev, torch.float32).clamp_min(1e-5)  # (B, 1); 0 = greedy
    k = _as_rows(top_k, B, dev, torch.long)
    p = _as_rows(top_p, B, dev, torch.float32)
    mp = _as_rows(min_p, B, dev, torch.float32)
    logits = logits.float() / temp  # (B, V)
    if bool(((k > 0) & (k < V)).any()) or bool((p < 1.0).any()):
        logits = _top_k_top_p(logits, k, p)
    if bool((mp > 0.0).any()):
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed,
        # and rows with min_p == 0 (log = -inf) keep everything.
        floor = logits.max(dim=-1, keepdim=True).values + mp.log()  # (B, 1)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def _top_k_top_p(
    logits: torch.Tensor,  # (B, V) temperature-scaled
    k: torch.Tensor,  # (B, 1) long, 0 = off
    p: torch.Tensor,  # (B, 1) float, 1 = off
) -> torch.Tensor:
    """top-k then top-p, both from one descending sort of each row."""
    V = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    # top-k: keep logits >= the k-th largest (rows with k off use the smallest logit)
    kth_index = torch.where((k > 0) & (k < V), k - 1, V - 1)  # (B, 1)
    kth = sorted_logits.gather(-1, kth_index)  # (B, 1)
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    # top-p over the top-k survivors: drop a token once the strictly more likely ones
    # already hold p of the mass (so the smallest set reaching p is kept)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop = (mass_before >= p) & (p < 1.0)  # rows with top_p == 1 never drop on rounding
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private RNG for one sequence, so a seeded request draws the same tokens whether
    it runs alone or batched with others; ``None`` uses torch's global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def draw_uniforms(
    generators: Sequence[torch.Generator | None], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One uniform in [0, 1) per row: from the row's own generator when it has one (its
    draws never depend on the other rows), from torch's global RNG otherwise. (B,)"""
    u = torch.empty(len(generators), device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), device=device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, generator=g, device=device)[0]
    return u


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw from each row of ``probs`` (B, V) with one uniform per row ``u`` (B,).

    The token is the first index whose cumulative mass exceeds ``u`` times the row's
    total, so a zero-probability token is never chosen. Returns (B,) long.
    """
    cdf = probs.cumsum(-1)  # (B, V), in vocabulary order: independent of other rows
    total = cdf[:, -1:]  # (B, 1)
    if not bool(torch.isfinite(total).all()):  # NaN logits, or every token filtered out
        raise ValueError("A row has no valid sampling distribution (NaN or all -inf logits).")
    # u * total can round up to total; stay strictly below it so the index is in range
    x = torch.minimum(u.view(-1, 1).to(cdf.dtype) * total, total.nextafter(total.new_zeros(())))
    idx = torch.searchsorted(cdf, x, right=True)  # (B, 1)
    return idx.clamp_max(probs.shape[-1] - 1).squeeze(-1)


def sample_batch(
    logits: torch.Tensor,  # (B, V) logits after penalties and masks
    settings: SamplingTensors,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Draw one token per row with per-row settings, all rows in one vectorized pass.
    Greedy rows (temperature 0) take the argmax. Returns (B,) long."""
    if bool(torch.isnan(logits).any()):  # a row's fault: the engine retries row by row
        raise ValueError("NaN in the logits: the model's output is broken for this row.")
    greedy = settings.greedy
    n_greedy = int(greedy.sum())
    if n_greedy == len(greedy):
        return logits.argmax(dim=-1)
    filtered = filter_logits(
        logits, settings.temperature, settings.top_k, settings.top_p, settings.min_p
    )
    drawn = inverse_cdf(filtered.softmax(-1), draw_uniforms(generators, logits.device))
    if n_greedy == 0:  # an all-sampling batch (rollouts) skips the argmax pass
        return drawn
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def sample_rows(
    logits: torch.Tensor,  # (B, V)
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Draw one token per row, each row with its own parameters and RNG. Returns (B,)."""
    return sample_batch(logits, SamplingTensors.from_params(params, logits.device), generators)


def sample(
    logits: torch.Tensor,  # (B, V) raw next-token logits
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row, every row with the same parameters. Returns (B,) ids.
    With a generator, row i takes the generator's i-th uniform."""
    B = logits.shape[0]
    if params.greedy:
        return logits.argmax(dim=-1)
    u = torch.rand(B, generator=generator, device=logits.device)
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    return inverse_cdf(filtered.softmax(-1), u)


# ---------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------


def token_logprobs(
    logits: torch.Tensor,  # (B, V)
    tokens: torch.Tensor,  # (B,) chosen tokens
    top_n: int = 0,
    vocab_limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens and of the ``top_n`` most likely ones.

    Returns (chosen (B,), top values (B, top_n), top ids (B, top_n)), computed with a
    log-softmax over ``logits`` (the engine passes the model's raw logits: before
    penalties, masks, temperature and top-k/top-p/min-p filtering). The top ids are
    searched below ``vocab_limit`` only (padding rows of the embedding are not tokens).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logp.gather(-1, tokens.view(-1, 1)).squeeze(-1)  # (B,)
    if top_n > 0:
        real = logp[:, :vocab_limit]  # (B, vocab_limit)
        top = torch.topk(real, min(top_n, real.shape[-1]), dim=-1)
        return chosen, top.values, top.indices
    empty = logp.new_empty(logp.shape[0], 0)
    return chosen, empty, empty.long()
