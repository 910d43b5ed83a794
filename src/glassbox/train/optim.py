"""Optimizers and learning-rate schedules shared by the training recipes."""

from __future__ import annotations

import math

import torch

from glassbox.errors import GlassboxError

OPTIMIZERS = ("muon", "adamw")


def build_optimizers(
    model: torch.nn.Module,
    name: str,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    hidden_prefix: str = "layers.",
) -> list[torch.optim.Optimizer]:
    """AdamW on everything; or Muon on the hidden 2-D matrices with AdamW on the rest.

    Hidden matrices are the 2-D parameters whose names start with ``hidden_prefix``
    (the transformer's blocks); embeddings, heads and norms stay on AdamW, as Muon's
    orthogonalized updates are meant for hidden linear maps. Weight decay applies to
    matrices only, never to norms or biases.
    """
    if name not in OPTIMIZERS:
        raise GlassboxError(f"--optimizer={name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    named = list(model.named_parameters())
    is_hidden = [p.dim() == 2 and n.startswith(hidden_prefix) for n, p in named]
    hidden = [p for (_, p), h in zip(named, is_hidden, strict=True) if h]
    other_mats = [p for (_, p), h in zip(named, is_hidden, strict=True) if p.dim() >= 2 and not h]
    vectors = [p for _, p in named if p.dim() < 2]
    fused = {"fused": True} if named and named[0][1].is_cuda else {}
    if name == "adamw":
        groups = [
            {"params": hidden + other_mats, "weight_decay": weight_decay},
            {"params": vectors, "weight_decay": 0.0},
        ]
        return [torch.optim.AdamW(groups, lr=lr, betas=betas, **fused)]
    adam_groups = [
        {"params": other_mats, "weight_decay": weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    return [
        torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(adam_groups, lr=lr, betas=betas, **fused),
    ]


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def run_progress(step: int, max_steps: int, elapsed_s: float, max_minutes: float | None) -> float:
    """How far along the run is, 0..1: steps or time, whichever is further."""
    p = step / max_steps
    if max_minutes:
        p = max(p, elapsed_s / (max_minutes * 60))
    return p


def warmup_cosine(
    lr: float, step: int, warmup_steps: int, progress: float, min_lr_ratio: float
) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``
    as ``progress`` goes 0 -> 1 (so a wall-clock budget still ends fully decayed)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))
