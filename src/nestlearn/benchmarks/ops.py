"""Memory ops: forward+backward tokens/s and peak memory, chunkwise vs naive per-token loop.

Each rule of ``nestlearn.ops`` runs forward and backward (gradients for q, k, v, the gates and,
for the deep memory, its initial weights) at every length, once in its chunkwise form and once
in its token-by-token reference. Peak memory is measured in a fresh process per cell.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from nestlearn.benchmarks.common import peak_memory_mb, progress, time_call, write_report
from nestlearn.errors import invalid
from nestlearn.ops import (
    TitansLinearState,
    gated_delta_rule,
    gated_delta_rule_naive,
    gated_linear_attention,
    gated_linear_attention_naive,
    titans_linear,
    titans_linear_naive,
)

RULES: tuple[str, ...] = ("gla", "delta", "titans", "deep_memory")
VARIANTS: tuple[str, ...] = ("chunkwise", "naive")
DEEP_MEMORY_DEPTH = 2
DEEP_MEMORY_EXPANSION = 4

COLUMNS = [
    "rule", "T", "chunkwise tok/s", "naive tok/s", "speedup", "chunkwise MB", "naive MB",
    "chunkwise KB/token", "note",
]


def _functions(rule: str, variant: str) -> Callable:
    if rule == "deep_memory":
        from nestlearn.ops.deep_memory import deep_memory, deep_memory_naive

        return deep_memory if variant == "chunkwise" else deep_memory_naive
    table = {
        "gla": (gated_linear_attention, gated_linear_attention_naive),
        "delta": (gated_delta_rule, gated_delta_rule_naive),
        "titans": (titans_linear, titans_linear_naive),
    }
    return table[rule][VARIANTS.index(variant)]


def _inputs(rule: str, length: int, batch: int, heads: int, dim: int,
            seed: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Keyword arguments of one call and the tensors that receive gradients."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, length, heads, dim)
    q = torch.randn(shape, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(shape, generator=gen), dim=-1)
    v = torch.randn(shape, generator=gen)
    gate_shape = (batch, length, heads)
    # Typical trained gates: slow forgetting, moderate steps, strong momentum.
    alpha = 0.9 + 0.1 * torch.rand(gate_shape, generator=gen)
    eta = 0.5 * torch.rand(gate_shape, generator=gen)
    theta = 0.8 + 0.2 * torch.rand(gate_shape, generator=gen)
    kwargs: dict[str, Any] = {"q": q, "k": k, "v": v, "alpha": alpha, "eta": eta}
    if rule in ("titans", "deep_memory"):
        kwargs["theta"] = theta
    leaves = list(kwargs.values())
    if rule == "deep_memory":
        from nestlearn.ops.deep_memory import DeepMemoryState, init_deep_memory_weights

        weights = init_deep_memory_weights(heads, dim, DEEP_MEMORY_EXPANSION * dim,
                                           DEEP_MEMORY_DEPTH, generator=gen)
        kwargs["initial_state"] = DeepMemoryState(weights=weights, momentum=None)
        leaves += list(weights)
    elif rule == "titans":
        state = TitansLinearState(torch.zeros(batch, heads, dim, dim),
                                  torch.zeros(batch, heads, dim, dim))
        kwargs["initial_state"] = state
        leaves += [state.memory, state.momentum]
    else:
        kwargs["initial_state"] = torch.zeros(batch, heads, dim, dim)
        leaves.append(kwargs["initial_state"])
    for tensor in leaves:
        tensor.requires_grad_()
    return kwargs, leaves


def make_workload(rule: str, variant: str, length: int, batch: int, heads: int, dim: int,
                  chunk_size: int, seed: int = 0) -> Callable[[], None]:
    """One forward+backward pass of ``rule`` (module level: the memory probe imports it)."""
    fn = _functions(rule, variant)
    kwargs, leaves = _inputs(rule, length, batch, heads, dim, seed)

    def workload() -> None:
        for tensor in leaves:
            tensor.grad = None
        out, _ = fn(**kwargs, chunk_size=chunk_size)
        out.square().mean().backward()

    return workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096],
                        help="sequence lengths T (default: 256 1024 4096)")
    parser.add_argument("--rules", nargs="+", default=list(RULES),
                        help=f"rules to run, from {', '.join(RULES)} (default: all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per cell, median reported (default: 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's current setting)")
    parser.add_argument("--batch", type=int, default=2, help="batch size B (default: 2)")
    parser.add_argument("--heads", type=int, default=4, help="heads H (default: 4)")
    parser.add_argument("--dim", type=int, default=64, help="head dim D (default: 64)")
    parser.add_argument("--chunk-size", type=int, default=64, help="chunk size (default: 64)")
    parser.add_argument("--max-gb", type=float, default=8.0,
                        help="skip a cell whose peak memory, extrapolated linearly in T from "
                             "the same rule's previous length, exceeds this (default: 8)")
    parser.add_argument("--out", default="results/bench",
                        help="folder for ops.json (default: results/bench)")


def _check_args(args: argparse.Namespace) -> None:
    for rule in args.rules:
        if rule not in RULES:
            raise invalid("--rules", repr(rule), f"names from {', '.join(RULES)}")
    for name in ("lengths", "repeats", "threads", "batch", "heads", "dim", "chunk_size"):
        value = getattr(args, name)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item < 1:
                raise invalid(f"--{name.replace('_', '-')}", item, "integers >= 1")
    if not args.max_gb > 0:
        raise invalid("--max-gb", args.max_gb, "a number > 0")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    lengths = sorted(set(args.lengths))

    def config(rule: str, length: int, variant: str) -> dict[str, Any]:
        return {"rule": rule, "variant": variant, "length": length, "batch": args.batch,
                "heads": args.heads, "dim": args.dim, "chunk_size": args.chunk_size}

    # Memory first, in fresh processes. Lengths go up, and a cell whose memory, extrapolated
    # linearly from the previous length, would pass --max-gb is skipped (the per-token
    # references keep every token's state for the backward pass).
    memory: dict[tuple[str, int, str], float] = {}
    skipped: dict[tuple[str, int, str], float] = {}
    for rule in args.rules:
        for variant in VARIANTS:
            previous: tuple[int, float] | None = None
            for length in lengths:
                cell = (rule, length, variant)
                if previous is not None:
                    estimate = previous[1] * length / previous[0]
                    if estimate > args.max_gb * 1024:
                        skipped[cell] = estimate
                        continue
                progress(f"memory {rule} {variant} T={length}")
                memory[cell] = peak_memory_mb(make_workload, threads=threads, **config(*cell))
                previous = (length, memory[cell])
    speed = {}
    for index, cell in enumerate(memory, start=1):
        progress(f"[{index}/{len(memory)}] timing {cell[0]} {cell[2]} T={cell[1]}")
        seconds = time_call(make_workload(**config(*cell)), repeats=args.repeats)
        speed[cell] = args.batch * cell[1] / seconds
    rows = []
    for rule in args.rules:
        for length in lengths:
            row: dict[str, Any] = {
                "rule": rule, "T": length, "B": args.batch, "H": args.heads, "D": args.dim,
                "chunk_size": args.chunk_size, "dtype": "float32", "threads": threads,
            }
            notes = []
            for variant in VARIANTS:
                cell = (rule, length, variant)
                row[f"{variant} tok/s"] = speed.get(cell)
                row[f"{variant} MB"] = memory.get(cell)
                if cell in skipped:
                    notes.append(f"{variant} skipped: ~{skipped[cell] / 1024:.1f} GB estimated")
            if row["chunkwise tok/s"] and row["naive tok/s"]:
                row["speedup"] = row["chunkwise tok/s"] / row["naive tok/s"]
            if row["chunkwise MB"] is not None:
                row["chunkwise KB/token"] = row["chunkwise MB"] * 1024 / (args.batch * length)
            row["note"] = "; ".join(notes) or None
            rows.append(row)
    write_report("ops", rows, COLUMNS, args.out)
    return 0
