"""``domain-lm``: language modelling that moves from Shakespeare to Wikipedia topics.

Task 0 is the "shakespeare" corpus; each later task is the "wiki" documents of one topic.
Documents keep their own split (nestlearn.data.splits), are shuffled with the seed, turned into
bytes, joined with the end-of-document id and cut to the token budgets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nestlearn.continual.stream import Stream, Task
from nestlearn.continual.streams._common import BYTES, knob_int, lm_split
from nestlearn.data import wiki
from nestlearn.data.corpora import load_split_records
from nestlearn.errors import NestlearnError

NAME = "domain-lm"
DEFAULT_TOPICS: tuple[str, ...] = ("Mathematics", "Biology and health sciences", "History",
                                   "Technology")


def _records(corpus: str, split: str) -> list:
    try:
        return load_split_records(corpus, split)
    except NestlearnError as err:
        raise NestlearnError(f"stream {NAME!r}: {err}") from None


def build(*, seed: int = 0, train_tokens: int = 200_000, eval_tokens: int = 16_384,
          seq_len: int = 128, tasks: int | None = None,
          topics: Sequence[str] = DEFAULT_TOPICS) -> Stream:
    """Shakespeare, then one task per wiki topic (``tasks`` stages in all, default every topic).

    A task holds at most ``train_tokens`` training and ``eval_tokens`` validation and test
    tokens; a topic with less text keeps what it has (``meta["tokens"]`` says how many)."""
    train_tokens = knob_int(NAME, "train_tokens", train_tokens, 2)
    eval_tokens = knob_int(NAME, "eval_tokens", eval_tokens, 2)
    seq_len = knob_int(NAME, "seq_len", seq_len)
    topics = tuple(topics) if not isinstance(topics, str) else (topics,)
    for topic in topics:
        if topic not in wiki.TOPICS:
            raise NestlearnError(f"stream {NAME!r}: topics: got {topic!r}; allowed: "
                                 + ", ".join(repr(t) for t in wiki.TOPICS))
    if len(set(topics)) != len(topics):
        raise NestlearnError(f"stream {NAME!r}: topics repeat: {list(topics)}")
    tasks = 1 + len(topics) if tasks is None else knob_int(NAME, "tasks", tasks)
    if tasks > 1 + len(topics):
        raise NestlearnError(f"stream {NAME!r}: tasks: got {tasks}; allowed: 1 to "
                             f"{1 + len(topics)} (shakespeare + {len(topics)} topics)")
    rng = np.random.default_rng(seed)
    budgets = {"train": train_tokens, "validation": eval_tokens, "test": eval_tokens}
    built: list[Task] = []
    counts: dict[str, dict[str, int]] = {}
    for index in range(tasks):
        name = "Shakespeare" if index == 0 else topics[index - 1]
        splits = {}
        for split, budget in budgets.items():
            if index == 0:
                documents = _records("shakespeare", split)
            else:
                documents = [d for d in _records("wiki", split) if d.label == name]
            if not documents:
                raise NestlearnError(f"stream {NAME!r}: task {name!r} has no {split} documents")
            splits[split] = lm_split(documents, budget, rng)
        counts[name] = {split: len(part) for split, part in splits.items()}
        built.append(Task(name=name, **splits))
    return Stream(
        name=NAME, kind="lm", tasks=tuple(built), vocab_size=BYTES.vocab_size, seq_len=seq_len,
        description="Shakespeare, then Wikipedia topics one by one (bytes)",
        meta={"seed": seed, "topics": [t.name for t in built[1:]], "tokens": counts,
              "tokenizer": BYTES.describe()})
