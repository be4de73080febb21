"""Single needle in a haystack (S-NIAH-1/2/3 of RULER, Hsieh et al. 2024), byte-level.

A sequence of exactly ``length`` bytes: a haystack with one needle sentence inserted at
``depth`` (0 = the start, 1 = the end of the haystack), then a question that repeats the
needle's phrase and the answer, scored byte by byte:

- ``s-niah-1``: a 5-digit pass key in repeated filler sentences;
- ``s-niah-2``: a 7-digit number in real text;
- ``s-niah-3``: a UUID (36 characters) in real text.

Real text comes from an offline corpus (``nestlearn.tasks.haystack``) with its digits removed,
so the answer occurs in the context exactly once, in the needle. The needle goes at the word
boundary at or before its depth. Tags: ``length`` and ``depth`` (in percent).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from nestlearn.errors import check_choice, check_int, check_number, invalid
from nestlearn.tasks.example import Example, with_tags

PAD = 0
VOCAB_SIZE = 256
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


@dataclass(frozen=True)
class NeedleKind:
    """How a needle and its question read, and how its value is drawn."""

    name: str
    subject: str
    real_text: bool

    def value(self, rng: random.Random) -> str:
        if self.name == "s-niah-1":
            return f"{rng.randrange(10_000, 100_000)}"
        if self.name == "s-niah-2":
            return f"{rng.randrange(1_000_000, 10_000_000)}"
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def needle(self, value: str) -> str:
        return f" The {self.subject} is {value}. "

    def question(self) -> str:
        return f" What is the {self.subject}? The {self.subject} is "


KINDS: dict[str, NeedleKind] = {kind.name: kind for kind in (
    NeedleKind("s-niah-1", "pass key", real_text=False),
    NeedleKind("s-niah-2", "magic number", real_text=True),
    NeedleKind("s-niah-3", "magic uuid", real_text=True),
)}


def needle_kind(name: str) -> NeedleKind:
    return KINDS[check_choice("kind", name, tuple(KINDS))]


def min_length(name: str) -> int:
    """The shortest sequence of ``name`` that still has a haystack byte."""
    kind = needle_kind(name)
    value = kind.value(random.Random(0))
    return len(kind.needle(value)) + len(kind.question()) + len(value) + 1


def filler_text(chars: int) -> str:
    """At least ``chars`` characters of the repeated filler (S-NIAH-1's haystack)."""
    return FILLER * (chars // len(FILLER) + 2)


def niah_example(rng: random.Random, name: str, length: int, depth: float, haystack: str
                 ) -> Example:
    """One S-NIAH sequence of ``length`` bytes with the needle at ``depth``; the haystack is a
    random window of ``haystack`` (ASCII, without digits)."""
    kind = needle_kind(name)
    check_number("depth", depth, 0.0, 1.0)
    check_int("length", length, min_length(name))
    value = kind.value(rng)
    needle, question = kind.needle(value), kind.question()
    room = length - len(needle) - len(question) - len(value)
    if len(haystack) < room:
        raise invalid("haystack", f"{len(haystack)} characters", f"at least {room}")
    start = rng.randrange(len(haystack) - room + 1)
    hay = haystack[start:start + room]
    at = round(depth * room)
    boundary = hay.rfind(" ", 0, at + 1)
    at = 0 if depth == 0 or boundary < 0 else boundary
    text = hay[:at] + needle + hay[at:] + question + value
    tokens = list(text.encode("ascii"))
    answers = list(range(len(tokens) - len(value), len(tokens)))
    return with_tags(tokens, answers, length=length, depth=round(100 * depth))
