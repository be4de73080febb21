"""Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology").

A sequence is ``BOS k_1 v_1 ... k_N v_N q_1 a_1 ... q_Q a_Q``: N pairs with distinct keys
and random values, then Q queries, each one of the N keys (distinct, in random order), each
followed by its value ``a_j``, which is the answer. Earlier answers reveal nothing about later
ones (every query asks a different key). Tags: ``pairs`` (N) and ``distance``, the number of
tokens from the key's position in the context to the query's position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from nestlearn.errors import check_int, invalid
from nestlearn.tasks.example import Example, with_tags

PAD, BOS = 0, 1


@dataclass(frozen=True)
class MQARVocab:
    """Keys are ids ``[2, 2 + keys)``, values ``[2 + keys, 2 + keys + values)``."""

    keys: int = 64
    values: int = 64

    def __post_init__(self) -> None:
        check_int("keys", self.keys)
        check_int("values", self.values)

    @property
    def size(self) -> int:
        return 2 + self.keys + self.values

    def key(self, index: int) -> int:
        return 2 + index

    def value(self, index: int) -> int:
        return 2 + self.keys + index


def mqar_example(rng: random.Random, pairs: int, queries: int | None = None,
                 vocab: MQARVocab = MQARVocab()) -> Example:
    """One MQAR sequence with ``pairs`` pairs and ``queries`` queries (default: all pairs)."""
    check_int("pairs", pairs)
    if pairs > vocab.keys:
        raise invalid("pairs", pairs, f"at most the number of keys ({vocab.keys})")
    queries = pairs if queries is None else check_int("queries", queries)
    if queries > pairs:
        raise invalid("queries", queries, f"at most pairs ({pairs})")
    keys = rng.sample(range(vocab.keys), pairs)
    values = [rng.randrange(vocab.values) for _ in range(pairs)]
    tokens = [BOS]
    key_position = {}
    for key, value in zip(keys, values, strict=True):
        key_position[key] = len(tokens)
        tokens += [vocab.key(key), vocab.value(value)]
    answers, distances = [], []
    for index in rng.sample(range(pairs), queries):
        distances.append(len(tokens) - key_position[keys[index]])
        tokens += [vocab.key(keys[index]), vocab.value(values[index])]
        answers.append(len(tokens) - 1)
    return with_tags(tokens, answers, pairs=pairs, distance=distances)
