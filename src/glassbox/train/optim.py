"""Optimizers and learning-rate schedules shared by the training recipes."""

from __future__ import annotations

import functools
import math
import time

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

    Only trainable parameters (``requires_grad``) are optimized. Hidden matrices are the
    2-D parameters whose names start with ``hidden_prefix``
    (the transformer's blocks); embeddings, heads and norms stay on AdamW, as Muon's
    orthogonalized updates are meant for hidden linear maps. Weight decay applies to
    matrices only, never to norms or biases.
    """
    if name not in OPTIMIZERS:
        raise GlassboxError(f"--optimizer={name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # LoRA: frozen base
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
        Muon(hidden, lr=lr, weight_decay=weight_decay),
        torch.optim.AdamW(adam_groups, lr=lr, betas=betas, **fused),
    ]


# ---------------------------------------------------------------------------------------
# Muon, with its Newton-Schulz precision chosen for the machine
# ---------------------------------------------------------------------------------------

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic, steepest slope at zero


class Muon(torch.optim.Optimizer):
    """Muon: SGD momentum (Nesterov) whose update is orthogonalized by a Newton-Schulz
    iteration, for 2-D hidden matrices; the learning rate is scaled by
    ``0.2 * sqrt(max(rows, cols))`` so AdamW's learning rate and decay carry over.

    The same algorithm as ``torch.optim.Muon`` (its state is a ``momentum_buffer`` per
    matrix), except for one choice: ``torch.optim.Muon`` always runs the iteration in
    bfloat16, which is fast on GPUs and on CPUs with AVX-512 BF16 / AMX but about 35x
    slower than float32 on an AVX2-only CPU. Here the dtype is measured once per device
    (:func:`newton_schulz_dtype`) and stored in the param groups, so a resumed run keeps
    the dtype it started with.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-7,
        ns_dtype: str | None = None,  # "bfloat16" | "float32"; None = measure
    ):
        params = list(params)
        if ns_dtype is None:
            device = params[0].device if params else torch.device("cpu")
            ns_dtype = newton_schulz_dtype(device.type)
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_steps=ns_steps, eps=eps, ns_dtype=ns_dtype,
        )  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices; got a {tuple(p.shape)} parameter")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            dtype = getattr(torch, group.get("ns_dtype", "bfloat16"))
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_steps"], group["eps"], dtype)
                rows, cols = p.shape
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))
        return loss


def orthogonalize(g: torch.Tensor, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """About U V^T of g = U S V^T, by a quintic Newton-Schulz iteration in ``dtype``."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@functools.cache
def newton_schulz_dtype(device_type: str) -> str:
    """bfloat16 where its matmuls are at least as fast as float32's (always on CUDA;
    measured on CPUs, where it depends on AVX-512 BF16 / AMX), else float32."""
    if device_type == "cuda":
        return "bfloat16"
    if device_type != "cpu":
        return "float32"
    timings = {}
    for name in ("float32", "bfloat16"):
        x = torch.randn(128, 384).to(getattr(torch, name))
        gram = x @ x.T
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(4):
                torch.addmm(x, gram, x)
            best = min(best, time.perf_counter() - t)
        timings[name] = best
    return "bfloat16" if timings["bfloat16"] <= timings["float32"] else "float32"


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


def lr_at(cfg, step: int, elapsed_s: float) -> float:
    """The learning rate at ``step`` for any recipe config with ``lr``, ``warmup_steps``,
    ``min_lr_ratio``, ``max_steps`` and ``max_minutes``: warmup, then cosine over the
    run's progress (steps or time, whichever is further)."""
    progress = run_progress(step, cfg.max_steps, elapsed_s, cfg.max_minutes)
    return warmup_cosine(cfg.lr, step, cfg.warmup_steps, progress, cfg.min_lr_ratio)


def finished(cfg, step: int, elapsed_s: float) -> bool:
    """Whether the step or time budget of a recipe config is spent."""
    return run_progress(step, cfg.max_steps, elapsed_s, cfg.max_minutes) >= 1.0
