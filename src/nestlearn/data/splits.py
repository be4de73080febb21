"""Deterministic train/validation/test splits.

Each document has a stable key (a play and scene, an article title, a file path, or the text
itself). The split is read off a SHA-256 hash of that key, so it is the same on every run and
every machine, does not depend on the order in which a source lists its documents, and a
document keeps its split when others are added or removed.
"""

from __future__ import annotations

import hashlib

from nestlearn.errors import invalid

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Fractions of documents in each split, in the order of SPLITS.
SPLIT_FRACTIONS: tuple[float, ...] = (0.90, 0.05, 0.05)
# Part of the hashed string: changing it would reshuffle every split, so it is versioned.
_SALT = "nestlearn-split-v1:"


def split_of(key: str) -> str:
    """The split ("train", "validation" or "test") that the document with ``key`` belongs to."""
    digest = hashlib.sha256((_SALT + key).encode("utf-8")).digest()
    # The first 8 bytes as a uniform number in [0, 1).
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    cumulative = 0.0
    for name, fraction in zip(SPLITS, SPLIT_FRACTIONS, strict=True):
        cumulative += fraction
        if position < cumulative:
            return name
    return SPLITS[-1]


def check_split(split: str | None) -> str | None:
    """Validate a ``split`` argument (None means all documents)."""
    if split is not None and split not in SPLITS:
        raise invalid("split", repr(split), ", ".join(repr(s) for s in SPLITS) + " or None")
    return split
