"""The step timer of step-timer.txt: one arch's training step (the `bench` model at the
models' own chunks), two warm-up steps, then five timed; prints tok/s median and range.

Usage: PYTHONPATH=<tree>/src python step_timer.py 2048 hope
"""

import argparse
import statistics
import sys
import time

import torch

import nestlearn.benchmarks.opcount as opcount

torch.set_num_threads(2)
length, arch = int(sys.argv[1]), sys.argv[2]
parser = argparse.ArgumentParser()
opcount.add_arguments(parser)
args = parser.parse_args(["--archs", arch, "--length", str(length), "--chunk-size", "16",
                          "--inner-chunk-size", "16", "--cms-chunk-sizes", "16", "64"])
config = opcount.model_configs(args)[arch]
_, step = opcount.seeded_step(config, length, 1)
step()
step()
times = []
for _ in range(5):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(arch, "tok/s median", round(length / statistics.median(times)), "range",
      round(length / max(times)), round(length / min(times)))
