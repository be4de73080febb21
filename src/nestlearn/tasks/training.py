"""Training one tiny model on one task: AdamW, linear warmup then cosine decay, the loss only on
the answer tokens (``IGNORE_INDEX`` everywhere else), gradients clipped at norm 1.

Every example is a fresh sequence from an empty state. The training stream is seeded by the
task and the seed (``random.Random("NAME/train/SEED")``) and the initial weights by the seed,
so a run is reproducible; evaluation uses its own seed (``EVAL_SEED``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from nestlearn.errors import NonFiniteError
from nestlearn.losses import lm_loss_sum, scored_targets
from nestlearn.models import CausalLM, ModelConfig, build_model
from nestlearn.tasks.example import collate
from nestlearn.tasks.spec import Budget, TaskSpec
from nestlearn.training.schedule import WarmupCosine

GRAD_CLIP = 1.0
BETAS = (0.9, 0.98)


def train_rng(spec: TaskSpec, seed: int) -> random.Random:
    return random.Random(f"{spec.name}/train/{seed}")


def eval_rng(spec: TaskSpec) -> random.Random:
    return random.Random(f"{spec.name}/eval")


def train_model(spec: TaskSpec, config: ModelConfig, seed: int, budget: Budget,
                progress: Callable[[int, float], None] | None = None,
                report_every: int = 25) -> tuple[CausalLM, list[float]]:
    """A model of ``config`` trained on ``spec`` for ``budget.steps`` steps; returns it and the
    answer loss of every step. ``progress(step, mean loss since the last report)`` is called
    every ``report_every`` steps and at the end."""
    torch.manual_seed(seed)
    model = build_model(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=budget.lr, betas=BETAS,
                                  weight_decay=0.0)
    schedule = WarmupCosine(optimizer, max(1, budget.steps // 10), budget.steps)
    rng = train_rng(spec, seed)
    losses: list[float] = []
    reported = 0
    for step in range(budget.steps):
        batch = collate([spec.train_example(rng) for _ in range(budget.batch_size)], spec.pad_id)
        schedule.apply(step)
        logits, _ = model(batch.inputs)
        loss = lm_loss_sum(logits, batch.targets) / scored_targets(batch.targets)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteError(f"{spec.name} {config.arch} seed {seed}: the loss is {value} "
                                 f"at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        losses.append(value)
        done = step + 1
        if progress is not None and (done % report_every == 0 or done == budget.steps):
            recent = losses[reported:]
            progress(done, sum(recent) / len(recent))
            reported = done
    return model, losses
