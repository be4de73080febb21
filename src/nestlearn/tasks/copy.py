"""In-context copy: a random sequence, a separator, and the same sequence again.

``BOS s_1 ... s_L SEP s_1 ... s_L``. Both occurrences are scored (tag ``occurrence`` 1 or 2,
``offset`` the index within the copy): the first is unpredictable (its loss is ln(symbols) at
best, the baseline), the second can be read back from the context. The gap between the two
losses is how much a model uses what it has seen (Olsson et al. 2022, in-context learning).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from nestlearn.errors import check_int
from nestlearn.tasks.example import Example, with_tags

PAD, BOS, SEP = 0, 1, 2


@dataclass(frozen=True)
class CopyVocab:
    """Symbols are ids ``[3, 3 + symbols)``."""

    symbols: int = 32

    def __post_init__(self) -> None:
        check_int("symbols", self.symbols, 2)

    @property
    def size(self) -> int:
        return 3 + self.symbols


def copy_example(rng: random.Random, length: int, vocab: CopyVocab = CopyVocab()) -> Example:
    """One sequence of ``length`` random symbols, shown twice."""
    check_int("length", length)
    sequence = [3 + rng.randrange(vocab.symbols) for _ in range(length)]
    tokens = [BOS, *sequence, SEP, *sequence]
    first = list(range(1, 1 + length))
    second = list(range(2 + length, 2 + 2 * length))
    return with_tags(tokens, first + second, occurrence=[1] * length + [2] * length,
                     offset=list(range(length)) * 2, length=length)
