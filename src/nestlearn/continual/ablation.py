"""Ablations: one arch, one stream or task, the same budget and seeds, one switch changed at a
time (the paper's ablation rows, docs/paper.md section 7).

A variant is a named list of ``FIELD=VALUE`` model assignments over the arch's defaults. Which
variants fit an arch is decided by applying them to its config: a variant whose field the arch
lacks (``memory.dgd`` on a transformer) is refused by name, never silently run as the base.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestlearn.atomic import atomic_write_json, atomic_write_text
from nestlearn.errors import NestlearnError
from nestlearn.models import ModelConfig
from nestlearn.training.runconfig import set_field


@dataclass(frozen=True)
class Variant:
    """``sets``: the ``FIELD=VALUE`` assignments (model fields) this variant makes."""

    name: str
    description: str
    sets: tuple[str, ...] = ()


# CMS chunk sizes per number of levels: each level updates 4x less often than the one below.
CMS_LEVEL_CHUNKS: dict[int, str] = {1: "[16]", 2: "16,64", 3: "16,64,256", 4: "16,64,256,1024"}

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("base", "the arch's defaults"),
    *(Variant(f"cms-levels-{n}", f"CMS with {n} level(s), chunks {chunks.strip('[]')}",
              (f"cms.chunk_sizes={chunks}",))
      for n, chunks in CMS_LEVEL_CHUNKS.items()),
    Variant("cms-slow", "CMS levels updated 4x less often (chunks 64, 256)",
            ("cms.chunk_sizes=64,256",)),
    Variant("memory-chunk-8", "memory updated every 8 tokens (default 16)",
            ("memory.chunk_size=8",)),
    Variant("memory-chunk-32", "memory updated every 32 tokens (default 16)",
            ("memory.chunk_size=32",)),
    Variant("no-dgd", "plain gradient descent instead of DGD in the memory (Eq. 88)",
            ("memory.dgd=false",)),
    Variant("no-momentum", "no momentum in the memory's update", ("memory.momentum=false",)),
    Variant("no-weight-decay", "no retention gate (alpha = 1)", ("memory.weight_decay=false",)),
    Variant("no-cms", "CMS levels frozen: a plain MLP chain, no in-context update",
            ("cms.frozen=true",)),
    Variant("no-inner-k", "k from a fixed projection, not the inner memory M_k",
            ("memory.adaptive_k=false",)),
    Variant("no-inner-v", "v from a fixed projection, not the inner memory M_v",
            ("memory.adaptive_v=false",)),
    Variant("inner-q", "q from a fifth inner memory M_q (the default keeps q fixed, as the "
            "paper does)", ("memory.adaptive_q=true",)),
)}

# What `--variants paper` runs: the rows of the paper's ablation table that apply here, and
# the level counts.
PAPER_VARIANTS: tuple[str, ...] = (
    "base", "no-dgd", "no-momentum", "no-weight-decay", "no-cms", "no-inner-k", "no-inner-v",
    "inner-q", "cms-levels-1", "cms-levels-3", "cms-levels-4")
GROUPS: dict[str, tuple[str, ...]] = {"paper": PAPER_VARIANTS, "all": tuple(VARIANTS)}


def apply_variant(config: ModelConfig, variant: Variant) -> ModelConfig:
    """``config`` with the variant's assignments; a field the arch lacks is refused by name."""
    for assignment in variant.sets:
        key, _, value = assignment.partition("=")
        try:
            config = set_field(config, key, value)
        except NestlearnError as err:
            raise NestlearnError(f"variant {variant.name!r} does not fit arch "
                                 f"{config.arch!r}: {err}") from None
    return config


def fits(config: ModelConfig, variant: Variant) -> bool:
    try:
        apply_variant(config, variant)
    except NestlearnError:
        return False
    return True


def resolve_variants(names: Sequence[str], config: ModelConfig) -> list[Variant]:
    """The variants named (or a group: ``paper``, ``all``), ``base`` first.

    A group keeps the variants that fit the arch; a variant named alone must fit it."""
    if not names:
        raise NestlearnError("--variants: none given; allowed: "
                             + ", ".join([*GROUPS, *VARIANTS]))
    chosen: list[Variant] = []
    for name in names:
        if name in GROUPS:
            chosen += [VARIANTS[n] for n in GROUPS[name] if fits(config, VARIANTS[n])]
        elif name in VARIANTS:
            apply_variant(config, VARIANTS[name])
            chosen.append(VARIANTS[name])
        else:
            raise NestlearnError(f"--variants: got {name!r}; allowed: "
                                 + ", ".join([*GROUPS, *VARIANTS]))
    unique = list(dict.fromkeys([VARIANTS["base"], *chosen]))
    # variants that end up as the same model would only repeat the base row
    seen: dict[str, str] = {}
    kept = []
    for variant in unique:
        key = json.dumps(apply_variant(config, variant).to_dict(), sort_keys=True)
        if key in seen:
            continue
        seen[key] = variant.name
        kept.append(variant)
    return kept


def variant_label(arch: str, variant: Variant) -> str:
    """The row label of a variant: the report groups rows by it."""
    return arch if variant.name == "base" else f"{arch}:{variant.name}"


def ablation_table(entries: Sequence[dict[str, Any]], metric: str, higher_is_better: bool
                   ) -> str:
    """A markdown table: one line per variant, the metric's mean ± std over seeds, its change
    from the base and the seeds. ``entries``: ``{"variant", "description", "values"}``."""
    base = next((e for e in entries if e["variant"] == "base"), None)
    base_mean = _mean(base["values"]) if base else math.nan
    lines = [f"| variant | what changes | {metric} | vs base | seeds |", "|---|---|---|---|---|"]
    for entry in entries:
        values = [v for v in entry["values"] if v is not None and math.isfinite(v)]
        mean = _mean(values)
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        delta = mean - base_mean
        better = (delta > 0) == higher_is_better
        verdict = "same" if delta == 0 else "better" if better else "worse"
        change = "-" if entry["variant"] == "base" or not math.isfinite(delta) else \
            f"{delta:+.4f} ({verdict})"
        lines.append(f"| {entry['variant']} | {entry['description']} | {mean:.4f}{spread} | "
                     f"{change} | {len(values)} |")
    return "\n".join(lines)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def plot_ablation(entries: Sequence[dict[str, Any]], metric: str, path: Path) -> Path | None:
    """A bar per variant (mean over seeds, each seed a dot); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(entries) + 2), 3.6))
    names = [e["variant"] for e in entries]
    ax.bar(range(len(entries)), [_mean(e["values"]) for e in entries],
           color=["#777777" if n == "base" else "#3b75af" for n in names])
    for index, entry in enumerate(entries):
        ax.plot([index] * len(entry["values"]), entry["values"], "k.", markersize=4)
    ax.set_xticks(range(len(entries)), names, rotation=40, ha="right")
    ax.set_ylabel(metric)
    ax.set_title("ablation (bars: mean over seeds; dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_ablation(out: Path, title: str, entries: Sequence[dict[str, Any]], metric: str,
                   higher_is_better: bool, notes: Sequence[str] = ()) -> Path:
    """``out/ablation.md`` (+ ``ablation.png``, ``ablation.json``); returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_ablation(entries, metric, out / "ablation.png")
    lines = [f"# Ablation: {title}", "", *notes, "",
             f"{metric} ({'higher' if higher_is_better else 'lower'} is better):", "",
             ablation_table(entries, metric, higher_is_better), ""]
    lines.append("![ablation](ablation.png)" if plot else "(no matplotlib: no plot)")
    atomic_write_json(out / "ablation.json", {"title": title, "metric": metric,
                                              "higher_is_better": higher_is_better,
                                              "entries": list(entries)})
    path = out / "ablation.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def task_entry(results: dict[str, Any], arch: str, variant: Variant) -> dict[str, Any]:
    """One variant's entry from a task's ``results.json``: per seed, the mean over the rows of
    the task's first table (e.g. MQAR accuracy over every N)."""
    table = results["tables"][0]
    per_seed: dict[int, list[float]] = {}
    for row in table["rows"]:
        cell = row["archs"].get(arch)
        if cell is None:
            continue
        for seed, value in zip(cell["seeds"], cell["values"], strict=True):
            per_seed.setdefault(seed, []).append(value)
    return {"variant": variant.name, "description": variant.description,
            "sets": list(variant.sets), "seeds": sorted(per_seed),
            "values": [sum(v) / len(v) for _, v in sorted(per_seed.items())],
            "metric": f"{table['title']} ({table['metric']}, mean over rows)"}


def run_task_ablation(task: str, arch: str, variants: Sequence[Variant],
                      seeds: Sequence[int], steps: int | None, out: Path,
                      sets: Sequence[str] = (), quick: bool = False) -> Path:
    """Train ``arch`` on synthetic task ``task`` once per variant (``nestlearn tasks run``
    into ``out/VARIANT/``, so finished variants are reused) and write the ablation table."""
    from nestlearn.tasks.registry import TASK_NAMES
    from nestlearn.tasks.runner import TaskRun, run_task

    if task not in TASK_NAMES:
        raise NestlearnError(f"--task: got {task!r}; allowed: {', '.join(TASK_NAMES)}")
    entries = []
    for variant in variants:
        request = TaskRun(task, (arch,), tuple(seeds), steps, out / variant.name, quick,
                          (*sets, *variant.sets))
        folder = run_task(request, task)
        results = json.loads((folder / "results.json").read_text())
        entries.append(task_entry(results, arch, variant))
    metric = entries[0]["metric"]
    notes = [f"Task `{task}`, arch `{arch}`, seeds {list(seeds)}; each variant's runs are in "
             f"`{out}/VARIANT/{task}/`."]
    return write_ablation(out, f"{task} / {arch}", entries, metric, True, notes)
