"""Formal-language recognition: is a string in the language?

A sequence is ``BOS w_1 ... w_n QUERY LABEL`` with ``LABEL`` = ``ACCEPT`` or ``REJECT``, the
one answer. Half of the strings are members, half are not. Non-members are near misses (a
member with one symbol changed, two symbols swapped, or a count off by one or two), so no
single shortcut (string length, symbol counts alone) separates the classes for the counting
and bracket languages. The label always comes from the language's recognizer, never from how
the string was made, and a drawn string whose membership differs from the label asked for is
drawn again. Tags: ``length`` (n) and ``member`` (1 or 0).

The six languages of the HOPE paper's formal-language table (docs/paper.md): parity (an even
number of 1s over {0, 1}), (aa)*, (abab)*, a^n b^n, a^n b^n c^n and shuffle-2 (two bracket
pairs, each balanced on its own, interleaved freely).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from nestlearn.errors import check_int, invalid
from nestlearn.tasks.example import Example, with_tags

PAD, BOS, QUERY, ACCEPT, REJECT = 0, 1, 2, 3, 4
ALPHABET = "01abc()[]"
VOCAB_SIZE = 5 + len(ALPHABET)
# Draws per string before giving up (a length range with no member of the wanted class).
MAX_DRAWS = 1000


def symbol_id(char: str) -> int:
    return 5 + ALPHABET.index(char)


def is_parity(text: str) -> bool:
    return set(text) <= set("01") and text.count("1") % 2 == 0


def is_aa_star(text: str) -> bool:
    return re.fullmatch(r"(aa)*", text) is not None


def is_abab_star(text: str) -> bool:
    return re.fullmatch(r"(abab)*", text) is not None


def is_anbn(text: str) -> bool:
    n = len(text) // 2
    return len(text) % 2 == 0 and text == "a" * n + "b" * n


def is_anbncn(text: str) -> bool:
    n = len(text) // 3
    return len(text) % 3 == 0 and text == "a" * n + "b" * n + "c" * n


def is_shuffle2(text: str) -> bool:
    """Each of ``()`` and ``[]`` balanced on its own (never more closing than opening)."""
    depth = {"(": 0, "[": 0}
    opener = {")": "(", "]": "["}
    for char in text:
        if char in depth:
            depth[char] += 1
        elif char in opener:
            depth[opener[char]] -= 1
            if depth[opener[char]] < 0:
                return False
        else:
            return False
    return depth["("] == 0 and depth["["] == 0


def _random_length(rng: random.Random, low: int, high: int, multiple: int) -> int:
    """A multiple of ``multiple`` in [low, high] (the closest one above ``low`` if none)."""
    choices = [n for n in range(low, high + 1) if n % multiple == 0 and n > 0]
    return rng.choice(choices) if choices else multiple * max(1, -(-low // multiple))


def _flip(rng: random.Random, text: str, alphabet: str) -> str:
    if not text:
        return rng.choice(alphabet)
    i = rng.randrange(len(text))
    return text[:i] + rng.choice([c for c in alphabet if c != text[i]]) + text[i + 1:]


def _swap(rng: random.Random, text: str) -> str:
    if len(text) < 2:
        return text
    i, j = sorted(rng.sample(range(len(text)), 2))
    return text[:i] + text[j] + text[i + 1:j] + text[i] + text[j + 1:]


def _parity(rng: random.Random, low: int, high: int, member: bool) -> str:
    return "".join(rng.choice("01") for _ in range(rng.randint(low, high)))


def _aa_star(rng: random.Random, low: int, high: int, member: bool) -> str:
    return "a" * rng.randint(low, high)


def _abab_star(rng: random.Random, low: int, high: int, member: bool) -> str:
    """Non-members: half are a member with one symbol changed or two swapped (a length that
    is a multiple of 4), half a cut prefix of one, so "length divisible by 4" scores 3/4."""
    if member or rng.random() < 0.5:
        text = "abab" * (_random_length(rng, low, high, 4) // 4)
        return text if member else _near_miss(rng, text, "ab")
    length = rng.choice([n for n in range(max(low, 1), high + 1) if n % 4] or [low])
    return ("abab" * (length // 4 + 1))[:length]


def _blocks(rng: random.Random, low: int, high: int, member: bool, letters: str) -> str:
    n = _random_length(rng, low, high, len(letters)) // len(letters)
    if member:
        return "".join(c * n for c in letters)
    if rng.random() < 0.5:
        counts = [n] * len(letters)
        counts[rng.randrange(len(letters))] += rng.choice([-2, -1, 1, 2])
        return "".join(c * max(k, 0) for c, k in zip(letters, counts, strict=True))
    return _near_miss(rng, "".join(c * n for c in letters), letters)


def _anbn(rng: random.Random, low: int, high: int, member: bool) -> str:
    return _blocks(rng, low, high, member, "ab")


def _anbncn(rng: random.Random, low: int, high: int, member: bool) -> str:
    return _blocks(rng, low, high, member, "abc")


def _shuffle2(rng: random.Random, low: int, high: int, member: bool) -> str:
    """A random member of even length: each step opens either bracket or closes an open one,
    closing only what must be closed to end balanced in time."""
    length = _random_length(rng, low, high, 2)
    text, depth = [], {"(": 0, "[": 0}
    for step in range(length):
        left = length - step
        moves = [c for c, o in ((")", "("), ("]", "[")) if depth[o] > 0]
        if sum(depth.values()) < left:
            moves += ["(", "["]
        char = rng.choice(moves)
        if char in depth:
            depth[char] += 1
        else:
            depth["(" if char == ")" else "["] -= 1
        text.append(char)
    string = "".join(text)
    return string if member else _near_miss(rng, string, "()[]")


def _near_miss(rng: random.Random, text: str, alphabet: str) -> str:
    return _flip(rng, text, alphabet) if rng.random() < 0.5 else _swap(rng, text)


@dataclass(frozen=True)
class Language:
    """A language: its recognizer, a sampler of candidate strings of a class (checked by the
    recognizer afterwards) and its alphabet."""

    name: str
    alphabet: str
    recognize: Callable[[str], bool]
    sample: Callable[[random.Random, int, int, bool], str]


LANGUAGES: dict[str, Language] = {language.name: language for language in (
    Language("parity", "01", is_parity, _parity),
    Language("aa-star", "a", is_aa_star, _aa_star),
    Language("abab-star", "ab", is_abab_star, _abab_star),
    Language("anbn", "ab", is_anbn, _anbn),
    Language("anbncn", "abc", is_anbncn, _anbncn),
    Language("shuffle-2", "()[]", is_shuffle2, _shuffle2),
)}


def language(name: str) -> Language:
    if name not in LANGUAGES:
        raise invalid("language", repr(name), f"one of {list(LANGUAGES)}")
    return LANGUAGES[name]


def draw_string(rng: random.Random, lang: Language, low: int, high: int, member: bool) -> str:
    """A string of ``lang``'s class ``member`` with length in [low, high]."""
    check_int("low", low, 0)
    check_int("high", high, max(low, 1))
    for _ in range(MAX_DRAWS):
        text = lang.sample(rng, low, high, member)
        if low <= len(text) <= high and lang.recognize(text) == member:
            return text
    raise invalid("length range", f"[{low}, {high}]",
                  f"one holding {'members' if member else 'non-members'} of {lang.name}")


def formal_example(rng: random.Random, name: str, low: int, high: int) -> Example:
    """One recognition example of language ``name``, length in [low, high], member with
    probability 1/2."""
    lang = language(name)
    member = rng.random() < 0.5
    text = draw_string(rng, lang, low, high, member)
    tokens = [BOS, *(symbol_id(c) for c in text), QUERY, ACCEPT if member else REJECT]
    return with_tags(tokens, [len(tokens) - 1], length=len(text), member=int(member))
