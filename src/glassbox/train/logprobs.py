"""Per-token log-probabilities and masked means: what DPO, PPO and GRPO compute with.

Shapes: N sequences, L tokens, V vocabulary. Position t of a result is about token
``ids[:, t + 1]`` given ``ids[:, : t + 1]`` (the first token has no prediction), so a
mask over ``ids`` is shifted with ``mask[:, 1:]`` to line up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glassbox.device import autocast


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ...) from logits (N, L, V) over ids (N, L) -> (N, L-1), fp32.

    Uses cross-entropy per token, which never materializes a (N, L, V) log-softmax.
    """
    logits = logits[:, :-1].float()  # (N, L-1, V)
    targets = ids[:, 1:]  # (N, L-1)
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return -nll.view(targets.shape)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution (N, L-1), in nats."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's per-token log-probabilities of ``ids`` (N, L) -> (N, L-1).

    Right padding needs no attention mask: a causal model never looks ahead, so the
    padding after a sequence cannot change its tokens' scores (mask them out after).
    """
    with autocast(ids.device):
        logits = model(ids)  # (N, L, V)
    return gather_logprobs(logits, ids)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is true (over everything, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is true along ``dim`` (a sequence's log-probability)."""
    return (x * mask.to(x.dtype)).sum(dim)
