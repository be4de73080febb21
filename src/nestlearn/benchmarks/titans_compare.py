"""Our ``NeuralMemory`` against titans-pytorch's at the same configuration (``bench layers``).

Both run forward+backward at one head, a 2-layer memory MLP with expansion 4, momentum on, the
same chunk size, batch, length and thread count. Each implementation is timed and probed for
memory in a fresh process of its own (``in_fresh_process``), after the same warm-up: run in one
process, whichever goes second inherits the allocator state the first one left (glibc raises
its mmap threshold after large frees), which moved titans-pytorch's time by up to 1.7x here.
``--titans-malloc tuned`` runs both sides with glibc set to keep freed memory for reuse
(``TUNED_MALLOC``), side by side with the default: titans-pytorch's step is bound by page
faults under the default settings, ours is not, so the speed-up depends on the setting.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nestlearn.benchmarks.common import (
    compile_failures,
    in_fresh_process,
    measure,
    peak_memory_mb,
    progress,
    timed_once,
)
from nestlearn.ops import set_compile

try:  # Unix only: elsewhere the page-fault column stays empty
    import resource
except ImportError:
    resource = None

IMPLEMENTATIONS: tuple[str, ...] = ("nestlearn", "titans-pytorch")
TITANS_COLUMNS = ["implementation", "chunk", "malloc", "compile", "params", "tok/s",
                  "page faults/step", "compile s", "peak MB", "max err vs naive (f64)",
                  "speedup vs titans-pytorch", "note"]
# glibc's allocator as it comes, or tuned to keep freed memory for reuse: by default a freed
# block above the mmap threshold goes back to the kernel, and the next allocation of that size
# faults its pages in again (titans-pytorch's step spends most of its system time there).
MALLOC_SETTINGS: tuple[str, ...] = ("default", "tuned")
TUNED_MALLOC: dict[str, str | None] = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20),
                                       "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20),
                                       "MALLOC_TOP_PAD_": str(64 * 2**20)}
# "default" is glibc's own: the same variables removed from the child's environment, whatever
# this shell has set
DEFAULT_MALLOC: dict[str, str | None] = dict.fromkeys(TUNED_MALLOC)
# titans-pytorch's first calls are slower while its caches fill; both get the same warm-up
WARMUP = 3


def titans_pytorch_available() -> bool:
    """Whether the optional ``titans_pytorch`` package (the ``bench`` extra) is installed."""
    try:
        import titans_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def titans_module(implementation: str, dim: int, chunk_size: int,
                  use_naive: bool = False) -> nn.Module:
    """``implementation``'s NeuralMemory at the compared configuration."""
    if implementation == "titans-pytorch":
        from titans_pytorch import NeuralMemory as TheirNeuralMemory

        return TheirNeuralMemory(dim=dim, chunk_size=chunk_size)
    from nestlearn.nn.titans import NeuralMemory, NeuralMemoryConfig

    return NeuralMemory(NeuralMemoryConfig(dim=dim, heads=1, depth=2, expansion=4,
                                           chunk_size=chunk_size, momentum=True,
                                           use_naive=use_naive))


def make_titans_workload(implementation: str, dim: int, chunk_size: int, length: int,
                         batch: int, seed: int = 0) -> Callable[[], torch.Tensor]:
    """Forward+backward of ours or titans-pytorch's NeuralMemory at the same configuration."""
    torch.manual_seed(seed)
    module = titans_module(implementation, dim, chunk_size)
    x = torch.randn(batch, length, dim, requires_grad=True)

    def workload() -> torch.Tensor:
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x)[0]
        loss = y.square().mean()
        loss.backward()
        return loss.detach()

    return workload


def _timed(kwargs: dict[str, Any], repeats: int,
           backend: str | None = None) -> tuple[float, str, float, int | None]:
    """(median seconds, note, first call s, minor page faults of one more call or None);
    ``backend``: our chunk steps compiled with it (None: eager). The first call counts as the
    first of the ``WARMUP`` calls."""
    set_compile(backend is not None, backend or "inductor")
    notes: list[str] = []
    with compile_failures(notes):
        workload = make_titans_workload(**kwargs)
        first, _ = timed_once(workload)
        seconds, note = measure(workload, repeats, warmup=WARMUP - 1)
        faults = _page_faults(workload)
    return seconds, "; ".join(n for n in [note, *notes] if n), first, faults


def _page_faults(workload: Callable[[], torch.Tensor]) -> int | None:
    """Minor page faults of one call (None where the platform does not count them)."""
    if resource is None:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    workload()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _compiled_workload(backend: str, **kwargs: Any) -> Callable[[], torch.Tensor]:
    """Our workload, chunk steps compiled and run once (the memory probe excludes compiling)."""
    set_compile(True, backend)
    workload = make_titans_workload(**kwargs)
    workload()
    return workload


def titans_exactness(dim: int, chunk_size: int, length: int, batch: int) -> float:
    """Max |chunkwise - per-token reference| of our NeuralMemory in float64 (outputs)."""
    torch.manual_seed(0)
    fast = titans_module("nestlearn", dim, chunk_size).double()
    naive = titans_module("nestlearn", dim, chunk_size, use_naive=True).double()
    naive.load_state_dict(fast.state_dict())
    x = torch.randn(batch, length, dim, dtype=torch.float64)
    with torch.no_grad():
        return (fast(x)[0] - naive(x)[0]).abs().max().item()


def titans_rows(args: argparse.Namespace, threads: int) -> list[dict[str, Any]]:
    """Per ``--chunk-size`` and ``--titans-malloc`` setting, one row per implementation (ours
    once per --compile value, titans-pytorch eager); ours carry the speed-up over
    titans-pytorch at that chunk size and allocator setting, and the float64 error."""
    settings = getattr(args, "titans_malloc", ["default"])
    return [row for chunk in args.chunk_size for malloc in settings
            for row in _rows_at_chunk(args, chunk, malloc, threads)]


def _rows_at_chunk(args: argparse.Namespace, chunk: int, malloc: str,
                   threads: int) -> list[dict[str, Any]]:
    env = TUNED_MALLOC if malloc == "tuned" else DEFAULT_MALLOC
    rows = []
    compiles = getattr(args, "compile", ["off"])
    backend = getattr(args, "compile_backend", "inductor")
    cells = [("nestlearn", value == "on") for value in compiles] + [("titans-pytorch", False)]
    for implementation, compiled in cells:
        shown = "on" if compiled else "off"
        progress(f"NeuralMemory: {implementation}, chunk {chunk}, malloc {malloc}, "
                 f"compile {shown}")
        kwargs = {"implementation": implementation, "dim": args.titans_dim,
                  "chunk_size": chunk, "length": args.titans_length,
                  "batch": args.titans_batch}
        seconds, note, first, faults = in_fresh_process(_timed, kwargs, args.repeats,
                                                backend if compiled else None, threads=threads,
                                                env=env)
        make = (functools.partial(_compiled_workload, backend) if compiled
                else make_titans_workload)
        peak = (None if args.no_memory or note.startswith("failed")
                else peak_memory_mb(make, threads=threads, env=env, **kwargs))
        error = (titans_exactness(args.titans_dim, chunk, args.titans_length,
                                  args.titans_batch) if implementation == "nestlearn" else None)
        module = titans_module(implementation, args.titans_dim, chunk)
        rows.append({"implementation": implementation, "chunk": chunk, "malloc": malloc,
                     "compile": shown,
                     "compile s": first if compiled else None, "first call s": first,
                     "params": sum(p.numel() for p in module.parameters()),
                     "D": args.titans_dim, "T": args.titans_length, "B": args.titans_batch,
                     "tok/s": args.titans_batch * args.titans_length / seconds,
                     "page faults/step": faults,
                     "peak MB": peak, "max err vs naive (f64)": error, "note": note,
                     "threads": threads, "warmup": WARMUP, "repeats": args.repeats})
    *ours, theirs = rows
    for row in ours:
        row["speedup vs titans-pytorch"] = row["tok/s"] / theirs["tok/s"]
    return rows
