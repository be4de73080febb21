"""Kernels, host syncs and GPU busy time of one training step per arch, on a CUDA device.

The GPU counterpart of ``nestlearn bench ops-count`` (which counts aten ops on CPU): each arch
at the Transformer's parameter count (the matching of ``bench layers``), one training step
(forward, next-token loss, backward) at ``--batch`` x ``--length`` under bf16 autocast,
profiled with torch's profiler after one warm-up step. Reported per step:

- ``kernels``: kernels the GPU ran (memory copies and memsets counted apart, in ``copies``);
- ``syncs``: stream, device and event synchronizations the host waited on inside the step
  (an ``.item()`` is a copy and a stream sync; the profiler's own closing synchronize is
  outside the step's range and not counted);
- ``GPU busy s``: the summed duration of those kernels, against ``step s``, the median wall
  time of an unprofiled step (``--repeats``): their ratio is how much of the step the GPU
  computes rather than waits for the host to launch work.

Usage (``bench/gpu_check.sh`` runs it): ``python bench/gpu_profile.py --out results/gpu``.
``--device cpu`` runs the same code on CPU (kernels and syncs then read 0), for checking the
script without a GPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

import torch

from nestlearn.benchmarks.common import progress, time_call, write_report
from nestlearn.benchmarks.layers import count_parameters, make_model_workload
from nestlearn.benchmarks.opcount import add_gpu_arguments, model_configs

SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize",
                        "cudaEventSynchronize"})
COPY_PREFIXES = ("Memcpy", "Memset")
STEP_RANGE = "nestlearn.training_step"
COLUMNS = ["arch", "params", "T", "B", "kernels", "copies", "syncs", "GPU busy s", "step s",
           "busy fraction", "tok/s"]


def syncs_within(events: Iterable[Any], range_name: str) -> int:
    """Host waits (``SYNC_CALLS``) that started inside the profiled range ``range_name``: the
    profiler's own synchronize when it stops, outside that range, is not the step's. By time,
    so the backward's waits on autograd's device thread count too. The range is the host's
    (on CUDA the profiler also records it once more as a GPU annotation)."""
    from torch.autograd import DeviceType

    events = list(events)
    (step,) = [e for e in events if e.name == range_name and e.device_type == DeviceType.CPU]
    start, end = step.time_range.start, step.time_range.end
    return sum(e.name in SYNC_CALLS and start <= e.time_range.start <= end for e in events)


def profile_arch(arch: str, config: Any, length: int, batch: int, device: str,
                 repeats: int) -> dict[str, Any]:
    """One arch's row: kernels, copies and syncs of one profiled step after a warm-up step,
    and the median of ``repeats`` unprofiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    step = make_model_workload(config.to_dict(), length, batch, device=device,
                               autocast_mode="bf16" if device == "cuda" else "off")
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        with record_function(STEP_RANGE):
            step()
        if device == "cuda":
            torch.cuda.synchronize()  # every kernel of the step inside the profile
    events = prof.events()
    on_device = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels = [e for e in on_device if not e.name.startswith(COPY_PREFIXES)]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    seconds = time_call(step, repeats=repeats, warmup=0, device=device)
    return {"arch": arch, "params": count_parameters(config), "T": length,
            "B": batch, "kernels": len(kernels), "copies": len(on_device) - len(kernels),
            "syncs": syncs_within(events, STEP_RANGE), "GPU busy s": busy, "step s": seconds,
            "busy fraction": busy / seconds, "tok/s": batch * length / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_gpu_arguments(parser)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_profile: error: --device: got 'cuda'; allowed: cpu "
              "(torch.cuda.is_available() is false here)", file=sys.stderr)
        return 2
    rows = []
    for arch, config in model_configs(args).items():
        progress(f"profiling {arch} T={args.length} B={args.batch} on {args.device}")
        rows.append(profile_arch(arch, config, args.length, args.batch, args.device,
                                 args.repeats))
        write_report("gpu-profile", rows, COLUMNS, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
