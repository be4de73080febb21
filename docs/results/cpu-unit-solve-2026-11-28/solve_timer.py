"""The solve alone, forward+backward, float32, 2 threads: ``torch.linalg.solve_triangular``
against ``unit_lower_solve`` at HOPE's stacked DGD shapes ([1, 20, C, C] systems, 152 columns),
alternated in one process (BENCHMARKS.md, "Faster triangular solves"). Prints a markdown table
and writes JSON.

Usage: PYTHONPATH=<tree>/src python solve_timer.py <out.json>
"""

import json
import statistics
import sys
import time

import torch

from nestlearn.ops._unit_triangular import unit_lower_solve

torch.set_num_threads(2)


def reference(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)


def per_call_us(solve, system: torch.Tensor, rhs: torch.Tensor, grad: torch.Tensor,
                calls: int = 300) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        solve(system, rhs).backward(grad)
    return 1e6 * (time.perf_counter() - start) / calls


rows = []
for size in (16, 64):
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(1, 20, size, 38, generator=g), dim=-1)
    system = (0.2 * torch.rand(1, 20, size, 1, generator=g) * (keys @ keys.transpose(-1, -2)))
    system.requires_grad_()
    rhs = torch.randn(1, 20, size, 152, generator=g).requires_grad_()
    grad = torch.randn(1, 20, size, 152, generator=g)
    times: dict[str, list[float]] = {"solve_triangular": [], "unit_lower_solve": []}
    for solve in (reference, unit_lower_solve):
        per_call_us(solve, system, rhs, grad, 20)
    for _ in range(5):
        times["solve_triangular"].append(per_call_us(reference, system, rhs, grad))
        times["unit_lower_solve"].append(per_call_us(unit_lower_solve, system, rhs, grad))
    for name, values in times.items():
        rows.append({"C": size, "solve": name, "median us": statistics.median(values),
                     "min us": min(values), "max us": max(values)})
print("| C | solve | forward+backward us (median of 5 x 300) | range |")
print("|---|---|---|---|")
for r in rows:
    print(f"| {r['C']} | {r['solve']} | {r['median us']:.0f} | "
          f"{r['min us']:.0f}-{r['max us']:.0f} |")
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
