"""Device and training precision: CUDA + bf16 autocast when present; on CPU, bf16
autocast only where it was measured faster (see glassbox.infer.precision)."""

from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return default_device()
    return torch.device(name)


def autocast(device: torch.device, precision: str | None = None):
    """bf16 autocast on CUDA, a no-op on CPU; ``precision`` ("bf16" or "fp32", as chosen
    by :func:`glassbox.infer.precision.choose_train_precision`) overrides that default:
    bf16 autocast on CPU is fast on some CPUs (AVX-512 BF16) and very slow on others."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" or device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
