"""Logits -> next token. The one sampling module used by generate, the server, RL
rollouts and the playground.

Order of operations for each row of logits (V,):
    logit_bias -> repetition/presence/frequency penalties -> temperature
    -> top-k -> top-p -> min-p -> softmax -> draw (or argmax when temperature == 0)
"""

from __future__ import annotations

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


def filter_logits(
    logits: torch.Tensor,  # (B, V)
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """Scale by temperature and set filtered-out tokens to -inf. Returns (B, V)."""
    logits = logits.float() / max(temperature, 1e-5)
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # keep the smallest prefix reaching p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        floor = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,  # (B, V) raw next-token logits
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row. Returns (B,) token ids."""
    if params.greedy:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    probs = filtered.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------
# Batches of independent sequences (the engine) and log-probabilities
# ---------------------------------------------------------------------------------------


def uses_history(params: SamplingParams) -> bool:
    """Whether the penalties need the tokens seen so far (logit_bias alone does not)."""
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private RNG for one sequence, so a seeded request draws the same tokens whether
    it runs alone or batched with others; ``None`` uses torch's global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def sample_rows(
    logits: torch.Tensor,  # (B, V) logits after penalties and masks
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Draw one token per row, each row with its own parameters and RNG. Returns (B,).

    Every row is sampled exactly as :func:`sample` would sample it alone, so batching
    never changes a sequence's tokens (given the same logits).
    """
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        out[i] = sample(logits[i : i + 1], p, g)[0]
    return out


def token_logprobs(
    logits: torch.Tensor,  # (B, V)
    tokens: torch.Tensor,  # (B,) chosen tokens
    top_n: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens and of the ``top_n`` most likely ones.

    Returns (chosen (B,), top values (B, top_n), top ids (B, top_n)), computed with a
    log-softmax over ``logits`` (before temperature and top-k/top-p/min-p filtering).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logp.gather(-1, tokens.view(-1, 1)).squeeze(-1)  # (B,)
    if top_n > 0:
        top = torch.topk(logp, min(top_n, logp.shape[-1]), dim=-1)
        return chosen, top.values, top.indices
    empty = logp.new_empty(logp.shape[0], 0)
    return chosen, empty, empty.long()
