"""Loss by position of stream evaluations: a markdown table and a PNG plot, one line per model.

Plotting needs matplotlib (the ``plots`` extra); it is imported only when a plot is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nestlearn.errors import NestlearnError, invalid
from nestlearn.evaluate.stream import StreamEvalResult


def _check_results(results: Mapping[str, StreamEvalResult]) -> None:
    if not results:
        raise invalid("results", "none", "at least one named StreamEvalResult")
    for name, result in results.items():
        if not isinstance(result, StreamEvalResult):
            raise invalid(f"results[{name!r}]", type(result).__name__, "a StreamEvalResult")


def _labels(results: Mapping[str, StreamEvalResult]) -> list[str]:
    """Bucket labels in position order over every result (they may have other edges)."""
    spans = {(b.start, b.end): b.label for r in results.values() for b in r.buckets}
    return [spans[key] for key in sorted(spans, key=lambda k: (k[0], k[1] is None, k[1]))]


def markdown_table(results: Mapping[str, StreamEvalResult]) -> str:
    """Rows: position buckets and the overall loss; columns: one per model, ``loss (tokens)``
    in nats per target."""
    _check_results(results)
    names = list(results)
    lines = ["| positions | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for label in _labels(results):
        cells = []
        for result in results.values():
            bucket = next((b for b in result.buckets if b.label == label), None)
            cells.append("" if bucket is None or bucket.loss is None
                         else f"{bucket.loss:.4f} ({bucket.tokens})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| all | " + " | ".join(f"{r.loss:.4f} ({r.tokens})"
                                         for r in results.values()) + " |")
    return "\n".join(lines) + "\n"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a clear error without it."""
    try:
        import matplotlib
    except ImportError:
        raise NestlearnError("plot: matplotlib is not installed; install it with "
                             "`pip install matplotlib` (or nestlearn[plots])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | os.PathLike[str], dpi: int) -> Path:
    """Write ``figure`` as a PNG at ``path``; an unwritable path is one clear error."""
    path = Path(path)
    try:
        figure.savefig(path, format="png", dpi=dpi)
    except OSError as err:
        raise NestlearnError(f"plot: cannot write {str(path)!r} ({err.strerror or err})"
                             ) from None
    return path


def plot_loss_by_position(results: Mapping[str, StreamEvalResult],
                          path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Write a PNG of loss vs position bucket, one line per model; returns its path."""
    _check_results(results)
    plt = pyplot()

    labels = _labels(results)
    figure, axes = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.6))
    try:
        for name, result in results.items():
            points = [(labels.index(b.label), b.loss) for b in result.buckets
                      if b.loss is not None]
            axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
        axes.set_xticks(range(len(labels)), labels)
        axes.set_xlabel("position in document (tokens)")
        axes.set_ylabel("loss (nats/token)")
        axes.set_title(title or "loss by position, state carried")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = save_figure(figure, path, dpi=120)
    finally:
        plt.close(figure)
    return path
