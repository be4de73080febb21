"""Continual-learning methods: how a model learns task after task.

Every method sees the same data, steps and seeds; the runner (``nestlearn.continual.runner``)
calls, per task i: ``begin_task``, then per step ``batch`` -> the learner's forward and loss
-> ``extra_loss`` -> the optimizer step (when ``trains(i)``) -> ``after_step``, and finally
``end_task``. Methods:

- ``finetune``: plain training on the current task.
- ``joint``: at stage i every batch row picks a task of 0..i uniformly at random (the upper
  bound that sees all earlier data again).
- ``ewc``: after each task a diagonal Fisher from its training data (the empirical Fisher:
  squared gradients of ``fisher_samples`` single examples, each from a fresh state) and an
  anchor (the weights then); the loss adds ``lambda / 2 * sum_k sum F_k (theta - theta*_k)^2``
  over every task k so far (one anchor per task). Parameters are matched by name and shape.
- ``online-ewc``: one running Fisher ``F <- gamma * F + F_task`` and one anchor (the latest
  task's weights): ``lambda / 2 * sum F (theta - theta*)^2``.
- ``replay``: a reservoir buffer of ``buffer_size`` training rows (every row seen so far is
  kept with the same probability); each step draws ``replay_batch`` rows from it (None: the
  batch size) and adds their mean loss, from a fresh state, to the current batch's.
- ``lwf``: Learning without Forgetting: at the start of task i >= 1 a frozen copy of the model
  is the teacher; the loss adds ``alpha * T^2 * KL(teacher_T || student_T)`` on the current
  batch (softmax at temperature T): for classification over the classes of earlier tasks
  only, for LM / forecasting over the next-token distribution. Under the carry policy the
  teacher carries its own state.
- ``inner-only``: the weights train on task 0 only and are then frozen (no optimizer step);
  later tasks only run through the inner loop: memory states carried (carry policy), CMS
  levels learning from the LM teach signal when the model has them (LM and forecast; a
  classifier's CMS levels keep their local signal). For a Transformer nothing changes after
  task 0: it has no inner loop (its KV cache is not carried).
- ``nested``: the model's own levels: state carried (carry policy), CMS teach signal "lm"
  (LM and forecast models with CMS), and the outer optimizer in levels
  (``nestlearn.optim.MultiFrequency``, gathered gradients averaged): the parameters of CMS
  level k (``*.cms.initial.k.*``, ``*.cms.norms.k.*``, ``*.cms.local_targets.k``) step every
  ``min(chunk_size_k, max(1, steps_per_task // period_cap_div))`` steps, everything else
  every step. The chunk size is the level's period in tokens inside a sequence; read as
  steps it keeps the levels' ratios, and the cap keeps the slowest level updating at least
  ``period_cap_div`` times per task. Archs without CMS get one level (period 1).

Method options: ``METHOD_DEFAULTS`` holds every method's options and defaults, in one place;
``RowSpec.options`` overrides them, and an unknown option is refused.
"""

from __future__ import annotations

import copy
import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.continual.learners import Batch, Learner
from nestlearn.errors import NestlearnError, check_decay, check_int, check_nonnegative, invalid
from nestlearn.optim import MultiFrequency
from nestlearn.training.carried_state import carried_form

BETAS = (0.9, 0.98)

METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "finetune": {},
    "joint": {},
    "ewc": {"lambda": 1000.0, "fisher_samples": 64},
    "online-ewc": {"lambda": 1000.0, "gamma": 0.9, "fisher_samples": 64},
    "replay": {"buffer_size": 256, "replay_batch": None},
    "lwf": {"temperature": 2.0, "alpha": 1.0},
    "inner-only": {},
    "nested": {"period_cap_div": 4},
}
METHODS: tuple[str, ...] = tuple(METHOD_DEFAULTS)


def method_options(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults of method ``name`` with ``options`` applied; unknown keys are refused."""
    if name not in METHOD_DEFAULTS:
        raise invalid("method", repr(name), f"one of {list(METHODS)}")
    defaults = METHOD_DEFAULTS[name]
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) if defaults else "none"
        raise NestlearnError(f"options for {name}: unknown {unknown}; allowed: {allowed}")
    return {**defaults, **options}


class Method:
    """The default behaviour (finetune); subclasses override the hooks they need."""

    name: ClassVar[str] = "finetune"
    # the state policy the method needs (None: any, "reset" by default)
    required_policy: ClassVar[str | None] = None
    # CMS levels learn from the LM teach signal (LM and forecast models)
    teach_lm: ClassVar[bool] = False

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = method_options(self.name, options)
        self.seed = 0
        self.steps_per_task = 1
        self.extra_tokens = 0  # tokens read beyond the current batch (replay), for resources

    def setup(self, seed: int, steps_per_task: int) -> None:
        self.seed = seed
        self.steps_per_task = steps_per_task

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=0.0)

    def begin_task(self, learner: Learner, task_index: int) -> None:
        """Called before the first step of each task."""

    def batch(self, learner: Learner, task_index: int, generator: torch.Generator) -> Batch:
        split = learner.stream.tasks[task_index].train
        return learner.draw(split, learner.batch_size, generator)

    def extra_loss(self, learner: Learner, batch: Batch, logits: torch.Tensor,
                   task_index: int) -> torch.Tensor | None:
        """A term added to the batch's loss (None: nothing)."""
        return None

    def trains(self, task_index: int) -> bool:
        """Whether the outer weights take optimizer steps on this task."""
        return True

    def after_step(self, learner: Learner, batch: Batch, task_index: int) -> None:
        """Called after each step with the batch of the current task."""

    def end_task(self, learner: Learner, task_index: int) -> None:
        """Called after the last step of each task, before evaluation."""

    def extras(self) -> dict[str, Any]:
        return {}


class Finetune(Method):
    name = "finetune"


class Joint(Method):
    name = "joint"

    def batch(self, learner: Learner, task_index: int, generator: torch.Generator) -> Batch:
        """Each row from a task of 0..i picked uniformly at random."""
        n = learner.batch_size
        pick = torch.randint(0, task_index + 1, (n,), generator=generator)
        rows: list[Batch] = []
        order: list[torch.Tensor] = []
        for task in range(task_index + 1):
            where = (pick == task).nonzero().flatten()
            if where.numel() == 0:
                continue
            full = learner.draw(learner.stream.tasks[task].train, n, generator)
            rows.append(full.select(where))
            order.append(where)
        batch = Batch.cat(rows)
        return batch.select(torch.argsort(torch.cat(order)))


def empirical_fisher(learner: Learner, task_index: int, samples: int,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over ``samples`` single training examples (random,
    each from a fresh state) of the squared gradient of the example's loss."""
    model = learner.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    split = learner.stream.tasks[task_index].train
    for _ in range(samples):
        batch = learner.draw(split, 1, generator, sequential=False)
        logits, _ = learner.forward(batch, None)
        loss = learner.loss(logits, batch)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads, strict=True):
            if grad is not None:
                fisher[name] += grad.detach() ** 2
    return {n: f / samples for n, f in fisher.items()}


def ewc_penalty(model: nn.Module, anchors: list[tuple[dict[str, torch.Tensor],
                                                      dict[str, torch.Tensor]]],
                strength: float) -> torch.Tensor:
    """``strength / 2 * sum_k sum F_k (theta - theta*_k)^2`` over (Fisher, anchor) pairs;
    parameters are matched by name and shape (others add nothing)."""
    total = torch.zeros(())
    for name, param in model.named_parameters():
        for fisher, anchor in anchors:
            if name in fisher and fisher[name].shape == param.shape:
                total = total + (fisher[name] * (param - anchor[name]) ** 2).sum()
    return strength / 2 * total


class EWC(Method):
    name = "ewc"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.strength = check_nonnegative("lambda", self.options["lambda"])
        self.samples = check_int("fisher_samples", self.options["fisher_samples"])
        self.anchors: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def extra_loss(self, learner: Learner, batch: Batch, logits: torch.Tensor,
                   task_index: int) -> torch.Tensor | None:
        if not self.anchors:
            return None
        return ewc_penalty(learner.model, self.anchors, self.strength)

    def _fisher(self, learner: Learner, task_index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1009 + task_index)
        return empirical_fisher(learner, task_index, self.samples, generator)

    @staticmethod
    def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def end_task(self, learner: Learner, task_index: int) -> None:
        self.anchors.append((self._fisher(learner, task_index), self._weights(learner.model)))


class OnlineEWC(EWC):
    name = "online-ewc"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.gamma = check_decay("gamma", self.options["gamma"])

    def end_task(self, learner: Learner, task_index: int) -> None:
        fisher = self._fisher(learner, task_index)
        if self.anchors:
            old = self.anchors[0][0]
            fisher = {n: f + self.gamma * old[n] if n in old and old[n].shape == f.shape else f
                      for n, f in fisher.items()}
        self.anchors = [(fisher, self._weights(learner.model))]


class ReservoirBuffer:
    """A fixed-size uniform sample of every row added so far (reservoir sampling: the n-th row
    replaces a random slot with probability ``capacity / n``)."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity = check_int("buffer_size", capacity)
        self.generator = generator
        self.rows: list[Batch] = []
        self.seen = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, batch: Batch) -> None:
        n = batch.size
        # the n-th row's slot: uniform in [0, n), one draw per row
        seen = torch.arange(self.seen + 1, self.seen + n + 1, dtype=torch.float64)
        slots = (torch.rand(n, generator=self.generator, dtype=torch.float64) * seen).long()
        for row, slot in enumerate(slots.tolist()):
            self.seen += 1
            if len(self.rows) < self.capacity:
                self.rows.append(batch.row(row))
            elif slot < self.capacity:
                self.rows[slot] = batch.row(row)

    def sample(self, n: int) -> Batch:
        index = torch.randint(0, len(self.rows), (n,), generator=self.generator).tolist()
        rows = [self.rows[i] for i in index]
        width = max(r.inputs.shape[1] for r in rows)
        return Batch.cat([_pad(r, width) for r in rows])


def _pad(row: Batch, width: int) -> Batch:
    """A classification row right padded to ``width`` (its length says what is valid)."""
    extra = width - row.inputs.shape[1]
    if extra == 0:
        return row
    return Batch(F.pad(row.inputs, (0, extra)), row.targets, row.lengths, row.values)


class Replay(Method):
    name = "replay"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.capacity = check_int("buffer_size", self.options["buffer_size"])
        size = self.options["replay_batch"]
        self.replay_batch = None if size is None else check_int("replay_batch", size)
        self.buffer: ReservoirBuffer | None = None

    def setup(self, seed: int, steps_per_task: int) -> None:
        super().setup(seed, steps_per_task)
        self.buffer = ReservoirBuffer(self.capacity, torch.Generator().manual_seed(seed + 7919))

    def extra_loss(self, learner: Learner, batch: Batch, logits: torch.Tensor,
                   task_index: int) -> torch.Tensor | None:
        if self.buffer is None or not len(self.buffer):
            return None
        old = self.buffer.sample(self.replay_batch or learner.batch_size)
        self.extra_tokens += learner.tokens(old)
        old_logits, _ = learner.forward(old, None)
        return learner.loss(old_logits, old)

    def after_step(self, learner: Learner, batch: Batch, task_index: int) -> None:
        if self.buffer is not None:
            self.buffer.add(batch)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float
                 ) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over rows (all
    dims but the last); zero when the student's logits equal the teacher's."""
    t = temperature
    student = student.reshape(-1, student.shape[-1]).float()
    teacher = teacher.reshape(-1, teacher.shape[-1]).float()
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                  log_target=True, reduction="batchmean")
    return t * t * kl


class LwF(Method):
    name = "lwf"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.temperature = float(self.options["temperature"])
        if not self.temperature > 0:
            raise invalid("temperature", self.temperature, "a float > 0")
        self.alpha = check_nonnegative("alpha", self.options["alpha"])
        self.teacher: nn.Module | None = None
        self.teacher_state: Any = None
        self.old_classes: list[int] = []

    def begin_task(self, learner: Learner, task_index: int) -> None:
        if task_index == 0:
            return
        self.teacher = copy.deepcopy(learner.model).eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.teacher_state = learner.carried
        stream = learner.stream
        if stream.kind == "classification":
            self.old_classes = sorted({c for task in stream.tasks[:task_index]
                                       for c in task.classes})

    def extra_loss(self, learner: Learner, batch: Batch, logits: torch.Tensor,
                   task_index: int) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        student_model = learner.model
        with torch.no_grad():
            learner.model = self.teacher
            try:
                teacher_logits, state = learner.forward(
                    batch, self.teacher_state if learner.carry else None)
            finally:
                learner.model = student_model
        if learner.carry:
            self.teacher_state = carried_form(state)
        if self.old_classes:
            keep = torch.tensor(self.old_classes)
            logits, teacher_logits = logits[..., keep], teacher_logits[..., keep]
        return self.alpha * distill_loss(logits, teacher_logits, self.temperature)


class InnerOnly(Method):
    name = "inner-only"
    required_policy = "carry"
    teach_lm = True

    def trains(self, task_index: int) -> bool:
        return task_index == 0

    def end_task(self, learner: Learner, task_index: int) -> None:
        if task_index == 0:
            for param in learner.model.parameters():
                param.requires_grad_(False)


_CMS_PARAM = re.compile(r"\.cms\.(?:initial|norms|local_targets)\.(\d+)(?:\.|$)")


def level_periods(model: nn.Module, steps_per_task: int, cap_div: int
                  ) -> dict[str, int]:
    """Parameter name -> update period in steps for ``nested``: CMS level k's parameters
    ``min(chunk_size_k, max(1, steps_per_task // cap_div))``, the others 1."""
    cms = getattr(model, "config", None)
    backbone = getattr(cms, "backbone", cms)  # a classifier's config holds its backbone's
    chunk_sizes = backbone.cms.chunk_sizes if getattr(backbone, "cms", None) else ()
    cap = max(1, steps_per_task // cap_div)
    periods = {}
    for name, _ in model.named_parameters():
        match = _CMS_PARAM.search(name)
        level = int(match.group(1)) if match else None
        periods[name] = 1 if level is None else min(chunk_sizes[level], cap)
    return periods


class Nested(Method):
    name = "nested"
    required_policy = "carry"
    teach_lm = True

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.cap_div = check_int("period_cap_div", self.options["period_cap_div"])
        self.periods: dict[str, int] = {}

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        self.periods = level_periods(model, self.steps_per_task, self.cap_div)
        groups: dict[int, list[torch.Tensor]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault(self.periods[name], []).append(param)
        base = torch.optim.AdamW([{"params": ps, "period": period}
                                  for period, ps in sorted(groups.items())],
                                 lr=lr, betas=BETAS, weight_decay=0.0)
        return MultiFrequency(base, reduction="mean")

    def extras(self) -> dict[str, Any]:
        return {"level_periods": sorted({p for p in self.periods.values()})}


_CLASSES: dict[str, type[Method]] = {cls.name: cls for cls in
                                     (Finetune, Joint, EWC, OnlineEWC, Replay, LwF, InnerOnly,
                                      Nested)}


def make_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """A fresh method object (it holds per-row state: anchors, buffer, teacher)."""
    if name not in _CLASSES:
        raise invalid("method", repr(name), f"one of {list(METHODS)}")
    return _CLASSES[name](options)
