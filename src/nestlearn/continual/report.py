"""results.json for a continual-learning suite: save, load, aggregate over seeds, and render as
``report.md`` with PNG plots.

:func:`aggregate` groups the rows by (method, arch) and gives, for every metric and resource,
the mean, the sample standard deviation (n - 1; ``nan`` for one seed), the min, the max and how
many seeds had a finite value; plus the mean ``R`` and ``R_loss`` over seeds. :func:`write_report`
renders that as a markdown table and, with matplotlib (the ``plots`` extra), as PNGs: the mean
``R`` heatmaps, forgetting curves (each task's score after every stage), per-task loss over the
stream, the training-loss curve and, when rows carry ``extras["monitor"]``, monitor traces.
Without matplotlib the markdown is written and says the plots were skipped.

In results.json a metric that is undefined (``nan``, e.g. backward transfer with one task) is
written as ``null``, so the file stays strict JSON; it reads back as ``nan``.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nestlearn.atomic import atomic_write_json, atomic_write_text
from nestlearn.continual.metrics import LOSS_KEYS, SCORE_KEYS, as_matrix, summarize
from nestlearn.errors import NestlearnError

FORMAT_VERSION = 1
RESOURCE_KEYS: tuple[str, ...] = ("wall_s", "tokens", "tokens_per_s", "peak_rss_mb", "energy_j")
MONITOR_FIELDS: tuple[str, ...] = ("drift", "update_norm", "surprise", "guard_loss")

SCORE_LABELS = {
    "average_accuracy": "avg {score}",
    "backward_transfer": "BWT",
    "forward_transfer": "FWT",
    "forgetting": "forgetting",
    "average_incremental_accuracy": "avg incremental {score}",
}
LOSS_LABELS = {
    "loss_average": "avg {loss}",
    "loss_backward_transfer": "{loss} BWT",
    "loss_forward_transfer": "{loss} FWT",
    "loss_forgetting": "{loss} forgetting",
    "loss_average_incremental": "avg incremental {loss}",
}
SCORE_SIGNS = ("Signs (scores, higher is better): BWT < 0 means old tasks got worse; FWT > 0 "
               "means earlier tasks helped a task before it was trained; forgetting > 0 means "
               "the best score reached on a task was lost.")
LOSS_SIGNS = ("Signs ({loss}, lower is better): {loss} BWT > 0 means old tasks got worse; "
              "{loss} FWT < 0 means earlier tasks helped; {loss} forgetting > 0 means the lowest "
              "{loss} reached on a task was lost.")


# --- results.json ---------------------------------------------------------------------------

def _row_problem(row: Any, index: int) -> str | None:
    if not isinstance(row, dict):
        return f"rows[{index}]: got {type(row).__name__}; allowed: an object"
    for key, kind in (("method", str), ("arch", str), ("seed", int), ("R", list)):
        if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
            return (f"rows[{index}].{key}: got {row.get(key)!r}; allowed: "
                    f"{'a list of lists' if kind is list else 'an ' + kind.__name__}")
    return None


def validate_results(results: Any) -> dict[str, Any]:
    """Check the parts of the results.json schema the report reads; returned unchanged."""
    if not isinstance(results, dict):
        raise NestlearnError(f"results: got {type(results).__name__}; allowed: an object with "
                             "format_version and rows")
    version = results.get("format_version")
    if version != FORMAT_VERSION:
        raise NestlearnError(f"results.format_version: got {version!r}; allowed: "
                             f"{FORMAT_VERSION}")
    rows = results.get("rows")
    if not isinstance(rows, list) or not rows:
        raise NestlearnError(f"results.rows: got {rows!r:.60}; allowed: a non-empty list")
    sizes = set()
    for index, row in enumerate(rows):
        problem = _row_problem(row, index)
        if problem:
            raise NestlearnError(problem)
        sizes.add(as_matrix(row["R"], f"rows[{index}].R").shape[0])
        if row.get("R_loss") is not None:
            as_matrix(row["R_loss"], f"rows[{index}].R_loss")
    tasks = (results.get("stream") or {}).get("tasks")
    if len(sizes) != 1 or (tasks is not None and sizes != {len(tasks)}):
        raise NestlearnError(f"results.rows: got R sizes {sorted(sizes)} for "
                             f"{'?' if tasks is None else len(tasks)} stream tasks; allowed: "
                             "every R is T x T with T the number of tasks")
    return results


def _jsonable(value: Any) -> Any:
    if hasattr(value, "detach"):
        value = value.detach().cpu().tolist()
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_results(out_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write ``out_dir/results.json`` atomically (``nan`` as ``null``); returns its path."""
    validate_results(results)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    atomic_write_json(path, _jsonable(results))
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and check a results.json."""
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NestlearnError(f"results: got {path} that does not exist; allowed: a "
                             "results.json file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NestlearnError(f"results: got {path} that is not JSON ({error}); allowed: a "
                             "results.json file") from None
    return validate_results(results)


# --- aggregation ----------------------------------------------------------------------------

def _number(value: Any) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return math.nan


def row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A row's metrics: computed from its matrices, then its own ``metrics`` on top (so extra
    keys such as bits per byte come through)."""
    out = summarize(row["R"], row.get("baseline"), row.get("R_loss"), row.get("baseline_loss"))
    out.update({key: _number(value) for key, value in (row.get("metrics") or {}).items()})
    return out


def stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (n - 1), min and max of the finite ``values``, and their count ``n``."""
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    n = int(finite.size)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(finite.mean()),
            "std": float(finite.std(ddof=1)) if n > 1 else math.nan,
            "min": float(finite.min()), "max": float(finite.max()), "n": n}


def _mean_matrix(matrices: list[Any]) -> list[list[float]] | None:
    if not matrices or any(m is None for m in matrices):
        return None
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in matrices])
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(stack).sum(axis=0)
        mean = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)
    return mean.tolist()


def aggregate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary per (method, arch), in the order they first appear: ``method``, ``arch``,
    ``seeds``, ``metrics`` and ``resources`` (each key -> :func:`stats`), ``energy_source``,
    ``R_mean`` and ``R_loss_mean`` (None unless every seed has ``R_loss``)."""
    validate_results(results)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results["rows"]:
        groups.setdefault((row["method"], row["arch"]), []).append(row)
    out = []
    for (method, arch), rows in groups.items():
        per_row = [row_metrics(row) for row in rows]
        keys = list(dict.fromkeys(key for metrics in per_row for key in metrics))
        resources = [row.get("resources") or {} for row in rows]
        sources = sorted({str(r["energy_source"]) for r in resources if r.get("energy_source")})
        out.append({
            "method": method, "arch": arch, "seeds": [row["seed"] for row in rows],
            "metrics": {key: stats([m.get(key, math.nan) for m in per_row]) for key in keys},
            "resources": {key: stats([_number(r.get(key)) for r in resources])
                          for key in RESOURCE_KEYS},
            "energy_source": "; ".join(sources),
            "R_mean": _mean_matrix([row["R"] for row in rows]),
            "R_loss_mean": _mean_matrix([row.get("R_loss") for row in rows]),
        })
    return out


# --- markdown -------------------------------------------------------------------------------

def format_stats(s: dict[str, float], seeds: int, digits: int = 3, spread: bool = True) -> str:
    """``mean ± std (min–max)``; one value alone without ±; ``(n=k)`` when fewer than all seeds
    gave a finite value; ``–`` for none."""
    if s["n"] == 0:
        return "–"
    text = f"{s['mean']:.{digits}f}"
    if s["n"] > 1:
        text += f" ± {s['std']:.{digits}f}"
        if spread:
            text += f" ({s['min']:.{digits}f}–{s['max']:.{digits}f})"
    if s["n"] < seeds:
        text += f" (n={s['n']})"
    return text


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(line) + " |" for line in lines)]


def _matrix_table(matrix: list[list[float]], tasks: list[str], digits: int) -> list[str]:
    lines = [[f"after {tasks[i]}", *("–" if not math.isfinite(v) else f"{v:.{digits}f}"
                                     for v in row)] for i, row in enumerate(matrix)]
    return _table(["stage", *tasks], lines)


def _markdown(results: dict[str, Any], summary: list[dict[str, Any]], plots: list[Path],
              plots_note: str) -> str:
    stream = results.get("stream") or {}
    T = len(summary[0]["R_mean"])
    tasks = [str(t) for t in (stream.get("tasks") or [f"task {j}" for j in range(T)])]
    score = stream.get("score_name", "accuracy")
    loss = stream.get("loss_name", "loss")
    out = [f"# Continual learning: {stream.get('name', 'stream')}", ""]
    if stream.get("description"):
        out += [str(stream["description"]), ""]
    out += [f"Kind: {stream.get('kind', '?')}; {T} tasks: {', '.join(tasks)}. "
            f"Seeds: {results.get('seeds', sorted({r['seed'] for r in results['rows']}))}. "
            "Cells: mean ± sample std over seeds (min–max).", ""]

    header = ["method", "arch", "seeds", *(SCORE_LABELS[k].format(score=score)
                                           for k in SCORE_KEYS),
              "wall s", "tokens/s", "peak RSS MB", "energy J", "energy source"]
    lines = []
    for group in summary:
        n = len(group["seeds"])
        res = group["resources"]
        lines.append([group["method"], group["arch"], str(n),
                      *(format_stats(group["metrics"][k], n) for k in SCORE_KEYS),
                      format_stats(res["wall_s"], n, 1, False),
                      format_stats(res["tokens_per_s"], n, 0, False),
                      format_stats(res["peak_rss_mb"], n, 0, False),
                      format_stats(res["energy_j"], n, 1, False),
                      group["energy_source"] or "–"])
    out += ["## Headline", "", *_table(header, lines), "", SCORE_SIGNS, ""]

    if any(group["R_loss_mean"] is not None for group in summary):
        header = ["method", "arch", "seeds", *(LOSS_LABELS[k].format(loss=loss)
                                               for k in LOSS_KEYS)]
        lines = [[g["method"], g["arch"], str(len(g["seeds"])),
                  *(format_stats(g["metrics"].get(k, stats([])), len(g["seeds"]))
                    for k in LOSS_KEYS)] for g in summary]
        out += [f"## Loss-based metrics ({loss})", "", *_table(header, lines), "",
                LOSS_SIGNS.format(loss=loss), ""]

    extra = [k for k in dict.fromkeys(k for g in summary for k in g["metrics"])
             if k not in SCORE_KEYS and k not in LOSS_KEYS]
    if extra:
        lines = [[g["method"], g["arch"], *(format_stats(g["metrics"].get(k, stats([])),
                                                         len(g["seeds"])) for k in extra)]
                 for g in summary]
        out += ["## Other metrics", "", *_table(["method", "arch", *extra], lines), ""]

    out += ["## Mean matrices", "",
            f"R[i, j]: {score} on task j after training through task i (mean over seeds).", ""]
    for group in summary:
        out += [f"### {group['method']} / {group['arch']}", "", f"{score}:", "",
                *_matrix_table(group["R_mean"], tasks, 3), ""]
        if group["R_loss_mean"] is not None:
            out += [f"{loss}:", "", *_matrix_table(group["R_loss_mean"], tasks, 3), ""]

    out += ["## Plots", ""]
    out += [f"![{path.stem}]({path.name})" for path in plots] or [plots_note]
    out.append("")
    for key in ("config", "versions", "machine"):
        if results.get(key):
            out += [f"## {key.capitalize()}", "", "```json",
                    json.dumps(_jsonable(results[key]), indent=1, sort_keys=True), "```", ""]
    return "\n".join(out)


# --- plots ----------------------------------------------------------------------------------

def _label(group: dict[str, Any]) -> str:
    return f"{group['method']}/{group['arch']}"


def _grid(plt: Any, count: int, width: float = 4.0, height: float = 3.2) -> tuple[Any, Any]:
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _plot_heatmaps(plt: Any, summary: list[dict[str, Any]], tasks: list[str], score: str,
                   path: Path) -> None:
    fig, axes = _grid(plt, len(summary))
    values = np.array([g["R_mean"] for g in summary], dtype=np.float64)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    for ax, group in zip(axes, summary, strict=False):
        matrix = np.array(group["R_mean"], dtype=np.float64)
        image = ax.imshow(matrix, vmin=low, vmax=high, cmap="viridis")
        middle = (low + high) / 2
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                if math.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if matrix[i, j] < middle else "black")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=8)
        ax.set_title(_label(group), fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"{score} R[stage, task], mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_per_task(plt: Any, summary: list[dict[str, Any]], key: str, tasks: list[str],
                   ylabel: str, title: str, path: Path) -> None:
    fig, axes = _grid(plt, len(tasks))
    stages = range(len(tasks))
    for j, ax in enumerate(axes):
        if j >= len(tasks):
            break
        for group in summary:
            if group[key] is not None:
                ax.plot(stages, [row[j] for row in group[key]], marker="o", label=_label(group))
        ax.axvline(j, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"task {tasks[j]} (trained at stage {j})", fontsize=9)
        ax.set_xticks(list(stages))
        ax.set_xlabel("stage (after training through task)")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(plt: Any, results: dict[str, Any], path: Path) -> bool:
    by_group: dict[str, dict[int, list[float]]] = {}
    boundaries: list[int] = []
    for row in results["rows"]:
        curve = row.get("curve") or []
        steps = by_group.setdefault(f"{row['method']}/{row['arch']}", {})
        for point in curve:
            if math.isfinite(_number(point.get("loss"))):
                steps.setdefault(int(point["step"]), []).append(float(point["loss"]))
        if not boundaries and curve:
            boundaries = [int(b["step"]) for a, b in itertools.pairwise(curve)
                          if a.get("task") != b.get("task")]
    if not any(by_group.values()):
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, steps in by_group.items():
        if steps:
            xs = sorted(steps)
            ax.plot(xs, [float(np.mean(steps[x])) for x in xs], label=label)
    for step in boundaries:
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("step (dotted: next task)")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_monitor(plt: Any, results: dict[str, Any], path: Path) -> bool:
    traced = [row for row in results["rows"]
              if isinstance((row.get("extras") or {}).get("monitor"), list)
              and row["extras"]["monitor"]]
    if not traced:
        return False
    fig, axes = plt.subplots(len(MONITOR_FIELDS), 1, figsize=(9, 2.4 * len(MONITOR_FIELDS)),
                             sharex=True, squeeze=False)
    for row in traced:
        records = [r for r in row["extras"]["monitor"] if isinstance(r, dict) and "step" in r]
        levels = sorted({str(r.get("level", "")) for r in records})
        for ax, field in zip(axes[:, 0], MONITOR_FIELDS, strict=True):
            for level in levels:
                points = [(r["step"], _number(r.get(field))) for r in records
                          if str(r.get("level", "")) == level]
                points = [(s, v) for s, v in points if math.isfinite(v)]
                if points:
                    name = f"{row['method']}/{row['arch']} s{row['seed']}"
                    ax.plot(*zip(*points, strict=True), linewidth=1,
                            label=f"{name} level {level}" if level else name)
        events = dict.fromkeys((r["step"], str(r["event"])) for r in records if r.get("event"))
        for step, event in events:
            for ax in axes[:, 0]:
                ax.axvline(step, color="red", linestyle=":", linewidth=0.8)
            axes[0, 0].annotate(event, (step, 0.98), fontsize=6, xycoords=("data", "axes fraction"),
                                rotation=90, va="top", ha="right")
    for ax, field in zip(axes[:, 0], MONITOR_FIELDS, strict=True):
        ax.set_ylabel(field, fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", color="grey")
    axes[-1, 0].set_xlabel("step (red dotted: monitor events)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _make_plots(results: dict[str, Any], summary: list[dict[str, Any]], folder: Path
                ) -> tuple[list[Path], str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (`pip install nestlearn[plots]`)."
    stream = results.get("stream") or {}
    T = len(summary[0]["R_mean"])
    tasks = [str(t) for t in (stream.get("tasks") or range(T))]
    score = stream.get("score_name", "accuracy")
    loss = stream.get("loss_name", "loss")
    paths = [folder / "heatmaps.png", folder / "forgetting.png"]
    _plot_heatmaps(plt, summary, tasks, score, paths[0])
    _plot_per_task(plt, summary, "R_mean", tasks, score,
                   f"{score} on each task after each stage (mean over seeds)", paths[1])
    if any(g["R_loss_mean"] is not None for g in summary):
        paths.append(folder / "task_loss.png")
        _plot_per_task(plt, summary, "R_loss_mean", tasks, loss,
                       f"{loss} on each task over the stream (mean over seeds)", paths[-1])
    if _plot_curves(plt, results, folder / "training_loss.png"):
        paths.append(folder / "training_loss.png")
    if _plot_monitor(plt, results, folder / "monitor.png"):
        paths.append(folder / "monitor.png")
    return paths, ""


def write_report(out_dir: str | Path, results: dict[str, Any]) -> Path:
    """Render ``results`` (the results.json schema) into ``out_dir/report.md`` and PNGs beside
    it; returns the path of report.md."""
    validate_results(results)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    summary = aggregate(results)
    plots, note = _make_plots(results, summary, folder)
    path = folder / "report.md"
    atomic_write_text(path, _markdown(results, summary, plots, note))
    return path
