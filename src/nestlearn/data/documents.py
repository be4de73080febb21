"""The record every corpus loader returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    ``key`` is stable across runs and machines and decides the document's split (see
    :mod:`nestlearn.data.splits`); ``label`` is a class name for labelled corpora, else None.
    """

    key: str
    text: str
    label: str | None = None
