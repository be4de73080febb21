"""Split and permuted image streams over small digit sets: pixels are tokens in row-major
order, one class per digit.

- split: 5 tasks of 2 digits each, (0, 1), (2, 3), ... (class-incremental);
- permuted: ``tasks`` tasks over all 10 digits, task 0 the pixels as they are, every later
  task a fixed seeded permutation of the pixel positions (domain-incremental).

The train / validation / test cut (70 / 15 / 15, stratified by digit) is seeded; the loaders
of the pixel arrays live in :mod:`.digits` and :mod:`.mnist`.
"""

from __future__ import annotations

import numpy as np
import torch

from nestlearn.continual.stream import ClassSplit, Stream, Task
from nestlearn.continual.streams._common import knob_int, stratified_cut
from nestlearn.errors import NestlearnError

CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
SPLIT_TASKS = 5


def _rows(tokens: np.ndarray, labels: np.ndarray, index: np.ndarray,
          permutation: np.ndarray | None = None) -> ClassSplit:
    inputs = torch.from_numpy(tokens[index] if permutation is None
                              else tokens[index][:, permutation]).long()
    return ClassSplit(inputs, torch.full((len(index),), tokens.shape[1], dtype=torch.long),
                      torch.from_numpy(labels[index]).long())


def _cap(index: np.ndarray, labels: np.ndarray, classes: tuple[int, ...], cap: int | None,
         rng: np.random.Generator) -> np.ndarray:
    """The members of ``index`` whose label is in ``classes``, at most ``cap`` per class."""
    keep = []
    for c in classes:
        members = index[labels[index] == c]
        if cap is not None and len(members) > cap:
            members = np.sort(rng.choice(members, size=cap, replace=False))
        keep.append(members)
    return np.sort(np.concatenate(keep))


def build_images(name: str, tokens: np.ndarray, labels: np.ndarray, vocab_size: int, *,
                 seed: int, permuted: bool, tasks: int | None,
                 examples_per_class: int | None, description: str, meta: dict) -> Stream:
    """A split or permuted stream over ``tokens [N, T]`` (ints < ``vocab_size``)."""
    if examples_per_class is not None:
        examples_per_class = knob_int(name, "examples_per_class", examples_per_class)
    if permuted:
        tasks = 5 if tasks is None else knob_int(name, "tasks", tasks)
    else:
        tasks = SPLIT_TASKS if tasks is None else knob_int(name, "tasks", tasks)
        if tasks > SPLIT_TASKS:
            raise NestlearnError(f"stream {name!r}: tasks: got {tasks}; allowed: 1 to "
                                 f"{SPLIT_TASKS}")
    rng = np.random.default_rng(seed)
    cut = stratified_cut(labels, rng)
    seq_len = tokens.shape[1]
    built = []
    permutations: list[list[int]] = []
    for t in range(tasks):
        if permuted:
            classes = tuple(range(10))
            permutation = (np.arange(seq_len) if t == 0 else rng.permutation(seq_len))
            permutations.append(permutation.tolist())
            task_name = "identity" if t == 0 else f"permutation {t}"
        else:
            classes = (2 * t, 2 * t + 1)
            permutation = None
            task_name = f"{2 * t}-{2 * t + 1}"
        train = _cap(cut[0], labels, classes, examples_per_class, rng)
        val = _cap(cut[1], labels, classes, None, rng)
        test = _cap(cut[2], labels, classes, None, rng)
        built.append(Task(name=task_name, classes=classes,
                          train=_rows(tokens, labels, train, permutation),
                          validation=_rows(tokens, labels, val, permutation),
                          test=_rows(tokens, labels, test, permutation)))
    meta = {**meta, "seed": seed, "split_sizes": [len(part) for part in cut]}
    if permuted:
        meta["permutations"] = permutations
    return Stream(name=name, kind="classification", tasks=tuple(built), vocab_size=vocab_size,
                  seq_len=seq_len, class_names=CLASS_NAMES, description=description, meta=meta)
