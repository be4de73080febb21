"""``nestlearn tasks run``: train every (arch, seed) on a task, score it, write the report.

Layout of ``OUT/NAME/``: ``runs/ARCH-seedS.json`` (one trained model's settings, training
losses and table values), ``results.json`` (every run and the summary across seeds),
``results.md`` and one PNG per table. A run file whose settings (task, budget, model config)
equal the ones asked for is reused rather than trained again, and the report covers every run
in the folder with the current settings, so archs and seeds can be added by later commands
(e.g. more seeds for the fast archs) and a stopped command resumes where it was. The settings
cannot see a change of the code itself (a new default that is not a config field): after one,
``retrain`` (``--retrain``) trains the asked runs again, or use a new folder.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestlearn.atomic import atomic_write_text
from nestlearn.errors import NestlearnError, NonFiniteError, check_int, invalid
from nestlearn.tasks.gates import memory_gate_stats
from nestlearn.tasks.models import TASK_ARCHS, task_model_configs
from nestlearn.tasks.niah import KINDS
from nestlearn.tasks.plots import plot_summary
from nestlearn.tasks.registry import expand, task_spec
from nestlearn.tasks.report import key_label, markdown, summarize
from nestlearn.tasks.scoring import score_answers, table_values
from nestlearn.tasks.spec import TaskSpec
from nestlearn.tasks.training import eval_rng, train_model

# The share of the last steps whose mean training loss is reported as the final one.
FINAL_SHARE = 0.1
# Evaluation examples (spread over the set) on which the memories' gates are read.
GATE_EXAMPLES = 64


def progress_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TaskRun:
    """What ``nestlearn tasks run`` was asked for (``steps`` None: the task's budget)."""

    name: str
    archs: tuple[str, ...] = TASK_ARCHS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None
    out: Path = Path("results/tasks")
    quick: bool = False
    sets: tuple[str, ...] = ()
    corpus: str | None = None
    retrain: bool = False

    def __post_init__(self) -> None:
        if not self.archs:
            raise invalid("--archs", "nothing", f"one or more of {', '.join(TASK_ARCHS)}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                 for s in self.seeds):
            raise invalid("--seeds", list(self.seeds), "one or more ints >= 0")
        if self.steps is not None:
            check_int("--steps", self.steps)

    def command(self, name: str) -> str:
        """The command line that reruns this for task ``name``."""
        parts = ["nestlearn", "tasks", "run", name, "--archs", *self.archs,
                 "--seeds", *map(str, self.seeds)]
        if self.steps is not None:
            parts += ["--steps", str(self.steps)]
        if self.quick:
            parts.append("--quick")
        if self.corpus is not None and KINDS.get(name) is not None and KINDS[name].real_text:
            parts += ["--corpus", self.corpus]
        for assignment in self.sets:
            parts += ["--set", assignment]
        parts += ["--out", str(self.out)]
        return shlex.join(parts)


def resolved_spec(request: TaskRun, name: str) -> TaskSpec:
    real_text = name in KINDS and KINDS[name].real_text
    spec = task_spec(name, request.quick, request.corpus if real_text else None)
    if request.steps is not None:
        spec = dataclasses.replace(spec, budget=dataclasses.replace(spec.budget,
                                                                    steps=request.steps))
    return spec


def run_settings(spec: TaskSpec, request: TaskRun, model: dict[str, Any]) -> dict[str, Any]:
    """What a stored run must match to be reused (JSON round-tripped, so lists not tuples)."""
    return json.loads(json.dumps({"task": spec.name, "quick": request.quick,
                                  "budget": dataclasses.asdict(spec.budget),
                                  "task_settings": spec.settings, "model": model}))


def train_and_score(spec: TaskSpec, config: Any, seed: int, examples: list,
                    label: str, report_every: int) -> dict[str, Any]:
    """One (arch, seed): train, score every table, return the run record."""
    def show(step: int, loss: float) -> None:
        progress_line(f"{label}: step {step}/{spec.budget.steps} answer loss {loss:.3f}")

    model, losses = train_model(spec, config, seed, spec.budget, show, report_every)
    progress_line(f"{label}: evaluating {len(examples)} examples")
    scores = score_answers(model, examples, spec.pad_id)
    tables = {table.title: [{"key": list(key), "value": value}
                            for key, value in table_values(scores, table).items()]
              for table in spec.tables}
    tail = losses[-max(1, round(FINAL_SHARE * len(losses))):]
    gates = memory_gate_stats(model, examples[::max(1, len(examples) // GATE_EXAMPLES)],
                              spec.pad_id)
    run = {"arch": config.arch, "seed": seed,
           "parameters": sum(p.numel() for p in model.parameters()),
           "final_loss": sum(tail) / len(tail), "losses": losses, "tables": tables}
    return {**run, "gates": gates} if gates else run


def stored_runs(folder: Path, wanted: Callable[[str], dict[str, Any] | None]
                ) -> list[dict[str, Any]]:
    """The run files in ``folder`` whose settings equal ``wanted(arch)``, ordered by arch (as
    in ``TASK_ARCHS``, others after) and seed."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(run, dict) and run.get("settings") == wanted(run.get("arch", "")):
            runs.append(run)
    order = {arch: i for i, arch in enumerate(TASK_ARCHS)}
    return sorted(runs, key=lambda r: (order.get(r["arch"], len(order)), r["arch"], r["seed"]))


def run_task(request: TaskRun, name: str) -> Path:
    """Train and score every (arch, seed) of ``request`` on task ``name``; write the report
    into ``request.out / name`` and return that folder."""
    spec = resolved_spec(request, name)
    configs = task_model_configs(request.archs, spec.vocab_size, request.sets)
    folder = request.out / name
    runs_dir = folder / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    examples: list | None = None
    report_every = max(1, spec.budget.steps // 10)
    for arch, config in configs.items():
        settings = run_settings(spec, request, config.to_dict())
        for seed in request.seeds:
            path = runs_dir / f"{arch}-seed{seed}.json"
            label = f"[{name}] {arch} seed {seed}"
            if not request.retrain and path.exists() and _settings_of(path) == settings:
                progress_line(f"{label}: reusing {path}")
                continue
            if examples is None:
                examples = spec.eval_examples(eval_rng(spec))
            try:
                run = train_and_score(spec, config, seed, examples, label, report_every)
            except NonFiniteError as err:
                # one diverging model is a result to report, not the end of the command
                progress_line(f"{label}: failed: {err}")
                run = {"arch": arch, "seed": seed, "failed": str(err)}
            atomic_write_text(path, json.dumps({**run, "settings": settings}) + "\n")
            progress_line(f"{label}: {_first_table_line(spec, run)}")

    def wanted(arch: str) -> dict[str, Any] | None:
        """The settings a stored run of ``arch`` needs to join the report (any arch: runs of
        archs not named this time count too when the same ``--set`` fits them)."""
        if arch not in configs:
            try:
                with_arch = dict.fromkeys([*request.archs, arch])
                configs[arch] = task_model_configs(with_arch, spec.vocab_size,
                                                   request.sets)[arch]
            except NestlearnError:
                return None
        return run_settings(spec, request, configs[arch].to_dict())

    runs = stored_runs(runs_dir, wanted)
    summary = summarize(spec, runs)
    command = request.command(name)
    brief = [{key: run[key] for key in ("arch", "seed", "parameters", "final_loss", "gates",
                                     "failed")
              if key in run} for run in runs]
    atomic_write_text(folder / "results.json", json.dumps(
        {"task": name, "description": spec.description, "command": command,
         "budget": dataclasses.asdict(spec.budget), "settings": spec.settings,
         "models": {run["arch"]: configs[run["arch"]].to_dict() for run in runs},
         "runs": brief, "tables": summary}, indent=1) + "\n")
    atomic_write_text(folder / "results.md", markdown(spec, summary, runs, command) + "\n")
    plots = plot_summary(summary, name, folder)
    progress_line(f"[{name}] wrote {folder}/results.json, results.md"
                  + (f" and {len(plots)} plots" if plots else " (no matplotlib: no plots)"))
    return folder


def _first_table_line(spec: TaskSpec, run: dict[str, Any]) -> str:
    if "failed" in run:
        return "no scores (training failed)"
    table = spec.tables[0]
    values = ", ".join(f"{key_label(spec, table, row['key'])}: {row['value']:.2f}"
                       for row in run["tables"][table.title])
    return f"{table.title}: {values}"


def _settings_of(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()).get("settings")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def run_tasks(request: TaskRun) -> list[Path]:
    """``run_task`` for every task ``request.name`` names (a task or a group)."""
    names = expand(request.name)
    if request.corpus is not None and not any(n in KINDS and KINDS[n].real_text
                                              for n in names):
        raise invalid("--corpus", repr(request.corpus),
                      "only with s-niah-2, s-niah-3 or the s-niah group (real text)")
    return [run_task(request, name) for name in names]

