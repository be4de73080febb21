"""Data: offline corpora, deterministic splits, tokenizers, memory-mapped token files and
the batches drawn from them. See README.md in this folder."""

from nestlearn.data.cache import cache_dir
from nestlearn.data.corpora import (
    CorpusStatus,
    available_corpora,
    corpus_status,
    load_documents,
    load_labelled,
    load_records,
    prepare,
)
from nestlearn.data.dataset import TokenizedDataset, open_dataset, tokenize_corpus
from nestlearn.data.documents import Document
from nestlearn.data.splits import SPLITS, split_of
from nestlearn.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)
from nestlearn.data.tokens import (
    IGNORE_INDEX,
    EvalWindows,
    TokenFile,
    WindowSampler,
    write_token_file,
)

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "BPETokenizer",
    "ByteTokenizer",
    "CorpusStatus",
    "Document",
    "EvalWindows",
    "TokenFile",
    "TokenizedDataset",
    "Tokenizer",
    "WindowSampler",
    "available_corpora",
    "build_tokenizer",
    "cache_dir",
    "corpus_status",
    "load_documents",
    "load_labelled",
    "load_records",
    "load_tokenizer",
    "open_dataset",
    "prepare",
    "split_of",
    "tokenize_corpus",
    "write_token_file",
]
