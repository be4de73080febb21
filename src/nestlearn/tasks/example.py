"""One task example and a padded batch of them.

An ``Example`` is a whole token sequence plus the positions of its answer tokens: the model
reads ``tokens[:-1]`` and at input position ``i - 1`` must predict ``tokens[i]`` for every
answer position ``i``. Every other position is context, never scored (the loss is only on
answers). ``tags`` label each answer with the quantities the metrics group by (the number of
pairs, the key-query distance, the haystack length, the needle depth, ...), one value per
answer, so a table "accuracy by X" is a group-by over answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from nestlearn.errors import NestlearnError
from nestlearn.losses import IGNORE_INDEX

# A tag value at positions that are not answers (tags themselves are >= 0).
NO_TAG = -1


@dataclass(frozen=True)
class Example:
    """``tokens``: the sequence; ``answers``: indices into it (>= 1, increasing) of the tokens
    the model must predict; ``tags``: name -> one int per answer."""

    tokens: tuple[int, ...]
    answers: tuple[int, ...]
    tags: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.answers:
            raise NestlearnError("an example needs at least one answer position")
        if self.answers[0] < 1 or self.answers[-1] >= len(self.tokens) or any(
                a >= b for a, b in zip(self.answers, self.answers[1:], strict=False)):
            raise NestlearnError(f"answer positions {self.answers} are not increasing indices "
                                 f"in [1, {len(self.tokens)})")
        for name, values in self.tags.items():
            if len(values) != len(self.answers) or min(values) < 0:
                raise NestlearnError(f"tag {name!r} needs one value >= 0 per answer")

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        return tuple(self.tokens[i] for i in self.answers)


def with_tags(tokens: Sequence[int], answers: Sequence[int], **tags: int | Sequence[int]
              ) -> Example:
    """An ``Example``; a tag given as one int applies to every answer."""
    full = {name: (value,) * len(answers) if isinstance(value, int) else tuple(value)
            for name, value in tags.items()}
    return Example(tuple(tokens), tuple(answers), full)


@dataclass(frozen=True)
class TaskBatch:
    """``inputs`` [B, T] ids (right-padded), ``targets`` [B, T] the answer to predict at each
    input position or ``IGNORE_INDEX``, ``tags`` name -> [B, T] (``NO_TAG`` off answers)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    tags: dict[str, torch.Tensor]

    @property
    def scored(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX


def collate(examples: Sequence[Example], pad_id: int) -> TaskBatch:
    """Right-pad ``examples`` with ``pad_id`` into one ``TaskBatch`` (causal models never see
    the padding before an answer, so it changes nothing that is scored)."""
    if not examples:
        raise NestlearnError("collate needs at least one example")
    names = sorted(examples[0].tags)
    if any(sorted(e.tags) != names for e in examples):
        raise NestlearnError("examples of one batch must carry the same tags")
    length = max(len(e.tokens) for e in examples) - 1
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    tags = {name: torch.full((len(examples), length), NO_TAG, dtype=torch.long) for name in names}
    for row, example in enumerate(examples):
        tokens = torch.tensor(example.tokens, dtype=torch.long)
        inputs[row, :len(tokens) - 1] = tokens[:-1]
        where = torch.tensor(example.answers, dtype=torch.long) - 1
        targets[row, where] = tokens[where + 1]
        for name in names:
            tags[name][row, where] = torch.tensor(example.tags[name], dtype=torch.long)
    return TaskBatch(inputs, targets, tags)
