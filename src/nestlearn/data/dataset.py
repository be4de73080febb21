"""A tokenized corpus on disk: the folder ``nestlearn data tokenize`` writes and training reads.

Layout of ``DIR``::

    tokenizer.json                  the tokenizer (load_tokenizer(DIR))
    train.bin / train.json          token files (see nestlearn.data.tokens)
    validation.bin / validation.json
    test.bin / test.json
    dataset.json                    corpus name, tokenizer kind, per-split counts

``dataset.json`` is written last, so its presence means the folder is complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestlearn.atomic import atomic_write_json
from nestlearn.data.cache import ensure_writable_dir
from nestlearn.data.corpora import load_records
from nestlearn.data.splits import SPLITS, split_of
from nestlearn.data.tokenizers import (
    TOKENIZER_CHOICES,
    Tokenizer,
    build_tokenizer,
    is_tokenizer_path,
    load_tokenizer,
)
from nestlearn.data.tokens import TokenFile, write_token_file
from nestlearn.errors import NestlearnError, invalid

DATASET_FILE = "dataset.json"
DEFAULT_BPE_VOCAB = 4096


@dataclass
class TokenizedDataset:
    """A tokenizer and one memory-mapped token file per split."""

    directory: Path
    tokenizer: Tokenizer
    splits: dict[str, TokenFile]
    info: dict[str, Any]


def tokenize_corpus(
    corpus: str,
    out: str | os.PathLike[str],
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TokenizedDataset:
    """Split ``corpus``, build the tokenizer (BPE is trained on the train split only; a
    ``tokenizer.json`` path is loaded as it is), and write the folder described in the module
    docstring. Returns it opened."""
    if tokenizer not in ("byte", "bpe") and not is_tokenizer_path(tokenizer):
        raise invalid("tokenizer", repr(tokenizer), TOKENIZER_CHOICES)
    if tokenizer == "byte" and vocab_size is not None:
        raise invalid("vocab_size", vocab_size, "no value for the byte tokenizer (vocabulary 258)")
    directory = ensure_writable_dir(out, "out")
    texts: dict[str, list[str]] = {split: [] for split in SPLITS}
    for record in load_records(corpus, cache_dir):
        texts[split_of(record.key)].append(record.text)
    # The folder is incomplete until dataset.json is written again at the end.
    (directory / DATASET_FILE).unlink(missing_ok=True)
    if not texts["train"]:
        raise NestlearnError(f"corpus {corpus!r}: its train split has no documents")
    if tokenizer == "bpe" and vocab_size is None:
        vocab_size = DEFAULT_BPE_VOCAB
    built = build_tokenizer(tokenizer, texts["train"], vocab_size)
    built.save(directory)
    counts = {}
    for split in SPLITS:
        token_file = write_token_file(directory / split, texts[split], built)
        counts[split] = {"documents": token_file.num_documents, "tokens": token_file.num_tokens,
                         "bytes": token_file.num_bytes}
    info = {
        "corpus": corpus,
        "tokenizer": built.describe(),
        "splits": counts,
    }
    atomic_write_json(directory / DATASET_FILE, info)
    return open_dataset(directory)


def open_dataset(directory: str | os.PathLike[str]) -> TokenizedDataset:
    """Open a folder written by :func:`tokenize_corpus`, checking that its token files were
    made with its tokenizer."""
    folder = Path(directory).expanduser()
    info_path = folder / DATASET_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise NestlearnError(
            f"data folder {str(folder)!r}: no {DATASET_FILE}; create it with "
            "nestlearn data tokenize CORPUS --out DIR"
        ) from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NestlearnError(
            f"data folder {str(folder)!r}: cannot read {DATASET_FILE} ({err})"
        ) from err
    tokenizer = load_tokenizer(folder)
    splits = {}
    for split in SPLITS:
        token_file = TokenFile(folder / split)
        token_file.check_tokenizer(tokenizer)
        splits[split] = token_file
    return TokenizedDataset(folder, tokenizer, splits, info)
