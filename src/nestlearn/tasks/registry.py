"""The tasks by name, at the default budget or the quick one (``--quick``: a smoke run that
finishes in a minute or two per task on one thread, too short to learn most tasks).

Each task trains on one range of sizes and is evaluated on it and beyond it: MQAR on more
pairs than training saw (and than the sliding window of ``titans-mag`` holds), S-NIAH on up to
8x the training length, formal languages and copy on strings up to 4x longer.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable

from nestlearn.errors import invalid
from nestlearn.tasks import copy as copy_task
from nestlearn.tasks import formal, mqar, niah
from nestlearn.tasks.example import Example
from nestlearn.tasks.haystack import corpus_text
from nestlearn.tasks.spec import Budget, Table, TaskSpec

NIAH_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
# Corpora the real-text needle tasks can draw their haystack from.
HAYSTACK_CORPORA: tuple[str, ...] = ("shakespeare", "wiki")


def add_tag(example: Example, name: str, value: int) -> Example:
    """``example`` with one more tag, ``value`` on every answer."""
    return dataclasses.replace(example, tags={**example.tags,
                                              name: (value,) * len(example.answers)})


def _mqar(quick: bool) -> TaskSpec:
    vocab = mqar.MQARVocab(keys=64, values=64)
    train_pairs = (2, 16) if quick else (2, 32)
    eval_pairs = (4, 8, 16, 24) if quick else (4, 8, 16, 32, 48)
    per_cell = 16 if quick else 64
    queries = 8

    def train_example(rng: random.Random) -> Example:
        pairs = rng.randint(*train_pairs)
        return mqar.mqar_example(rng, pairs, min(pairs, queries), vocab)

    def eval_examples(rng: random.Random) -> list[Example]:
        return [mqar.mqar_example(rng, n, min(n, queries), vocab)
                for n in eval_pairs for _ in range(per_cell)]

    return TaskSpec(
        "mqar", "multi-query associative recall: N key-value pairs, then 8 of the keys",
        vocab.size, mqar.PAD, train_example, eval_examples,
        Budget(60, 16) if quick else Budget(300, 32),
        (Table("accuracy by pairs", ("pairs",), "accuracy"),
         Table("accuracy by key-query distance", ("distance",), "accuracy",
               buckets=("distance",))),
        chance={"accuracy by pairs": 1 / vocab.values,
                "accuracy by key-query distance": 1 / vocab.values},
        settings={"train_pairs": list(train_pairs), "eval_pairs": list(eval_pairs),
                  "queries": queries, "keys": vocab.keys, "values": vocab.values})


def _niah(name: str, quick: bool, corpus: str) -> TaskSpec:
    kind = niah.needle_kind(name)
    train_length = 256
    eval_lengths = (256, 512, 1024) if quick else (256, 512, 1024, 2048)
    per_cell = 4 if quick else 16
    if kind.real_text:
        train_text: Callable[[], str] = functools.partial(corpus_text, corpus, "train")
        eval_text: Callable[[], str] = functools.partial(corpus_text, corpus, "test")
    else:
        train_text = eval_text = functools.partial(niah.filler_text, 2 * max(eval_lengths))

    def train_example(rng: random.Random) -> Example:
        return niah.niah_example(rng, name, train_length, rng.random(), train_text())

    def eval_examples(rng: random.Random) -> list[Example]:
        return [niah.niah_example(rng, name, length, depth, eval_text())
                for length in eval_lengths for depth in NIAH_DEPTHS for _ in range(per_cell)]

    source = f"{corpus} (train split for training, test split for evaluation)" \
        if kind.real_text else "repeated filler sentences"
    return TaskSpec(
        name, f"single needle in a haystack: a {kind.subject} in {source}",
        niah.VOCAB_SIZE, niah.PAD, train_example, eval_examples,
        Budget(40, 8) if quick else Budget(300, 16),
        (Table("exact match by length", ("length",), "exact"),
         Table("exact match by depth (%)", ("depth",), "exact"),
         Table("exact match by length and depth (%)", ("length", "depth"), "exact"),
         Table("answer-byte accuracy by length", ("length",), "accuracy")),
        settings={"train_length": train_length, "eval_lengths": list(eval_lengths),
                  "depths": list(NIAH_DEPTHS), "per_cell": per_cell,
                  "haystack": corpus if kind.real_text else "filler"})


def _formal(name: str, quick: bool) -> TaskSpec:
    ranges = ((1, 16), (17, 32), (33, 64)) if quick else ((1, 32), (33, 64), (65, 128))
    per_range = 64 if quick else 256

    def train_example(rng: random.Random) -> Example:
        return formal.formal_example(rng, name, *ranges[0])

    def eval_examples(rng: random.Random) -> list[Example]:
        return [add_tag(formal.formal_example(rng, name, low, high), "range", index)
                for index, (low, high) in enumerate(ranges) for _ in range(per_range)]

    labels = {index: f"{low}-{high}" + (" (train)" if index == 0 else "")
              for index, (low, high) in enumerate(ranges)}
    return TaskSpec(
        name, f"recognize {name}: accept or reject a string, trained on lengths "
        f"{ranges[0][0]}-{ranges[0][1]}",
        formal.VOCAB_SIZE, formal.PAD, train_example, eval_examples,
        Budget(60, 16) if quick else Budget(300, 32),
        (Table("accuracy by string length", ("range",), "accuracy"),),
        labels={"range": labels}, chance={"accuracy by string length": 0.5},
        settings={"ranges": [list(r) for r in ranges], "per_range": per_range})


def _copy(quick: bool) -> TaskSpec:
    vocab = copy_task.CopyVocab(symbols=32)
    train_lengths = (4, 16) if quick else (4, 32)
    eval_lengths = (8, 16, 32) if quick else (16, 32, 64, 128)
    per_length = 16 if quick else 64

    def train_example(rng: random.Random) -> Example:
        return copy_task.copy_example(rng, rng.randint(*train_lengths), vocab)

    def eval_examples(rng: random.Random) -> list[Example]:
        return [copy_task.copy_example(rng, n, vocab)
                for n in eval_lengths for _ in range(per_length)]

    return TaskSpec(
        "copy", "in-context copy: a random sequence shown twice; loss on each occurrence",
        vocab.size, copy_task.PAD, train_example, eval_examples,
        Budget(60, 16) if quick else Budget(300, 32),
        (Table("loss by occurrence (nats)", ("occurrence",), "loss"),
         Table("loss of the first occurrence by length (nats)", ("length",), "loss",
               where=(("occurrence", 1),)),
         Table("loss of the second occurrence by length (nats)", ("length",), "loss",
               where=(("occurrence", 2),)),
         Table("accuracy of the second occurrence by length", ("length",), "accuracy",
               where=(("occurrence", 2),))),
        labels={"occurrence": {1: "first", 2: "second"}},
        chance={"accuracy of the second occurrence by length": 1 / vocab.symbols},
        settings={"train_lengths": list(train_lengths), "eval_lengths": list(eval_lengths),
                  "symbols": vocab.symbols, "chance_loss": "ln(32) = 3.47"})


TASK_NAMES: tuple[str, ...] = ("mqar", *niah.KINDS, *formal.LANGUAGES, "copy")
# Names that run several tasks, one after the other.
GROUPS: dict[str, tuple[str, ...]] = {"s-niah": tuple(niah.KINDS),
                                      "formal": tuple(formal.LANGUAGES)}


def task_spec(name: str, quick: bool = False, corpus: str | None = None) -> TaskSpec:
    """The task ``name``; ``corpus`` picks the real text of S-NIAH-2/3 (default
    shakespeare) and is refused for every other task."""
    if name not in TASK_NAMES:
        raise invalid("task", repr(name), f"one of {', '.join(TASK_NAMES)}")
    real_text = name in niah.KINDS and niah.KINDS[name].real_text
    if corpus is not None and not real_text:
        raise invalid("--corpus", repr(corpus), "only with s-niah-2 or s-niah-3 (real text)")
    if corpus is not None and corpus not in HAYSTACK_CORPORA:
        raise invalid("--corpus", repr(corpus), f"one of {', '.join(HAYSTACK_CORPORA)}")
    if name == "mqar":
        return _mqar(quick)
    if name in niah.KINDS:
        return _niah(name, quick, corpus or "shakespeare")
    if name in formal.LANGUAGES:
        return _formal(name, quick)
    return _copy(quick)


def expand(name: str) -> tuple[str, ...]:
    """The tasks a name runs: a group's members, or the task itself."""
    if name in GROUPS:
        return GROUPS[name]
    if name not in TASK_NAMES:
        raise invalid("task", repr(name),
                      f"one of {', '.join(TASK_NAMES)}, or a group: {', '.join(GROUPS)}")
    return (name,)
