"""Device and precision choice: CUDA + bf16 autocast when present, fp32 on CPU."""

from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return default_device()
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU, where bf16 matmuls are very slow."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
