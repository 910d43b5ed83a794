"""Rollouts for trainers: what :meth:`Engine.generate_batch` returns, and the padded
tensors a policy-gradient step needs.

Log-probabilities are those of the model's raw logits: ``logprobs[i]`` is
``log_softmax(model(prompt + tokens[:i])[-1])[tokens[i]]``, before temperature,
top-k/top-p/min-p, penalties and masks, i.e. exactly what a full forward pass of the
same model over the finished sequence gives (up to float rounding). So a trainer's
"old" log-probabilities can come straight from the rollout, without a second pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """One sampled continuation of one prompt."""

    prompt: list[int]
    tokens: list[int]  # generated ids, INCLUDING the stop token that ended the sequence
    logprobs: list[float]  # one per generated token, raw-logit log-softmax (see module doc)
    finish_reason: str  # "stop" (a stop token, string or grammar) or "length"
    prompt_index: int = 0  # which prompt of the batch
    sample_index: int = 0  # which of its n samples

    @property
    def ids(self) -> list[int]:
        """prompt + generated tokens."""
        return self.prompt + self.tokens

    @property
    def mask(self) -> list[bool]:
        """Over :attr:`ids`: True at generated positions (the tokens a trainer credits)."""
        return [False] * len(self.prompt) + [True] * len(self.tokens)


@dataclass
class RolloutBatch:
    """Rollouts right-padded into tensors. Shapes: N sequences, L the longest prompt +
    completion. Position t of ``logprobs`` is the log-probability of ``input_ids[:, t]``
    given the tokens before it, so a trainer compares it with
    ``log_softmax(model(input_ids)[:, :-1]).gather(-1, input_ids[:, 1:, None])`` at
    ``completion_mask[:, 1:]``."""

    input_ids: torch.Tensor  # (N, L) long, padded with pad_id
    attention_mask: torch.Tensor  # (N, L) bool, True at real tokens
    completion_mask: torch.Tensor  # (N, L) bool, True at generated tokens
    logprobs: torch.Tensor  # (N, L) float32, 0 outside the completion


def collate_rollouts(
    rollouts: Sequence[Rollout], pad_id: int = 0, device: torch.device | str = "cpu"
) -> RolloutBatch:
    """Pad rollouts into a :class:`RolloutBatch` (right padding)."""
    N = len(rollouts)
    L = max((len(r.prompt) + len(r.tokens) for r in rollouts), default=0)
    input_ids = torch.full((N, L), pad_id, dtype=torch.long)
    attention = torch.zeros(N, L, dtype=torch.bool)
    completion = torch.zeros(N, L, dtype=torch.bool)
    logprobs = torch.zeros(N, L, dtype=torch.float32)
    for i, r in enumerate(rollouts):
        P, C = len(r.prompt), len(r.tokens)
        input_ids[i, : P + C] = torch.tensor(r.ids, dtype=torch.long)
        attention[i, : P + C] = True
        completion[i, P : P + C] = True
        logprobs[i, P : P + C] = torch.tensor(r.logprobs, dtype=torch.float32)
    return RolloutBatch(
        input_ids.to(device), attention.to(device), completion.to(device), logprobs.to(device)
    )
