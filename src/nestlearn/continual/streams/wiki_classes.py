"""``wiki-classes``: class-incremental topic classification of Wikipedia summaries.

The 11 topics of nestlearn.data.wiki.TOPICS (class id = index) are cut, in that order, into
tasks of ``classes_per_task`` classes; the classes left over join the last task. Inputs are
the summaries' bytes cut to ``seq_len`` and padded with the pad id. Training examples are
balanced (the same number per class, at most ``examples_per_class``); validation and test keep
every document of the class in the documents' own split.
"""

from __future__ import annotations

import numpy as np

from nestlearn.continual.stream import Stream, Task
from nestlearn.continual.streams._common import BYTES, knob_int, text_rows
from nestlearn.data import wiki
from nestlearn.data.corpora import load_split_records
from nestlearn.errors import NestlearnError

NAME = "wiki-classes"
# Below this many validation or test documents a class is listed in meta["small_eval"].
SMALL_EVAL = 30
# A class with fewer evaluation documents than this cannot be scored at all.
MIN_EVAL = 5


def build(*, seed: int = 0, classes_per_task: int = 2, seq_len: int = 128,
          examples_per_class: int = 200, tasks: int | None = None) -> Stream:
    """``tasks`` (default all) tasks of ``classes_per_task`` topics each."""
    classes_per_task = knob_int(NAME, "classes_per_task", classes_per_task)
    seq_len = knob_int(NAME, "seq_len", seq_len)
    examples_per_class = knob_int(NAME, "examples_per_class", examples_per_class)
    most = len(wiki.TOPICS) // classes_per_task
    if most < 1:
        raise NestlearnError(f"stream {NAME!r}: classes_per_task: got {classes_per_task}; "
                             f"allowed: 1 to {len(wiki.TOPICS)}")
    tasks = most if tasks is None else knob_int(NAME, "tasks", tasks)
    if tasks > most:
        raise NestlearnError(f"stream {NAME!r}: tasks: got {tasks}; allowed: 1 to {most} "
                             f"with classes_per_task={classes_per_task}")
    groups = [list(range(i * classes_per_task, (i + 1) * classes_per_task)) for i in range(most)]
    groups[-1].extend(range(most * classes_per_task, len(wiki.TOPICS)))
    groups = groups[:tasks]
    try:
        by_split = {split: load_split_records("wiki", split)
                    for split in ("train", "validation", "test")}
    except NestlearnError as err:
        raise NestlearnError(f"stream {NAME!r}: {err}") from None
    texts: dict[str, dict[int, list[str]]] = {
        split: {c: [d.text for d in records if d.label == wiki.TOPICS[c]]
                for c in range(len(wiki.TOPICS))}
        for split, records in by_split.items()}
    used = sorted(c for group in groups for c in group)
    per_class = min(examples_per_class, *(len(texts["train"][c]) for c in used))
    eval_counts = {split: {wiki.TOPICS[c]: len(texts[split][c]) for c in used}
                   for split in ("validation", "test")}
    for split, counts in eval_counts.items():
        for topic, count in counts.items():
            if count < MIN_EVAL:
                raise NestlearnError(f"stream {NAME!r}: topic {topic!r} has {count} {split} "
                                     f"documents; allowed: >= {MIN_EVAL}")
    rng = np.random.default_rng(seed)
    built = []
    for group in groups:
        rows: dict[str, tuple[list[str], list[int]]] = {}
        for split in ("train", "validation", "test"):
            chosen_texts: list[str] = []
            chosen_labels: list[int] = []
            for c in group:
                pool = texts[split][c]
                if split == "train":
                    pool = [pool[int(i)] for i in rng.permutation(len(pool))[:per_class]]
                chosen_texts.extend(pool)
                chosen_labels.extend([c] * len(pool))
            # Interleave the classes so a plain batch walk sees all of them.
            order = rng.permutation(len(chosen_texts)) if split == "train" else range(
                len(chosen_texts))
            rows[split] = ([chosen_texts[int(i)] for i in order],
                           [chosen_labels[int(i)] for i in order])
        splits = {split: text_rows(t, labels, seq_len) for split, (t, labels) in rows.items()}
        built.append(Task(name=" + ".join(wiki.TOPICS[c] for c in group),
                          classes=tuple(group), **splits))
    small = sorted({topic for counts in eval_counts.values()
                    for topic, count in counts.items() if count < SMALL_EVAL})
    return Stream(
        name=NAME, kind="classification", tasks=tuple(built), vocab_size=BYTES.vocab_size,
        seq_len=seq_len, class_names=wiki.TOPICS,
        description=f"Wikipedia topics, {classes_per_task} new classes per task (bytes)",
        meta={"seed": seed, "train_per_class": per_class, "eval_per_class": eval_counts,
              "small_eval": small, "tokenizer": BYTES.describe()})
