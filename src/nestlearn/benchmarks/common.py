"""Shared benchmark plumbing: timing, peak memory in a fresh process, table and JSON output."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from queue import Empty
from typing import Any

import torch

from nestlearn.errors import NestlearnError, NonFiniteError, invalid


def progress(message: str) -> None:
    """One line of progress on stderr, so a long benchmark shows where it is."""
    print(message, file=sys.stderr, flush=True)


def synchronize(device: str) -> None:
    """Wait for ``device``'s queued kernels (CUDA runs them asynchronously; CPU: nothing)."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed_once(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, Any]:
    """(wall seconds, result) of one ``fn()``, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1,
              device: str = "cpu") -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs
    (on CUDA each timed run is synchronized on both sides)."""
    for _ in range(warmup):
        fn()
    times = sorted(timed_once(fn, device)[0] for _ in range(repeats))
    return times[len(times) // 2]


def measure(workload: Callable[[], torch.Tensor], repeats: int,
            warmup: int = 1, device: str = "cpu") -> tuple[float, str]:
    """(median seconds, note): the note flags a run whose loss is not finite (a diverging
    layer's timing is reported but marked) or that failed with a NestlearnError or a
    NonFiniteError."""
    losses: list[torch.Tensor] = []

    def run() -> None:
        losses.append(workload())

    try:
        seconds = time_call(run, repeats=repeats, warmup=warmup, device=device)
    except (NestlearnError, NonFiniteError) as err:
        return float("nan"), f"failed: {err}"
    return seconds, "" if torch.isfinite(losses[-1]) else "non-finite outputs"


def model_chunks_help() -> str:
    """Help text: the chunk sizes `nestlearn train` builds the models with, read from the
    default `hope` config (every memory arch shares its memory chunk, every CMS its chunks)."""
    from nestlearn.models import ModelConfig  # lazily: the other benches need no model

    config = ModelConfig(arch="hope")
    chunk, inner = config.memory.chunk_size, config.memory.inner_chunk_size
    cms = " ".join(str(size) for size in config.cms.chunk_sizes)
    return (f"the models' own defaults are {chunk} for every memory (HOPE's inner ones "
            f"{inner}) and CMS chunks {cms}: '--chunk-size {chunk} --inner-chunk-size {inner} "
            f"--cms-chunk-sizes {cms}' measures what 'nestlearn train' builds")


# The compiled path's eager-fallback warning (ops/_compile.py): the step then ran uncompiled.
COMPILE_FAILED = "running it eagerly"


@contextlib.contextmanager
def compile_failures(notes: list[str]) -> Iterator[None]:
    """Collect the compiled path's eager-fallback warnings into ``notes`` (for a result's note
    column); other warnings are shown as usual."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            # every fallback is seen (not once per location); other warnings keep their filters
            warnings.filterwarnings("always", message=f".*{COMPILE_FAILED}",
                                    category=RuntimeWarning)
            yield
    finally:
        # outside the recording block: shown here, not recorded again
        for item in caught:
            message = str(item.message)
            if issubclass(item.category, RuntimeWarning) and COMPILE_FAILED in message:
                notes.append(f"compile failed: {message}")
            else:
                warnings.showwarning(item.message, item.category, item.filename, item.lineno)


def _status_mb(field: str) -> float:
    """A ``Vm*`` field of /proc/self/status in MiB (the kernel reports KiB)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(target: Callable[..., Any], args: tuple, threads: int, queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    try:
        report = (True, target(*args))
    except BaseException:  # sent to the parent, which would otherwise wait for a result forever
        report = (False, traceback.format_exc())
    queue.put(report)


def in_fresh_process(target: Callable[..., Any], *args: Any, threads: int | None = None,
                     env: dict[str, str | None] | None = None) -> Any:
    """``target(*args)`` run in a new (spawned) process at ``threads`` torch threads.

    Each measurement then starts from the same state: nothing earlier in this process (loaded
    kernels, the allocator's caches and its mmap thresholds, raised by any large tensor freed
    before) can speed up or slow down one implementation against another. ``target`` must be
    a module-level function so the child can import it. An exception in the child, or its
    death, raises ``RuntimeError`` here (with the child's traceback) instead of a hang.
    ``env``: variables set in the child's environment (``None``: removed), before it starts,
    so what the C library reads at start-up, such as glibc's ``MALLOC_*`` settings, sees them.
    """
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child,
                       args=(target, args, threads or torch.get_num_threads(), queue))
    with _environment(env or {}):
        proc.start()
    while True:
        try:
            ok, result = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive() and queue.empty():
                proc.join()
                raise RuntimeError(f"the measuring process exited with code {proc.exitcode} "
                                   "without a result") from None
    proc.join()
    if not ok:
        raise RuntimeError(f"the measuring process failed:\n{result}")
    return result


@contextlib.contextmanager
def _environment(variables: dict[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``variables`` set (``None``: removed), restored afterwards. It is
    the process's environment: not for threads that start processes at the same time."""
    saved = {name: os.environ.get(name) for name in variables}
    try:
        _assign(variables)
        yield
    finally:
        _assign(saved)


def _assign(variables: dict[str, str | None]) -> None:
    for name, value in variables.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _peak_rise(make_workload: Callable[..., Callable[[], Any]], kwargs: dict) -> float:
    workload = make_workload(**kwargs)
    baseline = _status_mb("VmRSS")
    # ru_maxrss is inherited across fork/exec, so it can report the parent's size: reset the
    # kernel's high-water mark (VmHWM) to the current RSS instead and read it afterwards.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    workload()
    return max(0.0, _status_mb("VmHWM") - baseline)


def cuda_peak_mb(workload: Callable[[], Any]) -> float:
    """Peak CUDA memory (MiB) that one call of ``workload`` allocates above what is allocated
    before it (torch.cuda.max_memory_allocated, its peak reset first)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    workload()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_memory_mb(make_workload: Callable[..., Callable[[], Any]], threads: int | None = None,
                   device: str = "cpu", env: dict[str, str | None] | None = None,
                   **kwargs: Any) -> float:
    """Peak memory (MiB) that one call of the workload adds.

    ``make_workload(**kwargs)`` builds inputs and returns a zero-argument callable; it must be a
    module-level function so the child process can import it. On CPU (``device="cpu"``)
    measured in a fresh process as the rise of the process's peak RSS above its RSS once
    inputs exist, so allocator caches of earlier measurements cannot hide or inflate it; on
    CUDA, in this process, by :func:`cuda_peak_mb`. ``env``: as for :func:`in_fresh_process`
    (CPU only: the CUDA probe starts no process).
    """
    if device == "cuda" and env:
        raise invalid("env", f"{sorted(env)} with device cuda",
                      "None with device cuda (the CUDA probe runs in this process)")
    if device == "cuda":
        return cuda_peak_mb(make_workload(**kwargs))
    return in_fresh_process(_peak_rise, make_workload, kwargs, threads=threads, env=env)


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns`` (floats to 4 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name: str, rows: Sequence[dict[str, Any]], out_dir: str | Path) -> Path:
    """Write ``<out_dir>/<name>.json`` (rows + environment) atomically; return its path.

    Also called after each row of a long section, so a run stopped part-way (a time limit)
    keeps the rows it finished."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "environment": environment(), "rows": list(rows)},
                              indent=2))
    tmp.replace(path)
    return path


def write_report(name: str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
                 out_dir: str | Path) -> Path:
    """Print the table and write ``<out_dir>/<name>.json`` (rows + environment); return its path."""
    print(format_table(rows, columns))
    path = write_json(name, rows, out_dir)
    print(f"wrote {path}")
    return path
