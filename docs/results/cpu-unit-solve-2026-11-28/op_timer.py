"""Forward+backward time of the two ops that run unit lower-triangular solves, at the shapes
HOPE and the benches give them; one tree per process (BENCHMARKS.md, "Faster triangular
solves"). Prints a markdown table and writes JSON.

Usage: PYTHONPATH=<tree>/src python op_timer.py <label> <out.json>
"""

import json
import statistics
import sys
import time

import torch

from nestlearn.ops import deep_memory, gated_delta_rule
from nestlearn.ops._deep_memory_common import DeepMemoryState, init_deep_memory_weights

torch.set_num_threads(2)
label, out_path = sys.argv[1], sys.argv[2]


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def deep_memory_case(chunk: int, length: int = 2048, heads: int = 20, dim: int = 38):
    """HOPE's stacked DGD memory: 20 heads (4 memories x 4 heads + the main 4) of width 38,
    hidden 152, momentum on, B=1."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (unit(torch.randn(1, length, heads, dim, generator=g)).requires_grad_()
               for _ in range(3))
    alpha = (1 - 0.01 * torch.rand(1, length, heads, generator=g)).requires_grad_()
    eta = (0.05 * torch.rand(1, length, heads, generator=g)).requires_grad_()
    theta = (0.5 * torch.rand(1, length, heads, generator=g)).requires_grad_()
    weights = tuple(w.requires_grad_() for w in init_deep_memory_weights(heads, dim, 4 * dim,
                                                                         generator=g))

    def run() -> None:
        o, _ = deep_memory(q, k, v, alpha, eta, theta, initial_state=DeepMemoryState(weights, None),
                           dgd=True, chunk_size=chunk, check_values=False)
        o.square().mean().backward()
    return run


def delta_rule_case(chunk: int, length: int = 2048, heads: int = 4, dim: int = 64):
    g = torch.Generator().manual_seed(0)
    q, k = (unit(torch.randn(1, length, heads, dim, generator=g)).requires_grad_()
            for _ in range(2))
    v = torch.randn(1, length, heads, dim, generator=g).requires_grad_()
    alpha = (1 - 0.01 * torch.rand(1, length, heads, generator=g)).requires_grad_()
    eta = (0.5 * torch.rand(1, length, heads, generator=g)).requires_grad_()

    def run() -> None:
        o = gated_delta_rule(q, k, v, alpha, eta, chunk_size=chunk)[0]
        o.square().mean().backward()
    return run


cases = {"deep_memory dgd, chunk 16": deep_memory_case(16),
         "deep_memory dgd, chunk 64": deep_memory_case(64),
         "gated_delta_rule, chunk 64": delta_rule_case(64)}
rows = []
for name, run in cases.items():
    for _ in range(2):
        run()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    rows.append({"tree": label, "case": name, "median ms": 1e3 * statistics.median(times),
                 "min ms": 1e3 * min(times), "max ms": 1e3 * max(times)})
print("| tree | case | median ms | range ms |")
print("|---|---|---|---|")
for r in rows:
    spread = f"{r['min ms']:.1f}-{r['max ms']:.1f}"
    print(f"| {r['tree']} | {r['case']} | {r['median ms']:.1f} | {spread} |")
with open(out_path, "w") as f:
    json.dump(rows, f, indent=1)
