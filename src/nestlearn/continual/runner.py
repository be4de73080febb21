"""Running methods over a stream: one row (method x arch x seed) at a time, and suites of rows.

A row: seed everything, build the arch's model for the stream's kind, evaluate the untrained
model on every task's test split (``baseline``), then for each task i train
``steps_per_task`` steps (AdamW, betas (0.9, 0.98), no weight decay, a constant learning
rate, gradients clipped at norm 1, one optimizer for the whole stream) and evaluate every
task's test split: ``R[i][j]`` (score) and ``R_loss[i][j]``. The ``curve`` holds the mean data
loss (the learner's loss, without a method's penalty) every ``curve_every`` steps.

Arch ``"hope-stacked"``: a Transformer of the same sizes learns task 0 (under the row's
method); right after task 0's steps it becomes a HOPE-attention model
(``nestlearn.models.hope_from_transformer``): attention, norms, embedding (and a classifier's
head) copied, each block's MLP in the slowest CMS level (chunk sizes ``STACK_CHUNKS``), the
faster level starting with a zero output, CMS inner learning rate ``STACK_INNER_LR`` (so the
new levels learn in context; at 0 the model would compute the Transformer exactly). The
carried state and the optimizer start afresh; EWC anchors apply to the parameters that kept
their name and shape; ``R[0]`` and everything after are the stacked model's.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nestlearn.continual.learners import STATE_POLICIES, Learner, make_learner
from nestlearn.continual.methods import Method, make_method, method_options
from nestlearn.continual.monitor import StreamMonitor
from nestlearn.continual.online import shift_metrics
from nestlearn.continual.stream import Stream
from nestlearn.errors import NestlearnError, NonFiniteError, check_int, check_positive, invalid
from nestlearn.models import (
    ARCHS,
    CausalLM,
    ClassifierConfig,
    ModelConfig,
    SequenceClassifier,
    build_classifier,
    build_model,
    hope_from_transformer,
)
from nestlearn.tasks.models import MEMORY_CHUNK, base_config
from nestlearn.training.runconfig import set_field

GRAD_CLIP = 1.0
ROW_ARCHS: tuple[str, ...] = (*ARCHS, "hope-stacked")
# the default model: tiny, the synthetic tasks' (nestlearn/tasks/models.py), for the record
MODEL_SIZES: dict[str, Any] = {"dim": 32, "layers": 2, "heads": 2, "mlp_hidden": 64}
POOLING = "mean"  # the classifier read-out (ClassifierConfig.pooling)
STACK_CHUNKS = (16, 64)
STACK_INNER_LR = 1e-3
DEFAULT_STEPS = 100
DEFAULT_BATCH = 16
DEFAULT_LR = 1e-3


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row: ``method`` (``methods.METHODS``) on ``arch`` (``ROW_ARCHS``) with ``seed``.

    ``state_policy``: "reset" or "carry" (None: the method's own, "carry" for inner-only and
    nested, else "reset"); ``model_sets``: ``FIELD=VALUE`` changes to the arch's model config
    (skipped where the arch has no such section, e.g. ``memory.*`` on a Transformer);
    ``options``: the method's options (``methods.METHOD_DEFAULTS``); ``eval_budget``: tokens
    (LM, forecast) or rows (classification) evaluated per split (None: the learner's
    default)."""

    method: str
    arch: str
    seed: int = 0
    steps_per_task: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH
    lr: float = DEFAULT_LR
    state_policy: str | None = None
    model_sets: tuple[str, ...] = ()
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_budget: int | None = None
    curve_every: int | None = None

    def __post_init__(self) -> None:
        method_options(self.method, self.options)
        if self.arch not in ROW_ARCHS:
            raise invalid("arch", repr(self.arch), f"one of {list(ROW_ARCHS)}")
        check_int("seed", self.seed, 0)
        check_int("steps_per_task", self.steps_per_task)
        check_int("batch_size", self.batch_size)
        check_positive("lr", self.lr)
        if self.state_policy is not None and self.state_policy not in STATE_POLICIES:
            raise invalid("state_policy", repr(self.state_policy),
                          f"None or one of {list(STATE_POLICIES)}")
        required = make_method(self.method, self.options).required_policy
        if required is not None and self.state_policy not in (None, required):
            raise invalid("state_policy", repr(self.state_policy),
                          f"{required!r} (or None) for method {self.method!r}")
        object.__setattr__(self, "model_sets", tuple(self.model_sets))

    @property
    def policy(self) -> str:
        if self.state_policy is not None:
            return self.state_policy
        return make_method(self.method, self.options).required_policy or "reset"

    def label(self) -> str:
        return f"{self.method}/{self.arch}/seed {self.seed}"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model_sets"] = list(self.model_sets)
        data["state_policy"] = self.policy
        data["options"] = method_options(self.method, self.options)
        return data


@dataclasses.dataclass(frozen=True)
class MonitorSpec:
    """Monitoring of a row: every ``every`` steps; roll back when the guard loss rises by
    more than ``rollback_threshold`` (a fraction; None: never)."""

    every: int = 10
    rollback_threshold: float | None = None

    def __post_init__(self) -> None:
        check_int("monitor every", self.every)
        if self.rollback_threshold is not None:
            check_positive("rollback_threshold", self.rollback_threshold)


@dataclasses.dataclass
class StepInfo:
    """What a step callback sees: the global step (from 1), the task, the model, the state
    the step ended with (None under the reset policy's fresh starts too) and the data loss."""

    step: int
    task_index: int
    model: nn.Module
    state: Any
    loss: float


StepCallback = Callable[[StepInfo], Any]
Progress = Callable[[str], None]


def model_config(arch: str, vocab_size: int, sets: Sequence[str] = ()) -> ModelConfig:
    """The row model of ``arch`` (``MODEL_SIZES``, memory chunk ``MEMORY_CHUNK``; the
    Transformer for "hope-stacked") with ``FIELD=VALUE`` sets applied where the arch has the
    field's section."""
    base = "transformer" if arch == "hope-stacked" else arch
    if base not in ARCHS:
        raise invalid("arch", repr(arch), f"one of {list(ROW_ARCHS)}")
    # the synthetic tasks' tiny model: the same sizes, memory chunks and MAG window
    config = base_config(base, vocab_size)
    for assignment in sets:
        key, sep, value = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise invalid("model_sets", repr(assignment), "FIELD=VALUE, e.g. dim=64")
        if key in ("arch", "vocab_size"):
            raise invalid("model_sets", repr(assignment), "no arch or vocab_size (set by the row)")
        try:
            config = set_field(config, key, value)
        except NestlearnError as err:
            if "is not used by this config" not in str(err):
                raise NestlearnError(f"model_sets {assignment}: {err}") from None
    return config


def _with_lm_teach_signal(config: ModelConfig) -> ModelConfig:
    if config.cms is None:
        return config
    return dataclasses.replace(config, cms=dataclasses.replace(config.cms, teach_signal="lm"))


def build_row_model(stream: Stream, config: ModelConfig) -> nn.Module:
    if stream.kind == "classification":
        return build_classifier(ClassifierConfig(config, stream.num_classes, POOLING))
    return build_model(config)


def stack_model(model: nn.Module, teach_lm: bool) -> nn.Module:
    """The hope-stacked conversion of a trained Transformer LM or classifier (module
    docstring); ``teach_lm``: its CMS levels learn from the LM teach signal."""
    kwargs: dict[str, Any] = {"cms_chunk_sizes": STACK_CHUNKS, "cms_inner_lr": STACK_INNER_LR}
    if teach_lm:
        kwargs["cms"] = {"teach_signal": "lm"}
    if isinstance(model, CausalLM):
        return hope_from_transformer(model, arch="hope-attention", **kwargs)
    if not isinstance(model, SequenceClassifier):
        raise invalid("model", type(model).__name__, "a CausalLM or SequenceClassifier")
    lm = CausalLM(model.config.backbone)
    lm.backbone.load_state_dict(model.backbone.state_dict())
    stacked = hope_from_transformer(lm, arch="hope-attention", **kwargs)
    out = build_classifier(ClassifierConfig(stacked.config, model.config.num_classes,
                                            model.config.pooling))
    out.backbone.load_state_dict(stacked.backbone.state_dict())
    out.head.load_state_dict(model.head.state_dict())
    return out


def _evaluate_all(learner: Learner, stream: Stream, split: str = "test"
                  ) -> tuple[list[float], list[float]]:
    scores, losses = [], []
    for task in stream.tasks:
        score, loss = learner.evaluate(getattr(task, split))
        scores.append(score)
        losses.append(loss)
    return scores, losses


def make_monitor(learner: Learner, stream: Stream, monitor: MonitorSpec,
                 seed: int) -> StreamMonitor:
    """A ``StreamMonitor`` whose guard loss is the learner's loss on one fixed batch of the
    first task's validation split, from a fresh state (so it sees the weights, not the
    carried state)."""
    generator = torch.Generator().manual_seed(seed + 7919)
    guard = learner.draw(stream.tasks[0].validation, learner.batch_size, generator,
                         sequential=False)

    def guard_fn(model: nn.Module) -> float:
        with torch.no_grad():
            logits, _ = learner.forward(guard, None)
            return float(learner.loss(logits, guard))

    return StreamMonitor(learner.model, guard_fn=guard_fn, every=monitor.every,
                         rollback_threshold=monitor.rollback_threshold)


def train_stream(stream: Stream, spec: RowSpec, callbacks: Sequence[StepCallback] = (),
                 progress: Progress | None = None, on_tokens: Callable[[int], None] | None = None,
                 eval_split: str = "test", monitor: MonitorSpec | None = None
                 ) -> dict[str, Any]:
    """The row's training and its R / R_loss / baseline / curve / extras (no metrics or
    resources: ``run_row`` adds them). ``eval_split``: the split R is measured on.
    ``monitor``: watch every level (``continual.monitor``) and roll back on a guard-loss
    rise; its records go to ``extras["monitor"]``."""
    torch.manual_seed(spec.seed)
    method: Method = make_method(spec.method, spec.options)
    method.setup(spec.seed, spec.steps_per_task)
    config = model_config(spec.arch, stream.vocab_size, spec.model_sets)
    teach_lm = method.teach_lm and stream.kind != "classification"
    if teach_lm:
        config = _with_lm_teach_signal(config)
    model = build_row_model(stream, config)
    learner = make_learner(stream, model, state_policy=spec.policy,
                           batch_size=spec.batch_size, eval_budget=spec.eval_budget)
    generator = torch.Generator().manual_seed(spec.seed)
    baseline, baseline_loss = _evaluate_all(learner, stream, eval_split)
    optimizer = method.make_optimizer(learner.model, spec.lr)
    monitors: list[StreamMonitor] = []
    if monitor is not None:
        if spec.arch == "hope-stacked":
            raise NestlearnError("monitor: not with arch hope-stacked (its model is replaced "
                                 "after task 0); monitor hope-attention or hope instead")
        monitors.append(make_monitor(learner, stream, monitor, spec.seed))
    every = spec.curve_every or max(1, spec.steps_per_task // 20)
    R: list[list[float]] = []
    R_loss: list[list[float]] = []
    curve: list[dict[str, Any]] = []
    online: list[dict[str, float]] = []
    step = 0
    for task_index in range(len(stream.tasks)):
        method.begin_task(learner, task_index)
        trains = method.trains(task_index)
        window: list[float] = []
        task_online: list[tuple[float, float]] = []
        for _ in range(spec.steps_per_task):
            step += 1
            batch = method.batch(learner, task_index, generator)
            with torch.set_grad_enabled(trains):
                logits, state = learner.forward(batch, learner.train_state())
                loss = learner.loss(logits, batch)
                extra = method.extra_loss(learner, batch, logits, task_index) if trains else None
                total = loss if extra is None else loss + extra
            value = float(total.detach())
            if not math.isfinite(value):
                raise NonFiniteError(f"row {spec.label()}: the loss is {value} at step {step} "
                                     f"(task {task_index})")
            if trains:
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                nn.utils.clip_grad_norm_(learner.model.parameters(), GRAD_CLIP)
                optimizer.step()
            learner.keep_state(state)
            method.after_step(learner, batch, task_index)
            if hasattr(learner, "batch_scores"):
                task_online.append(learner.batch_scores(logits, batch))
            if on_tokens is not None:
                on_tokens(learner.tokens(batch) + method.extra_tokens)
            method.extra_tokens = 0
            data_loss = float(loss.detach())
            window.append(data_loss)
            for callback in (*callbacks, *monitors):
                # a callback may hand back a corrected state (a monitor's rollback, a frozen
                # or reset state level): the stream carries on with it
                replaced = callback(StepInfo(step, task_index, learner.model, learner.carried,
                                             data_loss))
                if replaced is not None:
                    learner.carried = replaced
            if len(window) == every:
                curve.append({"step": step, "task": task_index,
                              "loss": sum(window) / len(window)})
                window = []
        if window:
            curve.append({"step": step, "task": task_index, "loss": sum(window) / len(window)})
        method.end_task(learner, task_index)
        if spec.arch == "hope-stacked" and task_index == 0:
            learner.set_model(stack_model(learner.model, teach_lm))
            optimizer = method.make_optimizer(learner.model, spec.lr)
        scores, losses = _evaluate_all(learner, stream, eval_split)
        R.append(scores)
        R_loss.append(losses)
        if task_online:
            online.append({"task": task_index,
                           "accuracy": sum(a for a, _ in task_online) / len(task_online),
                           "mae": sum(m for _, m in task_online) / len(task_online),
                           "step_mae": [m for _, m in task_online]})
        if progress is not None:
            progress(f"{spec.label()}: task {task_index + 1}/{len(stream.tasks)} "
                     f"{stream.tasks[task_index].name}: score "
                     + " ".join(f"{s:.3f}" for s in scores))
    extras: dict[str, Any] = {"state_policy": spec.policy,
                              "options": method_options(spec.method, spec.options),
                              "model": learner.model.config.to_dict(),
                              "trainable_params": sum(p.numel() for p in
                                                      learner.model.parameters()),
                              **method.extras()}
    if stream.kind == "lm":
        scale = math.log(2) * stream.bytes_per_token
        extras["R_bits_per_byte"] = [[loss / scale for loss in row] for row in R_loss]
    if stream.kind == "forecast":
        extras["online"] = online
        recurrence = stream.meta.get("recurrence_of") or [None] * len(stream.tasks)
        extras["shifts"] = shift_metrics([entry["step_mae"] for entry in online], recurrence,
                                         max(1, spec.steps_per_task // 10))
    if spec.arch == "hope-stacked":
        extras["stacked_after_task"] = 0
    if monitors:
        extras["monitor"] = monitors[0].records
        extras["monitor_events"] = [event for event in monitors[0].events
                                    if event.get("event") == "rollback"]
    return {"method": spec.method, "arch": spec.arch, "seed": spec.seed, "R": R,
            "R_loss": R_loss, "baseline": baseline, "baseline_loss": baseline_loss,
            "curve": curve, "extras": extras}


def run_row(stream: Stream, spec: RowSpec, callbacks: Sequence[StepCallback] = (),
            progress: Progress | None = None, monitor: MonitorSpec | None = None
            ) -> dict[str, Any]:
    """One row of results.json (schema in the continual README): R and R_loss on every
    task's test split after each stage, the untrained baseline, the loss curve, the
    metrics (``metrics.summarize``), resources (``resources.ResourceMeter``) and extras."""
    from nestlearn.continual.metrics import summarize
    from nestlearn.continual.resources import ResourceMeter

    with ResourceMeter() as meter:
        row = train_stream(stream, spec, callbacks, progress, on_tokens=meter.add_tokens,
                           monitor=monitor)
    row["metrics"] = summarize(row["R"], baseline=row["baseline"], R_loss=row["R_loss"],
                               baseline_loss=row["baseline_loss"])
    row["resources"] = meter.as_dict()
    if "shifts" in row["extras"]:
        row["metrics"].update(row["extras"]["shifts"]["summary"])
    if "R_bits_per_byte" in row["extras"]:
        final = row["extras"]["R_bits_per_byte"][-1]
        row["metrics"]["bits_per_byte"] = sum(final) / len(final)
    return {key: row[key] for key in ("method", "arch", "seed", "R", "R_loss", "baseline",
                                      "baseline_loss", "curve", "metrics", "resources",
                                      "extras")}


def stream_info(stream: Stream) -> dict[str, Any]:
    return {"name": stream.name, "kind": stream.kind, "tasks": list(stream.task_names),
            "description": stream.description, "seq_len": stream.seq_len,
            "vocab_size": stream.vocab_size, "score_name": "accuracy",
            "loss_name": "mae" if stream.kind == "forecast" else "loss"}


def environment() -> tuple[dict[str, str], dict[str, Any]]:
    """(versions, machine) for results.json."""
    import os

    import numpy

    import nestlearn

    versions = {"nestlearn": getattr(nestlearn, "__version__", "unknown"),
                "torch": torch.__version__, "python": platform.python_version(),
                "numpy": numpy.__version__}
    ram_gb = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        ram_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    machine = {"platform": platform.platform(), "processor": platform.processor()
               or platform.machine(), "cpus": os.cpu_count(), "ram_gb": ram_gb,
               "python_executable": sys.executable}
    return versions, machine


def row_file(out: Path, spec: RowSpec, label: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{spec.method}-{label}")
    return out / "rows" / f"{safe}-seed{spec.seed}.json"


def stored_row(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The row stored at ``path`` if it was made with ``settings`` (else None)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("settings") != settings:
        return None
    return data.get("row")


def run_suite(stream: Stream, specs: Sequence[RowSpec], out_dir: str | Path,
              progress: Progress | None = None, *, settings: dict[str, Any] | None = None,
              labels: Sequence[str] | None = None, monitor: MonitorSpec | None = None,
              retrain: bool = False) -> dict[str, Any]:
    """Run every row (each independent and seeded), write ``results.json`` and the report
    into ``out_dir``; returns the results. ``config`` holds the first row's settings (the
    common ones in a suite); every row's own spec is in its ``extras["spec"]``.

    Each finished row is written to ``out_dir/rows/`` with its settings (the stream, the
    caller's ``settings`` such as the stream's size knobs, the row's spec and the monitor):
    a later call with the same settings reuses it instead of training again (``retrain``:
    train anyway, after a change of the code), so a stopped suite continues where it was.
    ``labels``: the name each row shows as its arch in the report (an ablation's variant)."""
    from nestlearn.atomic import atomic_write_json
    from nestlearn.continual.report import save_results, write_report

    if not specs:
        raise NestlearnError("run_suite: no rows; allowed: one or more RowSpec")
    if labels is not None and len(labels) != len(specs):
        raise invalid("labels", len(labels), f"one per row ({len(specs)})")
    out = Path(out_dir)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, spec in enumerate(specs):
        label = spec.arch if labels is None else labels[index]
        row_settings = {"stream": stream_info(stream), "caller": settings or {},
                        "spec": spec.to_dict(), "label": label,
                        "monitor": None if monitor is None else dataclasses.asdict(monitor)}
        path = row_file(out, spec, label)
        row = None if retrain else stored_row(path, row_settings)
        if row is not None:
            if progress is not None:
                progress(f"{spec.method}/{label}/seed {spec.seed}: reusing {path}")
        else:
            row = run_row(stream, spec, progress=progress, monitor=monitor)
            row["extras"]["spec"] = spec.to_dict()
            row["arch"] = label
            atomic_write_json(path, {"settings": row_settings, "row": row})
        rows.append(row)
    first = specs[0]
    config = {"steps_per_task": first.steps_per_task, "batch_size": first.batch_size,
              "lr": first.lr, "model_sizes": dict(MODEL_SIZES), "memory_chunk": MEMORY_CHUNK,
              "model_sets": list(first.model_sets), "state_policy": first.policy,
              "eval_budget": first.eval_budget, **(settings or {}),
              "monitor": None if monitor is None else dataclasses.asdict(monitor),
              "method_options": {s.method: method_options(s.method, s.options) for s in specs}}
    versions, machine = environment()
    results = {"format_version": 1, "stream": stream_info(stream), "config": config,
               "seeds": sorted({s.seed for s in specs}), "versions": versions,
               "machine": machine, "rows": rows}
    save_results(out, results)
    write_report(out, results)
    return results
