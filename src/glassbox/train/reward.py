"""Reward model: a transformer body with a scalar head, trained on preference pairs.

    pairs (prompt, chosen, rejected) -> 2N right-padded rows (chosen first)
    -> body.hidden (2N, L, C) -> the hidden state of each row's last real token
    -> head Linear(C, 1) -> rewards r (2N,) -> r_chosen (N,), r_rejected (N,)
    -> Bradley-Terry loss  -log sigmoid(r_chosen - r_rejected - margin)
       (+ centering: coef * mean((r_chosen + r_rejected)^2), keeps rewards near 0)
    -> AdamW; held-out pairwise accuracy (r_chosen > r_rejected) and mean margin

The body starts from the ``--base`` language model (usually an SFT run); its LM head is
dropped (a reward model predicts no tokens). The checkpoint is config.json with
``"architecture": "reward"``, model.safetensors (``body.*`` and ``head.*``) and the
tokenizer, so ``load_checkpoint(dir).model(ids, attention_mask)`` gives rewards (PPO
and GRPO read it that way) and ``generate``/``serve`` refuse it by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.checkpoint import Loaded, load_weights, register_loader
from glassbox.config import ModelConfig
from glassbox.data.preferences import (
    PairBatch,
    PreferenceDataConfig,
    batches,
    chat_completion_ids,
    load_preference_sets,
    sample_batch,
)
from glassbox.device import autocast
from glassbox.errors import GlassboxError
from glassbox.model import Transformer, read_config_and_tokenizer
from glassbox.train.finetune import (
    FinetuneConfig,
    load_start,
    open_stage,
    restore_stage,
    save_stage,
    train_loop,
)
from glassbox.train.optim import build_optimizers

# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A scalar score per sequence: ``forward(ids (N, L), attention_mask (N, L)) -> (N,)``.

    ``body`` is a :class:`~glassbox.model.Transformer` without its LM head; ``head``
    reads the final normalized hidden state at each row's last real token (rows are
    right-padded; the mask marks real tokens).
    """

    def __init__(self, cfg: ModelConfig, body: Transformer | None = None):
        super().__init__()
        self.cfg = cfg
        self.body = body if body is not None else Transformer(cfg)
        self.body.lm_head = nn.Identity()  # no token prediction; hidden() is what we read
        self.head = nn.Linear(cfg.d_model, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(cfg.d_model + 1))
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_language_model(cls, model: Transformer) -> RewardModel:
        """A reward model whose body is ``model`` (its weights, in place) and a new head."""
        return cls(model.cfg, body=model)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (N,) float32 of right-padded rows ``ids`` (N, L)."""
        with autocast(ids.device):
            h = self.body.hidden(ids)  # (N, L, C)
        last = last_token_index(attention_mask)  # (N,)
        h_last = h[torch.arange(ids.shape[0], device=ids.device), last]  # (N, C)
        return self.head(h_last.float()).squeeze(-1)  # (N,)

    @torch.no_grad()
    def score_texts(
        self, tokenizer, prompts: list[list[dict]], completions: list[str]
    ) -> torch.Tensor:
        """Rewards (N,) of assistant ``completions`` to chat ``prompts`` (message lists),
        tokenized exactly as training pairs are (prompt cut from the left to fit the
        context). For PPO/GRPO rollouts already in ids, call the model directly."""
        if len(prompts) != len(completions):
            raise GlassboxError(
                f"score_texts got {len(prompts)} prompts and {len(completions)} completions; "
                "pass one completion per prompt."
            )
        rows = []
        for i, (prompt, text) in enumerate(zip(prompts, completions, strict=True)):
            answer = [{"role": "assistant", "content": text}]
            p, c = chat_completion_ids(tokenizer, list(prompt), answer, f"completions[{i}]")
            rows.append((p + c)[-self.cfg.context_length :])
        return self.score_rows(rows, tokenizer.pad_id)

    @torch.no_grad()
    def score_rows(self, rows: list[list[int]], pad_id: int) -> torch.Tensor:
        """Rewards (N,) of token-id rows of any lengths (padded here, on the model's
        device)."""
        device = self.head.weight.device
        ids, mask = pad_right(rows, pad_id)
        return self(ids.to(device), mask.to(device))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (N,) from a right-padding mask (N, L)."""
    L = attention_mask.shape[1]
    positions = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=1).clamp(min=0)


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as (ids (N, L) long, attention_mask (N, L) bool), right-padded."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


@register_loader("reward")
def _load_reward(path: Path, record: dict, device: torch.device) -> Loaded:
    """A reward checkpoint: config.json (architecture reward) + body/head weights."""
    cfg, tokenizer = read_config_and_tokenizer(path, record)
    with torch.device(device):
        model = RewardModel(cfg)
    load_weights(model, path / "model.safetensors", device, tied=False)
    return Loaded(model.eval(), tokenizer, record, "reward")


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


def bradley_terry_loss(
    r_chosen: torch.Tensor,  # (N,)
    r_rejected: torch.Tensor,  # (N,)
    margin: torch.Tensor | None = None,  # (N,) required gap, or None
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected - margin)``, plus ``center_coef *
    mean((r_chosen + r_rejected)^2)`` when centering is on."""
    gap = r_chosen - r_rejected
    if margin is not None:
        gap = gap - margin
    loss = -F.logsigmoid(gap).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def pair_rewards(model: RewardModel, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen (N,), r_rejected (N,)) of a pair batch in one packed forward pass."""
    rewards = packed_rewards(model, batch.ids, batch.attention_mask)  # (2N,)
    n = rewards.shape[0] // 2
    return rewards[:n], rewards[n:]


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Sequence indices grouped into rows of at most ``width`` tokens (longest first,
    each into the first row with room)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def packed_rewards(
    model: RewardModel, ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The same rewards (N,) as ``model(ids, attention_mask)``, computed with the
    right-padded rows packed side by side into as few rows of the same width as fit
    (``Transformer.hidden``'s segment ids keep each sequence to itself): the padding
    of a batch of unequal pairs is mostly not computed."""
    lengths = attention_mask.sum(1).tolist()
    width = ids.shape[1]
    rows = first_fit(lengths, width)
    P = len(rows)
    packed = torch.zeros(P, width, dtype=ids.dtype)  # (P, W)
    pos = torch.zeros(P, width, dtype=torch.long)  # position within its own sequence
    seg = torch.zeros(P, width, dtype=torch.long)  # which sequence of the row
    last = torch.zeros(len(lengths), 2, dtype=torch.long)  # (N, 2) row, column
    cpu_ids = ids.cpu()
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            n = lengths[i]
            packed[r, at : at + n] = cpu_ids[i, :n]
            pos[r, at : at + n] = torch.arange(n)
            seg[r, at : at + n] = s
            last[i] = torch.tensor([r, at + n - 1])
            at += n
        pos[r, at:] = torch.arange(width - at)
        seg[r, at:] = len(members)  # the tail: a segment of its own
    device = ids.device
    with autocast(device):
        h = model.body.hidden(packed.to(device), input_pos=pos.to(device),
                              segment_ids=seg.to(device))  # (P, W, C)  # fmt: skip
    h_last = h[last[:, 0].to(device), last[:, 1].to(device)]  # (N, C)
    return model.head(h_last.float()).squeeze(-1)  # (N,)


def pair_stats(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (share of r_chosen > r_rejected) and mean margin of a batch."""
    gap = (r_chosen - r_rejected).detach()
    return {"accuracy": (gap > 0).float().mean().item(), "margin": gap.mean().item()}


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


@dataclass
class RewardConfig(PreferenceDataConfig, FinetuneConfig):
    """A reward-model run: Bradley-Terry on preference pairs from a language model."""

    out: str = "runs/rm"
    """Run directory to write (must be empty or new unless --resume)."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    batch_size: int = 16
    """Pairs per micro-batch (each pair is two sequences)."""
    max_steps: int = 600
    """Optimizer steps; the schedule follows this or --max-minutes, whichever ends first."""
    eval_interval: int = 200
    """Steps between held-out evaluations (and at the end)."""
    checkpoint_interval: int = 200
    """Steps between snapshots (and at the end)."""
    center_coef: float = 0.0
    """Reward centering: adds coef * mean((r_chosen + r_rejected)^2) (0 = off; 0.01 is usual)."""

    def validate(self) -> None:
        """Shared checks, the data knobs, and centering >= 0."""
        super().validate()
        self.validate_data()
        if self.center_coef < 0:
            raise GlassboxError(f"--center-coef={self.center_coef} must be >= 0.")


def evaluate_pairs(model: RewardModel, pairs, batch_size: int, pad_id: int, device) -> dict:
    """Held-out loss, pairwise accuracy and mean margin, and the accuracy of each group
    of pairs (``val_accuracy_correctness`` ... for built-in pairs); eval mode meanwhile."""
    model.eval()
    n, loss, gap_sum = 0, 0.0, 0.0
    right: list[bool] = []
    with torch.no_grad():
        for batch in batches(pairs, batch_size, pad_id):
            rc, rr = pair_rewards(model, batch.to(device))
            loss += bradley_terry_loss(rc, rr).item() * rc.shape[0]
            right += (rc > rr).tolist()
            gap_sum += (rc - rr).sum().item()
            n += rc.shape[0]
    model.train()
    row = {"val_loss": loss / n, "val_accuracy": sum(right) / n, "val_margin": gap_sum / n}
    groups = sorted({p.group for p in pairs} - {""})
    for g in groups:
        hits = [ok for ok, p in zip(right, pairs, strict=True) if p.group == g]
        row[f"val_accuracy_{g}"] = sum(hits) / len(hits)
    return row


def train_reward(cfg: RewardConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    """Train a reward model; returns the last metrics row (with held-out accuracy)."""

    run, device = open_stage(cfg, "reward", explicit)
    cfg = run.cfg
    lm, tok, _ = load_start(cfg.base, device)
    model = RewardModel.from_language_model(lm).to(device).train()
    sets = load_preference_sets(cfg, tok, model.cfg.context_length, cfg.seed)
    optimizers = build_optimizers(
        model, "adamw", cfg.lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    step = restore_stage(run, model, optimizers, gen)[0] if run.snapshot is not None else 0

    def one_step(step: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = sample_batch(sets.train, cfg.batch_size, tok.pad_id, gen).to(device)
            rc, rr = pair_rewards(model, batch)
            loss = bradley_terry_loss(rc, rr, batch.margin, cfg.center_coef)
            (loss / cfg.grad_accum).backward()
            stats = {"train_loss": loss.item(), **pair_stats(rc, rr), "tokens": batch.tokens}
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v / (1 if k == "tokens" else cfg.grad_accum)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return sums

    def evaluate() -> dict[str, float]:
        return evaluate_pairs(model, sets.val, 2 * cfg.batch_size, tok.pad_id, device)

    def save(step: int) -> None:
        record = {"architecture": "reward", "pairs": sets.counts()}
        save_stage(run, step, model, tok, optimizers, gen, record=record)

    last = train_loop(run, step, optimizers, one_step, save, evaluate, title="reward model")
    return last | sets.counts()
