"""LoRA: train a low-rank update of chosen linear layers, the base weights frozen.

A wrapped layer computes ``y = W x + scale * B (A dropout(x))`` where ``W`` (out, in) is
the frozen base weight, ``A`` (r, in) and ``B`` (out, r) are the adapter and
``scale = alpha / r``. ``B`` starts at zero, so before the first update the wrapped model
computes exactly what the base model does. Only ``A`` and ``B`` train: a rank-8 adapter on
every linear map of a block is a few percent of the parameters.

    apply_lora(model, rank=8, alpha=16, dropout=0.0, targets=["q_proj", ...])
    merge_lora(model)      W <- W + scale * B A   (inference at base-model speed)
    unmerge_lora(model)    W <- W - scale * B A   (back to training)
    lora_state(model)      {"layers.0.attn.q_proj.lora_A": ..., ...}: the adapter alone
    merged_state(model)    plain Transformer weights with the update folded in, which any
                           loader (generate, chat, serve, export) reads as a normal model

Merging is exact up to floating-point rounding: ``W + scale * B A`` is one rounding of
the product per weight, so merged logits match adapter logits to float tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from glassbox.errors import GlassboxError

# Every linear map inside a transformer block (the attention and SwiGLU projections).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """An ``nn.Linear`` with a frozen weight plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        # Kaiming-uniform A (as nn.Linear initialises its weight); B = 0 so the update is 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:
            return y
        update = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()  # (..., r) -> (..., out)
        return y + self.scale * update

    def delta(self) -> torch.Tensor:
        """The weight update ``scale * B A`` (out, in)."""
        return self.scale * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (idempotent)."""
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (idempotent)."""
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA-wrapped layer, by its module name (``layers.0.attn.q_proj``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = ALL_LINEAR,
) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap each ``nn.Linear`` whose attribute
    name is in ``targets`` with a :class:`LoRALinear`; returns ``model`` (changed in place).
    """
    _check_settings(model, rank, alpha, dropout, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout))
                found += 1
    if found == 0:
        raise GlassboxError(
            f"--lora-targets {list(targets)} matched no linear layer of the model; use names "
            f"from {list(ALL_LINEAR)}."
        )
    return model


def _check_settings(model, rank: int, alpha: float, dropout: float, targets) -> None:
    if rank < 1:
        raise GlassboxError(f"--lora-rank={rank} must be >= 1 (0 means full fine-tuning).")
    if alpha <= 0:
        raise GlassboxError(f"--lora-alpha={alpha} must be > 0 (scale = alpha / rank).")
    if not 0 <= dropout < 1:
        raise GlassboxError(f"--lora-dropout={dropout} must be in [0, 1).")
    if lora_layers(model):
        raise GlassboxError("apply_lora: the model already has LoRA adapters.")
    cfg = getattr(model, "cfg", None)
    if "lm_head" in targets and cfg is not None and cfg.tie_embeddings:
        raise GlassboxError(
            "--lora-targets lm_head: this model ties its LM head to the embedding, so "
            "merging an update into it would change the embedding too; leave lm_head out."
        )


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (forward then skips the adapters)."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (up to float rounding), so the adapters train again."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone: ``{"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)}``."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach().clone()
        out[f"{name}.lora_B"] = layer.lora_B.detach().clone()
    return out


@torch.no_grad()
def load_lora_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors saved by :func:`lora_state` into ``model``'s adapters."""
    layers = lora_layers(model)
    expected = {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise GlassboxError(
            f"The saved adapter does not fit this model (missing {missing[:3]}, unexpected "
            f"{extra[:3]}); resume with the run's own --lora-rank and --lora-targets."
        )
    for name, layer in layers.items():
        layer.unmerge()
        layer.lora_A.copy_(tensors[f"{name}.lora_A"])
        layer.lora_B.copy_(tensors[f"{name}.lora_B"])


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain model weights (the names a model without LoRA has) with each adapter's
    update folded in; a tied LM head is left out, as ``checkpoint.model_state`` does."""
    layers = lora_layers(model)
    out = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:
            continue  # lora_A / lora_B
        parent, _, child = owner.rpartition(".")
        if child == "base" and parent in layers:
            layer = layers[parent]
            if leaf == "weight" and not layer.merged:
                value = value + layer.delta().to(value.dtype)
            key = f"{parent}.{leaf}"
        out[key] = value.detach().clone()
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters will train (requires_grad), tied ones counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
