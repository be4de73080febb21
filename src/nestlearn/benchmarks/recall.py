"""In-context recall: how fast the Titans memory stores associations, against its step cap.

No outer training: the deep-memory op (``nestlearn.ops.deep_memory``, the op ``NeuralMemory``
runs) starts from freshly initialized weights and reads a stream of N random associations
k -> v (unit-norm keys and values per head) repeated R times, with the gates held fixed:
eta = f * eta_max, theta = f * theta_max, alpha = 1 (no forgetting), where eta_max comes from
the layer's own formula ``derived_eta_max(chunk_step, chunk_size, expansion, theta_max)`` and
f is a gate fraction (1: the caps; 0.5: about the layer's initial gates). After every
repetition the mean recall error ||M(k) - v||^2 / ||v||^2 over the N pairs is measured with
the memory as it stands at that point of the stream (2 = nothing stored, for unit k and v).
Depth, expansion, theta_max and (unless ``--activation`` says otherwise) the activation are
``NeuralMemoryConfig``'s defaults.

A second table is the worst case the cap is derived for: a stream of one repeated key (every
chunk holds identical keys) or of a few keys in random order, gates at their maxima, reporting
whether the weights stay finite and how much they grow. Everything is seeded.

A third table (``--layer-archs``) runs the memory layers themselves as the models build them
(``ModelConfig(arch=...).memory``, at initialization, no outer training): a random input
sequence of N tokens repeated R times; after each repetition the main memory's recall error
over the keys and values the layer generated in that repetition, with the gates it chose (mean
eta / ceiling, theta, 1 - alpha) and the growth of its memories' weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nestlearn.benchmarks.common import format_table, progress, write_report
from nestlearn.errors import invalid
from nestlearn.nn.memory_common import ACTIVATIONS, derived_eta_max
from nestlearn.nn.self_modifying import SelfModifyingTitans
from nestlearn.nn.titans import NeuralMemory, NeuralMemoryConfig
from nestlearn.ops.deep_memory import (
    DeepMemoryState,
    deep_memory,
    deep_memory_apply,
    init_deep_memory_weights,
)

# The layer's defaults, so the probe runs the memory NeuralMemory builds.
LAYER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(NeuralMemoryConfig)}
EXPANSION: int = LAYER_DEFAULTS["expansion"]
DEPTH: int = LAYER_DEFAULTS["depth"]
ACTIVATION: str = LAYER_DEFAULTS["activation"]
THETA_MAX: float = LAYER_DEFAULTS["theta_max"]
# Weights that end above this factor of their initial largest norm count as grown (the limit
# tests/test_nn_memory_stability.py asserts for the layers).
GROWTH_LIMIT = 1.5
# The worst-case stream is fed in segments of this many tokens (a multiple of every chunk
# size offered by default) so the first non-finite segment can be reported.
WORST_SEGMENT = 256

RECALL_BASE_COLUMNS = ["D", "N", "chunk", "gates", "chunk_step", "eta_max"]
RECALL_TAIL_COLUMNS = ["weight growth", "max |w|", "status"]
LAYER_COLUMNS = ["arch", "dim", "heads", "N", "memory", "err r0", "err r1", "err final",
                 "eta / ceiling", "theta", "forget", "weight growth", "inner growth", "status"]
WORST_COLUMNS = ["D", "chunk", "keys", "tokens", "chunk_step", "eta_max", "final error",
                 "weight growth", "max |w|", "non-finite after", "status"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 256],
                        help="memory head widths D (default: 64 256)")
    parser.add_argument("--associations", type=int, nargs="+", default=[64, 256, 512],
                        help="numbers N of key -> value pairs, multiples of every chunk size "
                             "(default: 64 256 512)")
    parser.add_argument("--repetitions", type=int, default=16,
                        help="times R the N pairs are repeated (default: 16)")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 64],
                        help="memory chunk sizes (default: 16 64)")
    parser.add_argument("--chunk-steps", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0],
                        help="chunk_step values eta_max is derived from "
                             "(default: 0.5 1 2 4 8)")
    parser.add_argument("--gate-fractions", type=float, nargs="+", default=[1.0, 0.5],
                        help="eta / eta_max and theta / theta_max held through the stream "
                             "(default: 1.0 0.5)")
    parser.add_argument("--worst-chunk-steps", type=float, nargs="+",
                        default=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
                        help="chunk_step values of the worst-case streams "
                             "(default: 0.5 1 2 4 8 16 32)")
    parser.add_argument("--worst-keys", type=int, nargs="+", default=[1, 4],
                        help="distinct keys of each worst-case stream, in random order; 1 = one "
                             "repeated key (default: 1 4)")
    parser.add_argument("--worst-length", type=int, default=4096,
                        help="tokens of each worst-case stream (default: 4096)")
    parser.add_argument("--activation", default=ACTIVATION,
                        help=f"the memory MLP's non-linearity, from {', '.join(ACTIVATIONS)} "
                             f"(default: {ACTIVATION}, the layer's)")
    parser.add_argument("--heads", type=int, default=2,
                        help="independent memories (heads) per run, averaged (default: 2)")
    parser.add_argument("--layer-archs", nargs="*", default=[],
                        help="memory archs whose layers (model defaults) are measured too, "
                             "e.g. titans hope (default: none)")
    parser.add_argument("--layer-dim", type=int, default=64,
                        help="model width of the measured layers (default: 64)")
    parser.add_argument("--layer-heads", type=int, default=4,
                        help="heads of the measured layers (default: 4)")
    parser.add_argument("--layer-memory", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="memory fields set on every measured layer, as JSON values "
                             "(e.g. chunk_size=16 eta_init=0.9)")
    parser.add_argument("--layers-only", action="store_true",
                        help="measure only the layers (skip the op tables)")
    parser.add_argument("--seed", type=int, default=0, help="seed of keys, values and weights")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's current setting)")
    parser.add_argument("--no-plot", action="store_true", help="skip recall.png")
    parser.add_argument("--out", default="results/bench",
                        help="folder for recall.json, recall-worst.json, recall.md, recall.png "
                             "(default: results/bench)")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("head_dims", "associations", "repetitions", "chunk_sizes", "worst_keys",
                 "worst_length", "heads", "threads", "layer_dim", "layer_heads"):
        value = getattr(args, name)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item < 1:
                raise invalid(f"--{name.replace('_', '-')}", item, "integers >= 1")
    for name in ("chunk_steps", "worst_chunk_steps"):
        for item in getattr(args, name):
            if not item > 0:
                raise invalid(f"--{name.replace('_', '-')}", item, "numbers > 0")
    for item in args.gate_fractions:
        if not 0 < item <= 1:
            raise invalid("--gate-fractions", item, "numbers in (0, 1]")
    if args.activation not in ACTIVATIONS:
        raise invalid("--activation", repr(args.activation), ", ".join(ACTIVATIONS))
    for count in args.associations:
        for chunk in [] if args.layers_only else args.chunk_sizes:
            if count % chunk:
                # Recall is read at the end of each repetition; a repetition that ended inside
                # a chunk would leave that chunk's tokens unapplied in the layer's semantics.
                raise invalid("--associations", count,
                              f"multiples of every chunk size {args.chunk_sizes}")


def _unit(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(shape, generator=generator), dim=-1)


def _memory(heads: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    return init_deep_memory_weights(heads, dim, EXPANSION * dim, DEPTH, generator=generator)


def _largest_norm(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per batch element: the largest Frobenius norm of any matrix of any head, ``[B]``.

    Measured against the largest initial matrix: W_L starts 10x smaller and is meant to grow
    as the memory stores, so its growth relative to its own start is not a sign of blow-up."""
    return torch.stack([w.norm(dim=(-2, -1)).flatten(1).amax(1) for w in weights]).amax(0)


def _initial_norm(weights: tuple[torch.Tensor, ...]) -> float:
    """The largest Frobenius norm of any initial (``[H, out, in]``) matrix."""
    return max(float(w.norm(dim=(-2, -1)).max()) for w in weights)


def _largest_entry(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per batch element: max |w| over every weight, ``[B]`` (NaN if any entry is NaN)."""
    return torch.stack([w.abs().flatten(1).amax(1) for w in weights]).amax(0)


def _recall_error(weights: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor,
                  activation: str) -> torch.Tensor:
    """Mean over pairs and heads of ||M(k) - v||^2 / ||v||^2 per batch element, ``[B]``."""
    predicted = deep_memory_apply(weights, k, activation)
    return ((predicted - v).square().sum(-1) / v.square().sum(-1)).mean((1, 2))


def _status(finite: bool, growth: float) -> str:
    if not finite:
        return "non-finite"
    return "grew" if growth >= GROWTH_LIMIT else "ok"


def _gates(settings: list[tuple[float, float]], chunk: int, length: int, heads: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """alpha, eta, theta ``[B, length, H]`` for (chunk_step, gate fraction) per batch element."""
    eta_max = [derived_eta_max(step, chunk, EXPANSION, THETA_MAX) for step, _ in settings]
    eta = torch.tensor([m * f for m, (_, f) in zip(eta_max, settings, strict=True)])
    theta = torch.tensor([f * THETA_MAX for _, f in settings])
    shape = (len(settings), length, heads)
    return (torch.ones(shape), eta[:, None, None].expand(shape).contiguous(),
            theta[:, None, None].expand(shape).contiguous(), eta_max)


def recall_rows(dim: int, count: int, repetitions: int, chunk: int, steps: list[float],
                fractions: list[float], heads: int, seed: int,
                activation: str = ACTIVATION) -> list[dict[str, Any]]:
    """One row per (gate fraction, chunk_step): recall error before and after each repetition.

    Every setting is one batch element of the same op call (same pairs, same initial weights).
    """
    generator = torch.Generator().manual_seed(seed)
    keys = _unit((1, count, heads, dim), generator)
    values = _unit((1, count, heads, dim), generator)
    initial = _memory(heads, dim, generator)
    settings = [(step, fraction) for fraction in fractions for step in steps]
    batch = len(settings)
    alpha, eta, theta, eta_max = _gates(settings, chunk, count, heads)
    k, v = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
    state = DeepMemoryState(initial, None)
    errors = [_recall_error(initial, keys, values, activation).expand(batch)]
    for _ in range(repetitions):
        # N is a multiple of the chunk, so chaining repetitions is exactly one pass.
        _, state = deep_memory(k, k, v, alpha, eta, theta, initial_state=state,
                               objective="l2", activation=activation, output_final_state=True,
                               chunk_size=chunk)
        errors.append(_recall_error(state.weights, k, v, activation))
    curves = torch.stack(errors, 1)
    growth = _largest_norm(state.weights) / _initial_norm(initial)
    largest = _largest_entry(state.weights)
    rows = []
    for index, (step, fraction) in enumerate(settings):
        finite = all(bool(torch.isfinite(w[index]).all()) for w in state.weights)
        rows.append({
            "D": dim, "N": count, "chunk": chunk, "gates": fraction, "chunk_step": step,
            "eta_max": eta_max[index], "repetitions": repetitions, "heads": heads,
            "activation": activation,
            "errors": [float(e) for e in curves[index]],
            "weight growth": float(growth[index]), "max |w|": float(largest[index]),
            "finite": finite, "status": _status(finite, float(growth[index])),
        })
    return rows


def worst_rows(dim: int, chunk: int, distinct: int, length: int, steps: list[float],
               heads: int, seed: int, activation: str = ACTIVATION) -> list[dict[str, Any]]:
    """The cap's worst case: ``distinct`` keys (1 = one repeated key) in random order, gates
    at their maxima, one batch element per chunk_step."""
    generator = torch.Generator().manual_seed(seed)
    table_k = _unit((1, distinct, heads, dim), generator)
    table_v = _unit((1, distinct, heads, dim), generator)
    order = torch.randint(0, distinct, (length,), generator=generator)
    initial = _memory(heads, dim, generator)
    settings = [(step, 1.0) for step in steps]
    batch = len(settings)
    alpha, eta, theta, eta_max = _gates(settings, chunk, length, heads)
    k = table_k[:, order].expand(batch, -1, -1, -1)
    v = table_v[:, order].expand(batch, -1, -1, -1)
    state = DeepMemoryState(initial, None)
    broke: list[int | None] = [None] * batch
    segment = chunk * max(1, WORST_SEGMENT // chunk)
    for start in range(0, length, segment):
        part = slice(start, start + segment)
        _, state = deep_memory(k[:, part], k[:, part], v[:, part], alpha[:, part], eta[:, part],
                               theta[:, part], initial_state=state, objective="l2",
                               activation=activation, output_final_state=True, chunk_size=chunk)
        finite = torch.stack([torch.isfinite(w).flatten(1).all(1) for w in state.weights]).all(0)
        for index in range(batch):
            if broke[index] is None and not bool(finite[index]):
                broke[index] = min(start + segment, length)
    tables = (table_k.expand(batch, -1, -1, -1), table_v.expand(batch, -1, -1, -1))
    errors = _recall_error(state.weights, *tables, activation)
    growth = _largest_norm(state.weights) / _initial_norm(initial)
    largest = _largest_entry(state.weights)
    rows = []
    for index, (step, _) in enumerate(settings):
        finite = broke[index] is None
        rows.append({
            "D": dim, "chunk": chunk, "keys": distinct, "tokens": length, "chunk_step": step,
            "eta_max": eta_max[index], "heads": heads, "activation": activation,
            "final error": float(errors[index]),
            "weight growth": float(growth[index]), "max |w|": float(largest[index]),
            "non-finite after": broke[index], "finite": finite,
            "status": _status(finite, float(growth[index])),
        })
    return rows


def parse_memory_fields(items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs (values as JSON, else strings) as a dict of memory fields."""
    fields: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise invalid("--layer-memory", repr(item), "FIELD=VALUE pairs")
        try:
            fields[name] = json.loads(text)
        except json.JSONDecodeError:
            fields[name] = text
    return fields


def _growth(weights: tuple[torch.Tensor, ...], initial: tuple[torch.Tensor, ...]) -> float:
    return float(_largest_norm(weights).max()) / _initial_norm(initial)


def layer_rows(arch: str, dim: int, heads: int, count: int, repetitions: int, seed: int,
               fields: Mapping[str, Any]) -> dict[str, Any]:
    """The main memory of ``arch``'s layer (the model's memory config with ``fields`` set) at
    initialization, reading N random input vectors repeated R times (see the module doc)."""
    from nestlearn.models import ModelConfig

    config = ModelConfig(arch=arch, dim=dim, heads=heads, memory=dict(fields)).memory
    if config is None:
        raise invalid("--layer-archs", arch, "archs with a memory (titans, titans-mag, hope)")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = (NeuralMemory if isinstance(config, NeuralMemoryConfig) else SelfModifyingTitans)(
        config)
    x = torch.randn(1, count, dim, generator=generator)
    state = layer.init_state(1)
    initial = tuple(state.memory.chunk_start.weights)
    inner_initial = tuple(state.inner.chunk_start.weights) if hasattr(state, "inner") else None
    errors: list[float] = []
    for _ in range(repetitions + 1):
        if isinstance(layer, NeuralMemory):
            inputs, _ = layer.memory_inputs(x, state.conv_tail)
        else:
            inputs, _, _ = layer.memory_inputs(x, state)
        # Recall of this repetition's pairs by the memory before it reads them again.
        errors.append(float(_recall_error(state.memory.chunk_start.weights, inputs.k, inputs.v,
                                          config.activation).mean()))
        _, state = layer(x, state)
    ceiling = config.resolved_eta_max
    weights = state.memory.chunk_start.weights
    finite = all(bool(torch.isfinite(w).all()) for w in weights)
    growth = _growth(weights, initial)
    row = {
        "arch": arch, "dim": dim, "heads": heads, "N": count, "repetitions": repetitions,
        "memory": " ".join(f"{k}={v}" for k, v in fields.items()) or "defaults",
        "chunk_size": config.chunk_size, "eta ceiling": ceiling, "errors": errors,
        "err r0": errors[0], "err r1": errors[1], "err final": errors[-1],
        "eta / ceiling": float(inputs.eta.mean()) / ceiling,
        "theta": float(inputs.theta.mean()) if inputs.theta is not None else 0.0,
        "forget": float(1 - inputs.alpha.mean()),
        "weight growth": growth, "inner growth": None, "finite": finite,
    }
    if inner_initial is not None:
        row["inner growth"] = _growth(state.inner.chunk_start.weights, inner_initial)
        row["inner eta ceiling"] = config.resolved_inner_eta_max
    row["status"] = _status(finite, growth)
    return row


def checkpoints(repetitions: int) -> list[int]:
    """The repetitions shown in the table: 0 (before), 1, R/4, R/2, R."""
    return sorted({0, 1, repetitions // 4, repetitions // 2, repetitions})


def summary(rows: list[dict[str, Any]], steps: list[float]) -> str:
    """Final recall error per chunk_step (columns) for each D, N, chunk and gate fraction."""
    groups: dict[tuple, dict[float, dict[str, Any]]] = {}
    for row in rows:
        key = (row["D"], row["N"], row["chunk"], row["gates"])
        groups.setdefault(key, {})[row["chunk_step"]] = row
    table = []
    for (dim, count, chunk, fraction), by_step in groups.items():
        line: dict[str, Any] = {"D": dim, "N": count, "chunk": chunk, "gates": fraction}
        for step in steps:
            row = by_step[step]
            mark = "" if row["status"] == "ok" else f" ({row['status']})"
            line[f"step {step:g}"] = f"{row['errors'][-1]:.3g}{mark}"
        table.append(line)
    return format_table(table, ["D", "N", "chunk", "gates"] + [f"step {s:g}" for s in steps])


def plot_curves(rows: list[dict[str, Any]], count: int, path: Path) -> None:
    """Recall error vs repetition per chunk_step: one panel per (D, chunk) at N = ``count``;
    solid lines at the largest gate fraction, dashed at the smallest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [row for row in rows if row["N"] == count]
    panels = sorted({(row["D"], row["chunk"]) for row in chosen})
    fractions = sorted({row["gates"] for row in chosen}, reverse=True)
    steps = sorted({row["chunk_step"] for row in chosen})
    colors = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, (dim, chunk) in zip(axes[0], panels, strict=True):
        for row in chosen:
            if (row["D"], row["chunk"]) != (dim, chunk) or row["gates"] not in (
                    fractions[0], fractions[-1]):
                continue
            color = colors(steps.index(row["chunk_step"]) / max(1, len(steps) - 1))
            solid = row["gates"] == fractions[0]
            axis.plot(row["errors"], color=color, linestyle="-" if solid else "--",
                      label=f"step {row['chunk_step']:g}" if solid else None)
        axis.set_title(f"D {dim}, chunk {chunk}, N {count}")
        axis.set_xlabel("repetition")
        axis.set_ylabel("recall error")
        # 2 is "nothing stored"; a diverging run leaves the panel instead of flattening it.
        axis.set_ylim(0, 2.3)
    axes[0][0].legend(fontsize=7, title=f"gates {fractions[0]:g} (dashed {fractions[-1]:g})",
                      title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    steps = sorted(set(args.chunk_steps))
    fractions = sorted(set(args.gate_fractions), reverse=True)
    rows: list[dict[str, Any]] = []
    worst: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    fields = parse_memory_fields(args.layer_memory)
    with torch.no_grad():
        for arch in args.layer_archs:
            for count in sorted(set(args.associations)):
                progress(f"layer {arch} N={count}")
                layers.append(layer_rows(arch, args.layer_dim, args.layer_heads, count,
                                         args.repetitions, args.seed, fields))
        for dim in [] if args.layers_only else args.head_dims:
            for count in sorted(set(args.associations)):
                for chunk in args.chunk_sizes:
                    progress(f"recall D={dim} N={count} chunk={chunk}")
                    rows += recall_rows(dim, count, args.repetitions, chunk, steps, fractions,
                                        args.heads, args.seed, args.activation)
            for chunk in args.chunk_sizes:
                for distinct in args.worst_keys:
                    progress(f"worst case D={dim} chunk={chunk} keys={distinct}")
                    worst += worst_rows(dim, chunk, distinct, args.worst_length,
                                        sorted(set(args.worst_chunk_steps)), args.heads,
                                        args.seed, args.activation)
    if layers:
        write_report("recall-layers", layers, LAYER_COLUMNS, out)
    if args.layers_only:
        return 0
    shown = checkpoints(args.repetitions)
    for row in rows:
        for rep in shown:
            row[f"err r{rep}"] = row["errors"][rep]
    columns = RECALL_BASE_COLUMNS + [f"err r{rep}" for rep in shown] + RECALL_TAIL_COLUMNS
    write_report("recall", rows, columns, out)
    write_report("recall-worst", worst, WORST_COLUMNS, out)
    table = summary(rows, steps)
    print(table)
    counts = sorted(set(args.associations))
    plotted = counts[len(counts) // 2]
    plot = ""
    if not args.no_plot:
        try:
            plot_curves(rows, plotted, out / "recall.png")
            plot = f"\n![recall error vs repetition, N {plotted}](recall.png)\n"
        except ImportError:
            progress("matplotlib is not installed: no recall.png")
    (out / "recall.md").write_text(
        "# In-context recall\n\n"
        f"Recall error after {args.repetitions} repetitions (2 = nothing stored), per "
        f"chunk_step; activation {args.activation}, heads {args.heads}, seed {args.seed}, threads "
        f"{torch.get_num_threads()}.\n\n{table}\n{plot}\n"
        f"Worst case, gates at their maxima:\n\n{format_table(worst, WORST_COLUMNS)}\n")
    print(f"wrote {out / 'recall.md'}")
    return 0
