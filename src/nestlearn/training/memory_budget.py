"""Estimate a training step's memory before the first step, and refuse a step that cannot fit.

A step holds the parameters (already in memory when the estimate is made), their gradients,
the optimizer's state and the activations autograd saves for the backward pass. The first
three follow from the parameter count; the activations are *measured*: two forward passes of
the run's own model at batch 1 and two short lengths (at most :data:`PROBE_TOKENS`) count the
bytes of every tensor saved for backward (``torch.autograd.graph.saved_tensors_hooks``), and a
line through the two counts gives a fixed part and the bytes per token. Every arch's
activations grow linearly with batch x length (chunkwise memories and causal attention in
``scaled_dot_product_attention`` keep no T x T matrix), so the line extrapolates to the run's
batch and ``data.seq_len`` without running them.

Accuracy (``tests/test_memory_budget.py`` measures the true peak of live tensor bytes of a
whole step, forward, backward and optimizer step, with a dispatch-mode tracker): the estimate
is never below the measured peak and at most :data:`ACCURACY_FACTOR` times it (1.2x to 1.6x
on the tiny recipes of every arch at 40 to 256 tokens, AdamW). It errs high
on purpose: it adds the backward pass's transient tensors (:data:`BACKWARD_MARGIN`) and
counts the optimizer state as if it lived beside the activations.

The available memory is the device's free memory on CUDA and, on CPU, ``MemAvailable`` (or a
smaller cgroup limit). ``train.memory_check=false`` skips the check.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nestlearn.errors import NestlearnError
from nestlearn.losses import lm_loss_sum

PROBE_TOKENS = 64  # the longer probe's length (or data.seq_len if shorter)
BACKWARD_MARGIN = 1.25  # gradients of activations live beside them during the backward pass
ACCURACY_FACTOR = 2.0  # the estimate lies in [measured peak, this x measured peak]
# optimizer state, in parameter copies (the largest of each optimizer's per-parameter buffers,
# including the AdamW fallback of the matrix optimizers for non-matrix parameters)
OPTIMIZER_COPIES = {"adamw": 2, "sgd": 1, "muon": 2, "m3": 5, "delta-momentum": 2,
                    "preconditioned-momentum": 2, "deep-momentum": 4}


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step, estimated before it runs."""

    parameters: int  # already allocated when the estimate is made
    gradients: int
    optimizer: int
    activations: int

    @property
    def needed(self) -> int:
        """What the step must still allocate: everything but the parameters."""
        return self.gradients + self.optimizer + self.activations


def gib(nbytes: float) -> str:
    """``12.3 GiB`` (or MiB below one GiB)."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**20:.0f} MiB"


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor,
                           autocast: contextlib.AbstractContextManager) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass of the loss of
    ``model`` on ``ids`` (inputs ``ids[:, :-1]``, targets ``ids[:, 1:]``); no backward runs."""
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        sizes.setdefault(storage.data_ptr() or id(storage), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        logits, _ = model(ids[:, :-1])
        loss = lm_loss_sum(logits, ids[:, 1:])
    del logits, loss
    return sum(sizes.values())


def estimate_step_memory(model: nn.Module, optimizer_name: str, batch_size: int, seq_len: int,
                         autocast: contextlib.AbstractContextManager | None = None
                         ) -> StepMemory:
    """The memory of a training step of ``model`` on ``batch_size`` windows of ``seq_len``
    tokens (this process's share of the batch), from two short probe passes."""
    autocast = autocast or contextlib.nullcontext()
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    device = params[0].device if params else torch.device("cpu")
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2))
    long = min(seq_len, PROBE_TOKENS)
    short = max(long // 2, 1)
    # probes draw no numbers from the run's generators, so a run's losses stay the same
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        generator = torch.Generator().manual_seed(0)
        counts = {}
        for length in sorted({short, long}):
            ids = torch.randint(0, vocab, (1, length + 1), generator=generator).to(device)
            counts[length] = saved_activation_bytes(model, ids, autocast)
    if long == short:
        per_token, fixed = counts[long] / long, 0.0
    else:
        per_token = max((counts[long] - counts[short]) / (long - short), 0.0)
        fixed = max(counts[short] - per_token * short, 0.0)
    activations = BACKWARD_MARGIN * (fixed + per_token * batch_size * seq_len)
    copies = OPTIMIZER_COPIES.get(optimizer_name, max(OPTIMIZER_COPIES.values()))
    return StepMemory(parameters=param_bytes, gradients=grad_bytes,
                      optimizer=copies * grad_bytes, activations=int(activations))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat_value(path: Path, key: str) -> int:
    """The value of ``key`` in a cgroup ``memory.stat`` file (0 where absent)."""
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


# (limit file, usage file, stat file, reclaimable page-cache key) for cgroup v2, then v1.
_CGROUP_FILES = (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                 ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                  "memory/memory.stat", "total_inactive_file"))


def _cpu_available(meminfo: Path = Path("/proc/meminfo"),
                   cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo``, or less if the process's cgroup allows less.

    A cgroup's usage counts its page cache; the inactive part is reclaimed before the
    cgroup runs out, so it is subtracted, as the kernel's own working-set figure does (a
    machine that just read a large corpus would otherwise look full)."""
    found = None
    with contextlib.suppress(OSError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    for limit_file, usage_file, stat_file, cache_key in _CGROUP_FILES:
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            working_set = max(usage - _stat_value(cgroup / stat_file, cache_key), 0)
            room = max(limit - working_set, 0)
            found = room if found is None else min(found, room)
    return found


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process on ``device`` now (None where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        return _cpu_available()
    return None


def check_step_memory(model: nn.Module, optimizer_name: str, batch_size: int, seq_len: int,
                      autocast: contextlib.AbstractContextManager | None = None,
                      available: int | None = None) -> StepMemory:
    """Refuse, with the estimate and the available memory, a step that cannot fit;
    ``available`` defaults to :func:`available_memory` of the model's device."""
    estimate = estimate_step_memory(model, optimizer_name, batch_size, seq_len, autocast)
    if available is None:
        device = next(model.parameters()).device
        available = available_memory(device)
        where = "this machine" if device.type == "cpu" else str(device)
    else:
        where = "this machine"
    if available is not None and estimate.needed > available:
        raise NestlearnError(
            f"data.batch_size={batch_size}, data.seq_len={seq_len}: a training step needs "
            f"about {gib(estimate.needed)} more memory (activations "
            f"{gib(estimate.activations)}, gradients {gib(estimate.gradients)}, optimizer "
            f"state {gib(estimate.optimizer)}; an estimate that errs high, by at most "
            f"{ACCURACY_FACTOR:g}x) but {where} has {gib(available)} available; allowed: a "
            "smaller data.batch_size or data.seq_len, or --set train.memory_check=false to "
            "try anyway"
        )
    return estimate
