"""Multi-process training with ``torchrun``: process group, DDP wrapping, collectives.

``torchrun --nproc_per_node N -m nestlearn train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` then joins the process group (gloo on CPU, nccl on
CUDA, one GPU per local rank). Every rank builds the same sampler and takes its rows of the
same global batch, so N processes compute exactly the update of one process on the whole
batch (up to float summation order). Only rank 0 writes logs and checkpoints. Without
``WORLD_SIZE`` > 1 everything here is a no-op and the run is a plain single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nestlearn.errors import NestlearnError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, its device and backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda (this rank's GPU) when available, else cpu."""
    if not (name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise NestlearnError(f"device: got {name!r}; allowed: auto, cpu, cuda, cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NestlearnError(f"device: got {name!r}; allowed: cpu (CUDA is not available)")
        if name == "cuda":
            return torch.device("cuda", local_rank)
    return torch.device(name)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise NestlearnError(f"environment {name}: got {value!r}; allowed: an integer") from None


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (if any)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(device=resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank,
                       device=resolved, backend=backend)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group this run joined (nothing for a single process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False
               ) -> nn.Module:
    """DDP around ``model`` when distributed, else ``model`` itself."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=find_unused_parameters)


class LossView(nn.Module):
    """The model as DDP must see it: the memory state it returns is cut from the graph, so
    that DDP's search for unused parameters starts from the logits (the loss) only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        logits, state = self.model(ids, state)
        detach = getattr(state, "detach", None)
        return logits, detach() if callable(detach) else state


def unused_parameters(model: nn.Module, seq_len: int, device: torch.device) -> list[str]:
    """Names of trainable parameters that get no gradient from one probe forward/backward
    (e.g. parts of a memory unused by the LM loss); DDP must be told about them."""
    model.zero_grad(set_to_none=True)
    logits, _ = model(torch.zeros(1, seq_len, dtype=torch.long, device=device))
    logits.float().sum().backward()
    names = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return names


def wrap_for_training(model: nn.Module, ctx: DistContext, seq_len: int,
                      find_unused_parameters: bool) -> nn.Module:
    """``model`` itself for one process; under torchrun, DDP around its :class:`LossView`,
    told about unused parameters when a probe pass finds any (or when asked)."""
    if not ctx.enabled:
        return model
    find_unused = find_unused_parameters or bool(unused_parameters(model, seq_len, ctx.device))
    return wrap_model(LossView(model), ctx, find_unused)


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``values`` over ranks (a copy; the input is not changed)."""
    out = values.detach().clone()
    if ctx.enabled:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(value: Any, ctx: DistContext) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank (``[value]`` alone)."""
    if not ctx.enabled:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def average_gradients(model: nn.Module, ctx: DistContext) -> None:
    """Replace every gradient by its mean over ranks, as DDP does, for a model that ran
    outside DDP (the CMS teach-signal driver calls the model itself); one all-reduce."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True when ``flag`` is true on at least one rank (all ranks get the same answer)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (nothing for a single process)."""
    if ctx.enabled:
        dist.barrier()
