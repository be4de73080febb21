"""Float64 parity of the chunkwise ops against their token-by-token references on a device.

For ``deep_memory`` (momentum on, with and without DGD), ``titans_linear``,
``gated_delta_rule`` and ``gated_linear_attention``: the relative error
``||fast - naive|| / ||naive||`` of the outputs, the final state and the gradients of every
input (the initial state's included), the largest of each op printed. Exit code 1 when any
is above ``--tolerance`` (default 1e-10), 2 when ``--device cuda`` has no CUDA device.

The test suite runs the same comparisons on CPU (``tests/test_ops_*.py``); this script is
for a GPU machine (``bench/gpu_check.sh``), where the kernels differ. ``--compile BACKEND``
also runs the deep memory with its chunk step compiled (``nestlearn.ops.set_compile``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from nestlearn.benchmarks.parity_table import (
    ParityTable,
    check_positive,
    device_missing,
    device_name,
)
from nestlearn.ops import (
    DeepMemoryState,
    TitansLinearState,
    deep_memory,
    deep_memory_naive,
    gated_delta_rule,
    gated_delta_rule_naive,
    gated_linear_attention,
    gated_linear_attention_naive,
    init_deep_memory_weights,
    set_compile,
    titans_linear,
    titans_linear_naive,
)
from nestlearn.ops.deep_memory import _chunk_step as compiled_chunk_step
from nestlearn.state import tensors

DTYPE = torch.float64


def make_inputs(batch: int, length: int, heads: int, dim: int, device: str,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Queries, unit-norm keys, values and gates inside their ranges (well conditioned)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, length, heads, generator=gen, dtype=DTYPE)

    k = rand(batch, length, heads, dim)
    inputs = {"q": rand(batch, length, heads, dim), "k": k / k.norm(dim=-1, keepdim=True),
              "v": rand(batch, length, heads, dim), "alpha": uniform(0.6, 1.0),
              "eta": uniform(0.05, 0.6), "theta": uniform(0.3, 0.9),
              "memory": rand(batch, heads, dim, dim), "momentum": rand(batch, heads, dim, dim)}
    return {name: value.to(device) for name, value in inputs.items()}


def _linear_case(rule: str, fast: Callable, naive: Callable, gates: tuple[str, ...]
                 ) -> Callable[[dict[str, torch.Tensor], int, bool], list[torch.Tensor]]:
    def run(x: dict[str, torch.Tensor], chunk_size: int, use_naive: bool) -> list[torch.Tensor]:
        state: Any = x["memory"]
        if rule == "titans_linear":
            state = TitansLinearState(x["memory"], x["momentum"])
        out, final = (naive if use_naive else fast)(
            x["q"], x["k"], x["v"], *(x[g] for g in gates), initial_state=state,
            output_final_state=True, chunk_size=chunk_size)
        return [out, *tensors(final)]
    return run


def _deep_case(dgd: bool) -> Callable[[dict[str, torch.Tensor], int, bool], list[torch.Tensor]]:
    def run(x: dict[str, torch.Tensor], chunk_size: int, use_naive: bool) -> list[torch.Tensor]:
        state = DeepMemoryState(tuple(x[name] for name in sorted(x) if name.startswith("W")),
                                tuple(x[name] for name in sorted(x) if name.startswith("S")))
        out, final = (deep_memory_naive if use_naive else deep_memory)(
            x["q"], x["k"], x["v"], x["alpha"], x["eta"], x["theta"], initial_state=state,
            dgd=dgd, output_final_state=True, chunk_size=chunk_size)
        return [out, *tensors(final)]
    return run


def deep_inputs(x: dict[str, torch.Tensor], hidden: int, seed: int = 1
                ) -> dict[str, torch.Tensor]:
    """``x`` with a 2-layer memory MLP's weights (W1, W2) and momenta (S1, S2)."""
    gen = torch.Generator().manual_seed(seed)
    batch, _, heads, dim = x["q"].shape
    weights = init_deep_memory_weights(heads, dim, hidden, 2, generator=gen, dtype=DTYPE)
    out = {name: value for name, value in x.items() if name not in ("memory", "momentum")}
    for index, weight in enumerate(weights, start=1):
        out[f"W{index}"] = (2 * weight).to(x["q"].device)  # a sizeable error in every layer
        momentum = 0.1 * torch.randn(batch, *weight.shape, generator=gen, dtype=DTYPE)
        out[f"S{index}"] = momentum.to(x["q"].device)
    return out


def relative_errors(run: Callable[[dict[str, torch.Tensor], int, bool], list[torch.Tensor]],
                    x: dict[str, torch.Tensor], chunk_size: int) -> dict[str, float]:
    """Largest relative error of the outputs and final state, and of the gradients."""
    results = []
    for use_naive in (False, True):
        leaves = {name: value.detach().clone().requires_grad_() for name, value in x.items()}
        got = run(leaves, chunk_size, use_naive)
        # a random projection of every result, so each gradient path is exercised
        gen = torch.Generator().manual_seed(7)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=DTYPE).to(t.device)).sum()
                   for t in got)
        # inputs a rule does not take (a linear rule's theta) get no gradient from either form
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        results.append(([t.detach() for t in got], list(grads)))

    def error(fast: torch.Tensor | None, naive: torch.Tensor | None) -> float:
        if fast is None or naive is None:
            return 0.0 if fast is None and naive is None else float("inf")
        return ((fast - naive).norm() / naive.norm().clamp_min(1e-300)).item()

    def worst(fast: list[torch.Tensor | None], naive: list[torch.Tensor | None]) -> float:
        if len(fast) != len(naive):
            return float("inf")
        return max(error(f, n) for f, n in zip(fast, naive, strict=True))

    (fast_out, fast_grad), (naive_out, naive_grad) = results
    return {"outputs+state": worst(fast_out, naive_out), "gradients": worst(fast_grad, naive_grad)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where the ops run (default: cuda)")
    parser.add_argument("--batch", type=int, default=2, help="B (default: 2)")
    parser.add_argument("--length", type=int, default=200,
                        help="T; not a multiple of the chunk, so a short last chunk is "
                             "included (default: 200)")
    parser.add_argument("--heads", type=int, default=2, help="H (default: 2)")
    parser.add_argument("--dim", type=int, default=16, help="D (default: 16)")
    parser.add_argument("--hidden", type=int, default=32,
                        help="deep memory's hidden width (default: 32)")
    parser.add_argument("--chunk-size", type=int, default=32, help="chunk (default: 32)")
    parser.add_argument("--tolerance", type=float, default=1e-10,
                        help="largest relative error allowed (default: 1e-10)")
    parser.add_argument("--compile", choices=("inductor", "aot_eager"), default=None,
                        help="also run the deep memory with its chunk step compiled by this "
                             "torch.compile backend (default: not)")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("batch", "length", "heads", "dim", "hidden", "chunk_size"))
    if device_missing("gpu_parity", args.device):
        return 2

    x = make_inputs(args.batch, args.length, args.heads, args.dim, args.device)
    deep_x = deep_inputs(x, args.hidden)
    cases: list[tuple[str, Callable, dict[str, torch.Tensor], str | None]] = [
        ("deep_memory", _deep_case(False), deep_x, None),
        ("deep_memory dgd", _deep_case(True), deep_x, None),
        ("titans_linear", _linear_case("titans_linear", titans_linear, titans_linear_naive,
                                       ("alpha", "eta", "theta")), x, None),
        ("delta_rule", _linear_case("delta_rule", gated_delta_rule, gated_delta_rule_naive,
                                    ("alpha", "eta")), x, None),
        ("linear_attention", _linear_case("linear_attention", gated_linear_attention,
                                          gated_linear_attention_naive, ("alpha", "eta")),
         x, None),
    ]
    if args.compile:
        cases.append((f"deep_memory dgd, compiled ({args.compile})",
                      _deep_case(True), deep_x, args.compile))
    print(f"float64 parity on {args.device} ({device_name(args.device)}), B={args.batch} "
          f"T={args.length} H={args.heads} D={args.dim} chunk {args.chunk_size}, "
          f"tolerance {args.tolerance:g}")
    table = ParityTable("op", ("outputs+state rel err", "gradients rel err"), args.tolerance)
    for label, run, inputs, backend in cases:
        if backend is not None:
            set_compile(True, backend)
        try:
            errors = relative_errors(run, inputs, args.chunk_size)
        finally:
            set_compile(None)
        # a compile that failed ran eagerly: its row would say nothing about compiling
        compiled = backend is None or (not compiled_chunk_step.failed
                                       and backend in compiled_chunk_step.compiled)
        if not compiled:
            label = f"{label}: compile failed, ran eagerly"
        table.row(label, (errors["outputs+state"], errors["gradients"]), ok=compiled)
    return table.verdict()


if __name__ == "__main__":
    sys.exit(main())
