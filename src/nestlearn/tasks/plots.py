"""PNG plots of a task's summary (matplotlib, no display needed): a table over one tag is a
line per arch with the seeds' spread as error bars; a table over two tags is one heatmap per
arch (the depth x length grid of the needle tasks). matplotlib is optional (the ``plots``
extra): without it the reports are written without plots."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _archs(table: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(arch for row in table["rows"] for arch in row["archs"]))


def plot_lines(plt: Any, table: dict[str, Any], task: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [row["label"] for row in table["rows"]]
    for arch in _archs(table):
        points = [(i, row["archs"][arch]) for i, row in enumerate(table["rows"])
                  if arch in row["archs"]]
        ax.errorbar([i for i, _ in points], [c["mean"] for _, c in points],
                    yerr=[c["std"] for _, c in points], marker="o", capsize=3, label=arch)
    if table["chance"] is not None:
        ax.axhline(table["chance"], color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 6 else 0)
    ax.set_xlabel(" / ".join(table["tags"]))
    ax.set_ylabel(table["metric"])
    if table["metric"] != "loss":
        ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{task}: {table['title']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heatmaps(plt: Any, table: dict[str, Any], task: str, path: Path) -> None:
    archs = _archs(table)
    rows = sorted({row["key"][0] for row in table["rows"]})
    cols = sorted({row["key"][1] for row in table["rows"]})
    fig, axes = plt.subplots(1, len(archs), figsize=(3.4 * len(archs) + 0.8, 3.4),
                             squeeze=False, constrained_layout=True)
    vmax = 1.0 if table["metric"] != "loss" else None
    for index, (ax, arch) in enumerate(zip(axes[0], archs, strict=True)):
        grid = [[float("nan")] * len(cols) for _ in rows]
        for row in table["rows"]:
            if arch in row["archs"]:
                grid[rows.index(row["key"][0])][cols.index(row["key"][1])] = \
                    row["archs"][arch]["mean"]
        image = ax.imshow(grid, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i][j] < 0.6 else "black")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set_xlabel(table["tags"][1])
        if index == 0:
            ax.set_ylabel(table["tags"][0])
        ax.set_title(arch, fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"{task}: {table['title']}", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_summary(summary: list[dict[str, Any]], task: str, folder: Path) -> list[Path]:
    """One PNG per table into ``folder``; returns their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for table in summary:
        path = folder / f"{slug(table['title'])}.png"
        if len(table["tags"]) == 1:
            plot_lines(plt, table, task, path)
        else:
            plot_heatmaps(plt, table, task, path)
        paths.append(path)
    return paths
