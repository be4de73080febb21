"""Results across seeds: one summary per table (mean, spread and every seed's value per arch and
group), written as JSON and as a markdown report."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from nestlearn.tasks.spec import Table, TaskSpec


def key_label(spec: TaskSpec, table: Table, key: Sequence[int]) -> str:
    """A group's name in a report: ``pairs 16``, ``distance 8-15``, ``range 33-64``."""
    parts = []
    for tag, value in zip(table.tags, key, strict=True):
        if tag in spec.labels and value in spec.labels[tag]:
            parts.append(spec.labels[tag][value])
        elif tag in table.buckets:
            parts.append(f"{value}-{2 * value - 1}" if value > 1 else str(value))
        elif tag == "depth":
            parts.append(f"{value}%")
        else:
            parts.append(str(value))
    return ", ".join(parts)


def summarize(spec: TaskSpec, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per table: its rows (groups), each with every arch's seeds, values, mean and
    sample standard deviation (0 with one seed)."""
    archs = list(dict.fromkeys(run["arch"] for run in runs))
    runs = [run for run in runs if "failed" not in run]
    tables = []
    for table in spec.tables:
        keys = sorted({tuple(row["key"]) for run in runs for row in run["tables"][table.title]})
        rows = []
        for key in keys:
            cells = {}
            for arch in archs:
                found = [(run["seed"], row["value"]) for run in runs if run["arch"] == arch
                         for row in run["tables"][table.title] if tuple(row["key"]) == key]
                if not found:
                    continue
                values = [v for _, v in found]
                cells[arch] = {"seeds": [s for s, _ in found], "values": values,
                               "mean": statistics.fmean(values),
                               "std": statistics.stdev(values) if len(values) > 1 else 0.0}
            rows.append({"key": list(key), "label": key_label(spec, table, key),
                         "archs": cells})
        tables.append({"title": table.title, "tags": list(table.tags), "metric": table.metric,
                       "chance": spec.chance.get(table.title), "rows": rows})
    return tables


def _cell(cell: dict[str, Any] | None, metric: str) -> str:
    if cell is None:
        return "-"
    digits = 2 if metric == "loss" else 3
    if len(cell["values"]) == 1:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def markdown(spec: TaskSpec, summary: list[dict[str, Any]], runs: Sequence[dict[str, Any]],
             command: str) -> str:
    """The report: what ran (budget, models, seeds, final training loss) and every table."""
    archs = list(dict.fromkeys(run["arch"] for run in runs))
    lines = [f"# {spec.name}", "", spec.description + ".", "",
             f"Last command: `{command}` (the report covers every run in the folder with "
             "these settings, listed below; runs of other archs or seeds came from earlier "
             "commands that differ only in `--archs` / `--seeds`)", "",
             f"Budget: {spec.budget.steps} steps of {spec.budget.batch_size} examples, "
             f"AdamW lr {spec.budget.lr} (warmup, cosine), loss on answer tokens only. "
             f"Settings: {spec.settings}.", "",
             "| arch | parameters | seeds | final training loss (mean of last 10% of steps) |",
             "|---|---|---|---|"]
    for arch in archs:
        own = [run for run in runs if run["arch"] == arch and "failed" not in run]
        failed = [run for run in runs if run["arch"] == arch and "failed" in run]
        if own:
            finals = [run["final_loss"] for run in own]
            spread = f" ± {statistics.stdev(finals):.3f}" if len(finals) > 1 else ""
            lines.append(f"| {arch} | {own[0]['parameters']:,} | "
                         f"{', '.join(str(run['seed']) for run in own)} | "
                         f"{statistics.fmean(finals):.3f}{spread} |")
        for run in failed:
            lines.append(f"| {arch} | - | {run['seed']} | failed: {run['failed']} |")
    lines.append("")
    lines += _gate_lines(runs)
    for table in summary:
        chance = f" (chance {table['chance']:.3f})" if table["chance"] is not None else ""
        lines += [f"## {table['title']}{chance}", "",
                  f"mean ± standard deviation over seeds; metric: {table['metric']}", "",
                  "| " + " / ".join(table["tags"]) + " | " + " | ".join(archs) + " |",
                  "|---" * (len(archs) + 1) + "|"]
        for row in table["rows"]:
            cells = [_cell(row["archs"].get(arch), table["metric"]) for arch in archs]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _gate_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The Titans memories' gates (``nestlearn.tasks.gates``), one row per run and layer."""
    rows = [(run, gate) for run in runs for gate in run.get("gates") or ()]
    if not rows:
        return []
    lines = ["## memory gates (mean over evaluation tokens)", "",
             "| arch | seed | layer | chunk | eta_max | eta / eta_max | theta | forget |",
             "|---|---|---|---|---|---|---|---|"]
    for run, gate in rows:
        theta = "-" if gate["theta"] is None else f"{gate['theta']:.3f}"
        lines.append(f"| {run['arch']} | {run['seed']} | {gate['layer']} | "
                     f"{gate['chunk_size']} | {gate['eta_max']:.2e} | "
                     f"{gate['eta_fraction']:.3f} | {theta} | {gate['forget']:.2e} |")
    return [*lines, ""]
