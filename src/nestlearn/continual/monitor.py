"""Watching a model that keeps learning, and correcting it: per-level drift, update norms,
surprise and a guard-set loss while a stream runs, with rollback when the guard loss worsens.

``StreamMonitor.observe(step, model, state, loss)`` is called after every training step (or
used as a runner callback, ``StreamMonitor.as_callback()``) and does its work every ``every``
steps. See the package README, "Monitoring, control and correction".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.atomic import atomic_write_text
from nestlearn.continual.levels import (
    Level,
    Snapshot,
    hold_frozen,
    remember_initial,
    resolve_levels,
    rollback,
    snapshot,
)
from nestlearn.errors import NestlearnError, check_int, check_nonnegative, invalid
from nestlearn.evaluate.report import pyplot, save_figure
from nestlearn.losses import IGNORE_INDEX
from nestlearn.models.classifier import SequenceClassifier
from nestlearn.models.state import LMState
from nestlearn.models.teaching import scored_forward

ROLLBACK_TARGETS = ("parameters", "fastest", "all")
RECORD_FIELDS = ("step", "task", "level", "kind", "period", "drift", "update_norm", "surprise",
                 "memory_surprise", "guard_loss", "event")
GuardBatch = torch.Tensor | tuple[torch.Tensor, ...]


def guard_loss(model: nn.Module, batch: GuardBatch) -> float:
    """Mean cross entropy of ``model`` on ``batch`` from a fresh state, under no_grad.

    Causal LM: ``ids [B, T]`` (targets: the next tokens) or ``(ids, targets)``; LM-taught CMS
    levels run through their driver (``scored_forward``), as in evaluation.
    ``SequenceClassifier``: ``(ids, labels)`` or ``(ids, lengths, labels)``."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(model, SequenceClassifier):
                if not isinstance(batch, tuple) or len(batch) not in (2, 3):
                    raise invalid("guard_batch", type(batch).__name__,
                                  "(ids, labels) or (ids, lengths, labels) for a classifier")
                lengths = batch[1] if len(batch) == 3 else None
                logits, _ = model(batch[0], None, lengths)
                return float(F.cross_entropy(logits.float(), batch[-1]))
            if isinstance(batch, torch.Tensor):
                if batch.dim() != 2 or batch.shape[1] < 2:
                    raise invalid("guard_batch", tuple(batch.shape), "ids [B, T] with T >= 2")
                inputs, targets = batch[:, :-1], batch[:, 1:]
            elif isinstance(batch, tuple) and len(batch) == 2:
                inputs, targets = batch
            else:
                raise invalid("guard_batch", type(batch).__name__,
                              "ids [B, T] or (ids, targets) for a causal LM")
            logits, _ = scored_forward(model, inputs, targets)
            return float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                         ignore_index=IGNORE_INDEX))
    finally:
        model.train(training)


def _squares(current: torch.Tensor, reference: torch.Tensor, shared_dims: int | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||current - reference||^2, ||reference||^2)`` in float64: per batch element ``[B]``
    for a per-batch fast weight, a scalar otherwise."""
    current, reference = torch.broadcast_tensors(current.detach().double(),
                                                 reference.detach().double())
    diff = (current - reference).square()
    ref = reference.square()
    if shared_dims is not None and current.dim() > shared_dims:
        return diff.flatten(1).sum(1), ref.flatten(1).sum(1)
    return diff.sum(), ref.sum()


def _distance(level: Level, current: dict[str, torch.Tensor],
              reference: dict[str, torch.Tensor]) -> tuple[float, float | None] | None:
    """``(||w - ref||, ||w - ref|| / ||ref||)`` over the level's tensors (averaged over the
    batch for per-batch fast weights); None when the two cannot be compared (another batch
    size or structure). The ratio is None when ``ref`` is zero and ``w`` is not."""
    if set(current) != set(reference):
        return None
    diff: torch.Tensor | float = 0.0
    ref: torch.Tensor | float = 0.0
    try:
        for name, tensor in current.items():
            d, r = _squares(tensor, reference[name], level.shared_dims)
            diff = diff + d
            ref = ref + r
    except RuntimeError:
        return None
    diff = torch.as_tensor(diff, dtype=torch.float64).sqrt()
    ref = torch.as_tensor(ref, dtype=torch.float64).sqrt()
    norm = float(diff.mean())
    if bool((ref == 0).any()):
        return norm, (0.0 if norm == 0.0 else None)
    return norm, float((diff / ref).mean())


def _mean_norm(tensors: Sequence[torch.Tensor], shared_dims: int | None) -> float:
    total: torch.Tensor | float = 0.0
    for tensor in tensors:
        total = total + _squares(tensor, torch.zeros_like(tensor), shared_dims)[0]
    return float(torch.as_tensor(total, dtype=torch.float64).sqrt().mean())


def memory_surprise(level: Level, model: nn.Module, state: LMState | None) -> float | None:
    """A state level's own surprise, read from the state (no forward): the norm of a memory's
    momentum S (Titans' "past surprise", the decayed sum of its gradient steps) at its chunk
    start, or of a CMS level's gradient sum over its unfinished chunk (taken from the tokens
    it holds, without a forward of the model); averaged over the batch. None for parameter
    levels, memories without momentum and empty sums."""
    if level.kind != "state" or state is None:
        return None
    with torch.no_grad():
        held = (level.unfinished_gradient(model, state) if level.slot == "cms"
                else level.read_state(model, state).momentum)
    if held is None:
        return None
    return _mean_norm(held, level.shared_dims)


def _detached_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


class StreamMonitor:
    """Per-level monitoring and correction of a model while a stream runs.

    Args:
        model: the model being trained (``CausalLM`` or ``SequenceClassifier``).
        guard_batch: a fixed held-out batch (see :func:`guard_loss`); or
        guard_fn: ``guard_fn(model) -> float``, any loss (lower is better), called under
            no_grad. Neither: no guard loss, and no rollback.
        every: work every ``every`` steps (the first ``observe`` always works).
        rollback_threshold: roll back when the guard loss exceeds the last accepted
            snapshot's by more than this fraction (``0.1``: 10 % worse), or is not finite.
            None: never roll back.
        levels: the levels to watch (names; None: all).
        snapshot_every: accept a new snapshot (and its guard loss as the reference) once this
            many steps have passed since the last one, at an observation that did not roll
            back (None: ``every``, i.e. at every such observation).
        rollback: what a rollback restores: ``"parameters"`` (every watched parameter level),
            ``"fastest"`` (the watched levels with the shortest period), ``"all"`` (every
            watched level, state levels too) or a list of level names.

    ``records`` holds one dict per (observation, level) with ``RECORD_FIELDS``; ``events`` one
    dict per snapshot accepted and per rollback.
    """

    def __init__(self, model: nn.Module, guard_batch: GuardBatch | None = None, *,
                 guard_fn: Callable[[nn.Module], float] | None = None, every: int = 10,
                 rollback_threshold: float | None = None,
                 levels: Iterable[str] | None = None, snapshot_every: int | None = None,
                 rollback: str | Sequence[str] = "parameters") -> None:
        if guard_batch is not None and guard_fn is not None:
            raise invalid("guard_fn", "both guard_batch and guard_fn", "one of them")
        self.model = model
        self.guard_batch = guard_batch
        self.guard_fn = guard_fn
        self.every = check_int("every", every)
        self.snapshot_every = every if snapshot_every is None else check_int(
            "snapshot_every", snapshot_every)
        if rollback_threshold is not None:
            check_nonnegative("rollback_threshold", rollback_threshold)
            if guard_batch is None and guard_fn is None:
                raise invalid("rollback_threshold", rollback_threshold,
                              "None unless a guard_batch or guard_fn is given")
        self.rollback_threshold = rollback_threshold
        self.levels = resolve_levels(model, levels)
        self.rollback_levels = self._rollback_levels(rollback)
        remember_initial(model)
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.snapshot: Snapshot | None = None
        self.reference: float | None = None
        self._last_step: int | None = None
        self._previous: dict[str, dict[str, torch.Tensor]] = {}

    def _rollback_levels(self, rollback: str | Sequence[str]) -> list[Level]:
        if isinstance(rollback, str):
            if rollback not in ROLLBACK_TARGETS:
                raise invalid("rollback", repr(rollback),
                              "one of " + ", ".join(ROLLBACK_TARGETS) + " or level names")
            if rollback == "all":
                return list(self.levels)
            if rollback == "parameters":
                return [level for level in self.levels if level.kind == "parameters"]
            periods = [level.period for level in self.levels if level.period is not None]
            if not periods:
                raise invalid("rollback", "'fastest'",
                              "'parameters', 'all' or names: no watched level has a period")
            return [level for level in self.levels if level.period == min(periods)]
        watched = {level.name for level in self.levels}
        for name in rollback:
            if name not in watched:
                raise invalid("rollback", repr(name), "watched level names: " + ", ".join(watched))
        return [level for level in self.levels if level.name in rollback]

    def guard(self) -> float | None:
        """The guard loss now (None without a guard)."""
        if self.guard_fn is not None:
            training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    return float(self.guard_fn(self.model))
            finally:
                self.model.train(training)
        if self.guard_batch is not None:
            return guard_loss(self.model, self.guard_batch)
        return None

    def _current(self, level: Level, state: LMState | None) -> dict[str, torch.Tensor] | None:
        if level.kind == "state" and state is None:
            return None
        return level.tensors(self.model, state)

    def take_snapshot(self, state: LMState | None, step: int | None = None,
                      guard: float | None = None) -> Snapshot:
        """Accept the watched levels' current values (and ``guard``, default: measured now) as
        the reference that drift and rollback compare against."""
        names = [level.name for level in self.levels
                 if level.kind == "parameters" or state is not None]
        self.snapshot = snapshot(self.model, state, names, step=step)
        self.reference = self.guard() if guard is None else guard
        self.events.append({"step": step, "event": "snapshot", "guard_loss": self.reference})
        return self.snapshot

    def observe(self, step: int, model: nn.Module, state: LMState | None,
                loss: float | torch.Tensor | None = None, task: int | None = None
                ) -> LMState | None:
        """Call after every training step: returns the state to carry on with (``state``
        itself, or a copy with frozen or rolled-back state levels restored)."""
        if model is not self.model:
            raise NestlearnError("observe: got a different model; allowed: the model the "
                                 "StreamMonitor was built with")
        state = hold_frozen(model, state)
        if self._last_step is not None and step - self._last_step < self.every:
            return state
        self._last_step = step
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        surprise = None if loss is None else float(loss)
        guard = self.guard()
        first = self.snapshot is None
        if first:
            self.take_snapshot(state, step, guard)
        reference = {**self.snapshot.parameters, **{
            level.name: {f"weights[{j}]": w for j, w in enumerate(value.weights)}
            for level in self.levels if (value := self.snapshot.state.get(level.name))}}
        rows = []
        for level in self.levels:
            current = self._current(level, state)
            if current is None:
                continue
            drift = _distance(level, current, reference.get(level.name, {}))
            update = _distance(level, current, self._previous.get(level.name, current))
            rows.append({"step": step, "task": task, "level": level.name, "kind": level.kind,
                         "period": level.period, "drift": None if drift is None else drift[1],
                         "update_norm": None if update is None else update[0],
                         "surprise": surprise,
                         "memory_surprise": memory_surprise(level, model, state),
                         "guard_loss": guard, "event": "snapshot" if first else None})
        if not first and self._worse(guard):
            state = self._rollback(step, state, guard, rows)
        elif not first and (self.snapshot.step is None
                            or step - self.snapshot.step >= self.snapshot_every):
            self.take_snapshot(state, step, guard)
            for row in rows:
                row["event"] = "snapshot"
        self._previous = {level.name: _detached_copy(current) for level in self.levels
                          if (current := self._current(level, state)) is not None}
        self.records += rows
        return state

    def _worse(self, guard: float | None) -> bool:
        if guard is None or self.rollback_threshold is None or self.reference is None:
            return False
        return not math.isfinite(guard) or (
            guard > self.reference + self.rollback_threshold * abs(self.reference))

    def _rollback(self, step: int, state: LMState | None, guard: float,
                  rows: list[dict[str, Any]]) -> LMState | None:
        held = set(self.snapshot.parameters) | set(self.snapshot.state)
        targets = [level.name for level in self.rollback_levels if level.name in held
                   and (level.kind == "parameters" or state is not None)]
        state = rollback(self.model, state, self.snapshot, targets)
        for row in rows:
            if row["level"] in targets:
                row["event"] = "rollback"
        self.events.append({"step": step, "event": "rollback", "levels": targets,
                            "guard_loss": guard, "reference": self.reference,
                            "guard_after": self.guard()})
        return state

    def __call__(self, info: Any) -> LMState | None:
        """Runner step callback: ``info`` has ``step``, ``task_index``, ``model``, ``state``
        and ``loss``. Returns the replacement state, or None when the state is unchanged."""
        new = self.observe(info.step, info.model, info.state, info.loss,
                           task=getattr(info, "task_index", None))
        return None if new is info.state else new

    def as_callback(self) -> Callable[[Any], LMState | None]:
        """The monitor as a runner step callback (see ``__call__``)."""
        return self.__call__

    def to_jsonl(self, path: str | os.PathLike[str]) -> Path:
        """Write ``records`` as JSON lines (one record a line; None is null)."""
        path = Path(path)
        text = "".join(json.dumps(record) + "\n" for record in self.records)
        try:
            atomic_write_text(path, text)
        except OSError as err:
            raise NestlearnError(f"to_jsonl: cannot write {str(path)!r} "
                                 f"({err.strerror or err})") from None
        return path


def plot_monitor(records: Sequence[dict[str, Any]], path: str | os.PathLike[str],
                 title: str | None = None) -> Path:
    """A PNG of monitor records: drift and update norm per level over steps (state levels
    dashed), and the guard and training losses with snapshots and rollbacks marked."""
    if not records:
        raise invalid("records", "no records", "the records of at least one observation")
    plt = pyplot()

    names = list(dict.fromkeys(record["level"] for record in records))
    figure, axes = plt.subplots(3, 1, figsize=(9.0, 9.5), sharex=True)
    try:
        for name in names:
            rows = [r for r in records if r["level"] == name]
            style = "--" if rows[0]["kind"] == "state" else "-"
            for axis, key in zip(axes[:2], ("drift", "update_norm"), strict=True):
                points = [(r["step"], r[key]) for r in rows if r[key] is not None]
                axis.plot([x for x, _ in points], [y for _, y in points], style, label=name)
        axes[0].set_ylabel("drift from snapshot\n||w - w_snap|| / ||w_snap||")
        axes[1].set_ylabel("update norm since\nprevious observation")
        axes[1].set_yscale("symlog", linthresh=1e-6)
        steps = {}
        for record in records:
            steps.setdefault(record["step"], record)
        ordered = sorted(steps.values(), key=lambda r: r["step"])
        for key, label in (("guard_loss", "guard loss"), ("surprise", "training loss")):
            points = [(r["step"], r[key]) for r in ordered if r[key] is not None]
            if points:
                axes[2].plot([x for x, _ in points], [y for _, y in points], marker=".",
                             label=label)
        for index, (event, color) in enumerate((("rollback", "tab:red"),
                                                ("snapshot", "tab:green"))):
            marked = sorted({r["step"] for r in records if r["event"] == event})
            for number, step in enumerate(marked):
                axes[2].axvline(step, color=color, alpha=0.5 if index == 0 else 0.15,
                                linestyle="-" if index == 0 else ":",
                                label=event if number == 0 else None)
        axes[2].set_ylabel("loss (nats)")
        axes[2].set_xlabel("step")
        for axis in axes:
            axis.grid(alpha=0.3)
        axes[0].legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        axes[2].legend(fontsize=8)
        axes[0].set_title(title or "levels while the stream runs")
        figure.tight_layout()
        path = save_figure(figure, path, dpi=110)
    finally:
        plt.close(figure)
    return path
