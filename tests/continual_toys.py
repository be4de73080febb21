"""Tiny hand-built streams for the continual-learning tests, and stand-ins for the metrics and
resources modules so the runner's tests depend on nothing but the runner."""

from __future__ import annotations

import sys
import types

import torch

from nestlearn.continual.stream import ClassSplit, LMSplit, SeriesSplit, Stream, Task


def lm_stream(tasks: int = 2, length: int = 400, seq_len: int = 16) -> Stream:
    """Task t repeats a cycle of ``3 + t`` tokens starting at token ``3 t``: easy to learn,
    different token distributions per task."""
    out = []
    for t in range(tasks):
        tokens = torch.arange(length) % (3 + t) + 3 * t
        out.append(Task(f"cycle{t}", LMSplit(tokens.clone()), LMSplit(tokens.clone()),
                        LMSplit(tokens.clone())))
    return Stream("toy-lm", "lm", tuple(out), 3 * tasks + 3, seq_len)


def class_stream(tasks: int = 2, rows: int = 96, seq_len: int = 8, seed: int = 0) -> Stream:
    """Class-incremental: task t holds classes 2t and 2t + 1, and an input's first token is
    its class id (the rest random): each task is easy, and with one head a later task
    overwrites an earlier one unless the method prevents it."""
    g = torch.Generator().manual_seed(seed)
    vocab = max(10, 2 * tasks)

    def split(t: int) -> ClassSplit:
        labels = torch.randint(0, 2, (rows,), generator=g) + 2 * t
        inputs = torch.randint(0, vocab, (rows, seq_len), generator=g)
        inputs[:, 0] = labels
        return ClassSplit(inputs, torch.full((rows,), seq_len), labels)

    out = [Task(f"pair{t}", split(t), split(t), split(t), classes=(2 * t, 2 * t + 1))
           for t in range(tasks)]
    return Stream("toy-classes", "classification", tuple(out), vocab, seq_len,
                  class_names=tuple(f"class{i}" for i in range(2 * tasks)))


def forecast_stream(tasks: int = 2, length: int = 300, seq_len: int = 16) -> Stream:
    bins = (-1.0, 0.0, 1.0)
    out = []
    for t in range(tasks):
        values = 1.5 * torch.sin(torch.arange(length) * (0.3 + 0.2 * t))
        split = SeriesSplit(values, torch.bucketize(values, torch.tensor(bins)),
                            torch.full((length,), t))
        out.append(Task(f"regime{t}", split, split, split))
    return Stream("toy-series", "forecast", tuple(out), len(bins) + 1, seq_len, bins=bins)


class FakeMeter:
    def __init__(self) -> None:
        self.tokens = 0

    def __enter__(self) -> FakeMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def as_dict(self) -> dict:
        return {"tokens": self.tokens}


def install_fakes(monkeypatch) -> None:
    """Stand-ins for ``nestlearn.continual.metrics`` / ``resources`` / ``report``."""
    metrics = types.ModuleType("nestlearn.continual.metrics")
    metrics.summarize = lambda R, baseline=None, R_loss=None, baseline_loss=None: {
        "average_accuracy": sum(R[-1]) / len(R[-1])}
    resources = types.ModuleType("nestlearn.continual.resources")
    resources.ResourceMeter = FakeMeter
    report = types.ModuleType("nestlearn.continual.report")
    report.saved = []
    report.save_results = lambda out_dir, results: report.saved.append(("results", out_dir))
    report.write_report = lambda out_dir, results: report.saved.append(("report", out_dir))
    for name, module in (("metrics", metrics), ("resources", resources), ("report", report)):
        monkeypatch.setitem(sys.modules, f"nestlearn.continual.{name}", module)
        monkeypatch.setattr(sys.modules["nestlearn.continual"], name, module, raising=False)
