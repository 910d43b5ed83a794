"""Processes and devices for every training recipe: one process, or many under ``torchrun``.

setup_distributed("auto")      -> (Dist, device); joins the process group (gloo on
                                  CPU, NCCL on CUDA) when WORLD_SIZE > 1
wrap_model(model, strategy)    -> DistributedDataParallel, or FSDP2 (``fully_shard``
                                  on each block, then on the whole model)
full_model_state / full_optimizer_state / load_full_state
                               -> whole (unsharded) CPU tensors for snapshots, the
                                  same files whatever the strategy; loading scatters
                                  them back into the shards
main_process_first, rank0_value, gather_rng, barrier
                               -> the small collectives recipes need
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from glassbox.device import resolve_device
from glassbox.errors import GlassboxError

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Dist:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; choose this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def wrap_model(
    model: torch.nn.Module, strategy: str, d: Dist, device: torch.device
) -> torch.nn.Module:
    """The module the training loop calls: ``model`` itself on one process, DDP, or FSDP2.

    FSDP2 shards every parameter across processes, so a model larger than one device's
    memory trains; each block is its own shard group (gathered just in time for its
    forward and backward), then the rest (embeddings, final norm) as one more group.
    FSDP2 replaces the parameters with sharded DTensors in place, so build optimizers
    after this call.
    """
    if strategy not in STRATEGIES:
        raise GlassboxError(f"--strategy={strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    if d.world == 1:
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(model, "layers", None) or getattr(model, "blocks", None) or []
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches before the last one (DDP, FSDP2)."""
    if sync:
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ---------------------------------------------------------------------------------------
# Whole state for snapshots, whatever the strategy
# ---------------------------------------------------------------------------------------

# torch.distributed.checkpoint is imported where it is used: it costs about a second at
# start-up, and every `glassbox` command imports this module.


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as a whole CPU tensor (a collective under FSDP: call on all ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(_unwrap(model), options=full)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, whole CPU tensors (all ranks)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(_unwrap(model), optimizer, options=full)


def load_full_state(
    model: torch.nn.Module,
    model_state: dict[str, torch.Tensor],
    optimizers: list[tuple[torch.optim.Optimizer, dict]] = (),
) -> None:
    """Put whole tensors back into a (possibly sharded) model and its optimizers."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    inner = _unwrap(model)
    opts = StateDictOptions(full_state_dict=True, strict=False)
    missing, unexpected = set_model_state_dict(inner, model_state, options=opts)
    tied = getattr(getattr(inner, "cfg", None), "tie_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise GlassboxError(
            f"The snapshot's weights do not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Resume with the run's own --model settings."
        )
    for opt, state in optimizers:
        set_optimizer_state_dict(inner, opt, state, options=opts)


# ---------------------------------------------------------------------------------------
# Small collectives
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def main_process_first(d: Dist) -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (no-op without torchrun)."""
    if d.world > 1 and not d.main:
        dist.barrier()
    yield
    if d.world > 1 and d.main:
        dist.barrier()


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def rank0_value(x: float, d: Dist) -> float:
    """Rank 0's value of ``x`` on every process (identity when not distributed)."""
    if d.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, src=0)
    return float(t)


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU ones."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rng(gen: torch.Generator, d: Dist) -> torch.Tensor:
    """Every rank's data-sampler RNG state, stacked (world, n), on every rank."""
    state = gen.get_state().view(1, -1)
    if d.world == 1:
        return state
    state = state.to(_comm_device())
    parts = [torch.empty_like(state) for _ in range(d.world)]
    dist.all_gather(parts, state)
    return torch.cat(parts).cpu()
