"""Profile one training step of an arch by aten op (self CPU time), eager or compiled.

Usage (the files beside this one):
    python profile_step.py --archs hope --chunk-size 16 --inner-chunk-size 16 \
        --cms-chunk-sizes 16 64                       # profile-eager-hope-model-defaults.txt
    python profile_step.py --compiled --archs hope --chunk-size 16 --inner-chunk-size 16 \
        --cms-chunk-sizes 16 64                       # profile-compiled-hope-model-defaults.txt
Options as ``nestlearn bench ops-count``; 2 torch threads. Compiled: one step compiles, two
more are timed, the next is profiled (a profiler event per generated kernel). Eager: one
warm-up step, one timed, one profiled. The ``*-earlier.txt`` profiles came from a first
form of this script (two files, no ``--compiled`` flag) that ran the same steps.
"""

import argparse
import sys
import time

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from nestlearn.benchmarks.counted_runs import seeded_step
from nestlearn.benchmarks.opcount import add_arguments, model_configs
from nestlearn.ops import set_compile


def timed(step, label: str) -> None:
    started = time.perf_counter()
    step()
    print(label, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:])
    torch.set_num_threads(2)
    if args.compiled:
        inductor_config.cpp.enable_kernel_profile = True
        set_compile(True)
    config = model_configs(args)[args.archs[0]]
    _, step = seeded_step(config, args.length, args.batch)
    timed(step, "compile step s" if args.compiled else "warm-up step s")
    for _ in range(2 if args.compiled else 1):
        timed(step, "step s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    width = 70 if args.compiled else 55
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45,
                                    max_name_column_width=width))


if __name__ == "__main__":
    main()
