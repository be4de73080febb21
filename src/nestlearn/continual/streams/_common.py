"""Pieces every stream builder shares: knob checks, token splits, stratified cuts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nestlearn.continual.stream import ClassSplit, LMSplit
from nestlearn.data.documents import Document
from nestlearn.data.tokenizers import ByteTokenizer
from nestlearn.errors import NestlearnError, check_int

BYTES = ByteTokenizer()


def knob_int(stream: str, name: str, value: object, minimum: int = 1) -> int:
    """An int size knob of ``stream``, named in the message when it is wrong."""
    try:
        return check_int(name, value, minimum)
    except NestlearnError as err:
        raise NestlearnError(f"stream {stream!r}: {err}") from None


def lm_split(documents: Sequence[Document], budget: int, rng: np.random.Generator) -> LMSplit:
    """Byte tokens of ``documents`` (in a seeded order), joined by end-of-document ids and cut
    at ``budget`` tokens (fewer when the documents hold less)."""
    order = rng.permutation(len(documents))
    pieces: list[int] = []
    used = 0
    for index in order:
        if len(pieces) >= budget:
            break
        pieces.extend(BYTES.encode(documents[int(index)].text))
        pieces.append(BYTES.eod_id)
        used += 1
    return LMSplit(torch.tensor(pieces[:budget], dtype=torch.long), documents=used)


def text_rows(texts: Sequence[str], labels: Sequence[int], seq_len: int) -> ClassSplit:
    """Byte tokens of ``texts`` cut to ``seq_len`` and right padded with the pad id."""
    inputs = torch.full((len(texts), seq_len), BYTES.pad_id, dtype=torch.long)
    lengths = torch.empty(len(texts), dtype=torch.long)
    for row, text in enumerate(texts):
        ids = BYTES.encode(text)[:seq_len] or [BYTES.eod_id]
        inputs[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        lengths[row] = len(ids)
    return ClassSplit(inputs, lengths, torch.tensor(list(labels), dtype=torch.long))


def stratified_cut(labels: np.ndarray, rng: np.random.Generator,
                   fractions: tuple[float, float] = (0.70, 0.15)) -> tuple[np.ndarray, ...]:
    """Indices of a train / validation / test cut holding every class in the same proportion
    (train ``fractions[0]``, validation ``fractions[1]``, test the rest), each sorted."""
    parts: list[list[int]] = [[], [], []]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train = round(len(members) * fractions[0])
        n_val = round(len(members) * fractions[1])
        parts[0].extend(members[:n_train].tolist())
        parts[1].extend(members[n_train:n_train + n_val].tolist())
        parts[2].extend(members[n_train + n_val:].tolist())
    return tuple(np.array(sorted(part), dtype=np.int64) for part in parts)
