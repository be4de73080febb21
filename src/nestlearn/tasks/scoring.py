"""Scoring a model on a task's evaluation set, and the group-by behind every report table.

Each answer gets ``correct`` (the arg-max of the logits is the answer token) and ``loss``
(its cross-entropy in nats); a table groups answers by tag values and reports the answer
accuracy, the exact-match rate of the examples (all their answers in the group right) or the
mean loss.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.tasks.example import Example, collate
from nestlearn.tasks.spec import Table

# Examples per forward pass in evaluation (sorted by length so a batch pads little).
EVAL_BATCH = 16


@dataclass(frozen=True)
class AnswerScores:
    """One entry per answer of the evaluation set: which example it belongs to, whether it was
    predicted right, its loss, and its tags."""

    example: list[int]
    correct: list[bool]
    loss: list[float]
    tags: dict[str, list[int]]


@torch.no_grad()
def score_answers(model: nn.Module, examples: Sequence[Example], pad_id: int,
                  batch_size: int = EVAL_BATCH) -> AnswerScores:
    """Run ``model`` (a causal LM: ids -> (logits, state)) over ``examples`` from an empty
    state each and score every answer."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    found: dict[int, tuple[list[bool], list[float]]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate([examples[i] for i in rows], pad_id)
        logits, _ = model(batch.inputs)
        for row, index in enumerate(rows):
            where = batch.scored[row]
            answer_logits = logits[row, where].float()
            targets = batch.targets[row, where]
            losses = F.cross_entropy(answer_logits, targets, reduction="none")
            correct = answer_logits.argmax(-1) == targets
            found[index] = (correct.tolist(), losses.tolist())
    model.train(was_training)
    scores = AnswerScores([], [], [], {name: [] for name in examples[0].tags})
    for index, example in enumerate(examples):
        correct, losses = found[index]
        scores.example.extend([index] * len(correct))
        scores.correct.extend(correct)
        scores.loss.extend(losses)
        for name, values in example.tags.items():
            scores.tags[name].extend(values)
    return scores


def bucket(value: int) -> int:
    """The power of two at or below ``value`` (0 stays 0)."""
    return 0 if value <= 0 else 1 << (value.bit_length() - 1)


def group_key(scores: AnswerScores, table: Table, answer: int) -> tuple[int, ...]:
    return tuple(bucket(scores.tags[t][answer]) if t in table.buckets else scores.tags[t][answer]
                 for t in table.tags)


def table_values(scores: AnswerScores, table: Table) -> dict[tuple[int, ...], float]:
    """``table.metric`` for each group of answers (keys: the tag values, sorted)."""
    members: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for answer in range(len(scores.correct)):
        if all(scores.tags[name][answer] == value for name, value in table.where):
            members[group_key(scores, table, answer)].append(answer)
    values = {}
    for key in sorted(members):
        answers = members[key]
        if table.metric == "accuracy":
            values[key] = sum(scores.correct[a] for a in answers) / len(answers)
        elif table.metric == "loss":
            values[key] = sum(scores.loss[a] for a in answers) / len(answers)
        else:
            right: dict[int, bool] = defaultdict(lambda: True)
            for a in answers:
                right[scores.example[a]] &= scores.correct[a]
            values[key] = sum(right.values()) / len(right)
    return values
