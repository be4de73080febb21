"""Tokenizers: bytes (default, nothing to train or ship) and byte-level BPE (HF ``tokenizers``).

Both map text to ids and back without loss (any Unicode text round-trips) and reserve two
special ids that no text produces:

- ``eod_id`` (``<|endoftext|>``): separates documents in token files; a model learns to
  predict it at the end of a document.
- ``pad_id`` (``<|pad|>``): fills windows shorter than the context; its targets are ignored.

``ByteTokenizer``: ids 0-255 are the UTF-8 bytes, 256 is end-of-document, 257 is padding
(vocab_size 258). ``BPETokenizer``: ids 0 and 1 are end-of-document and padding, then the 256
byte symbols, then the learned merges.

``PretrainedTokenizer``: any Hugging Face ``tokenizer.json`` (GPT-2, Llama, ...) as it is; its
end-of-document and padding ids are its own end/pad tokens, or two tokens appended to its
vocabulary when it has none (:data:`EOD_CANDIDATES`, :data:`PAD_CANDIDATES`).
:func:`load_tokenizer` and :func:`build_tokenizer` accept the path of such a file.

``save(dir)`` writes ``dir/tokenizer.json`` atomically; :func:`load_tokenizer` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nestlearn.atomic import atomic_write_json
from nestlearn.errors import NestlearnError, check_int, invalid

TOKENIZER_FILE = "tokenizer.json"
EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_FORMAT_VERSION = 1
TOKENIZER_CHOICES = "one of 'byte', 'bpe', or the path of an existing tokenizer.json file"


def _check_text(text: object, name: str = "text") -> str:
    if not isinstance(text, str):
        raise invalid(name, type(text).__name__, "a str")
    return text


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255, plus end-of-document 256 and padding 257."""

    kind = "byte"
    eod_id = 256
    pad_id = 257

    @property
    def vocab_size(self) -> int:
        return 258

    def encode(self, text: str) -> list[int]:
        return list(_check_text(text).encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; special ids are dropped, or written as their names if
        ``skip_special`` is False. Byte sequences that are not valid UTF-8 (e.g. a sample cut
        inside a character) decode to U+FFFD."""
        out = bytearray()
        for token in ids:
            token = int(token)
            if 0 <= token < 256:
                out.append(token)
            elif token in (self.eod_id, self.pad_id):
                if not skip_special:
                    out.extend((EOD_TOKEN if token == self.eod_id else PAD_TOKEN).encode())
            else:
                raise invalid("token id", token, f"0 to {self.vocab_size - 1}")
        return out.decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        """What identifies this tokenizer (stored in token files to catch mismatches)."""
        return {"type": self.kind, "vocab_size": self.vocab_size, "eod_id": self.eod_id,
                "pad_id": self.pad_id}

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = _prepare_dir(directory) / TOKENIZER_FILE
        atomic_write_json(path, {"format_version": _FORMAT_VERSION, **self.describe()})
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(self.kind)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class _HFBackedTokenizer:
    """What the tokenizers backed by a HF ``tokenizers.Tokenizer`` (``self._tokenizer``) share:
    encoding without the tokenizer's own special tokens, checked decoding, the JSON form and
    the description that identifies a vocabulary. Subclasses set ``kind``, ``eod_id``,
    ``pad_id`` and ``vocab_size``."""

    kind: str
    eod_id: int
    pad_id: int
    _tokenizer: Any

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(_check_text(text), add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = [_check_text(text, f"texts[{i}]") for i, text in enumerate(texts)]
        return [list(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(token) for token in ids]
        for token in ids:
            if not 0 <= token < self.vocab_size:
                raise invalid("token id", token, f"0 to {self.vocab_size - 1}")
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special)

    def to_json(self) -> dict[str, Any]:
        return json.loads(self._tokenizer.to_str())

    def describe(self) -> dict[str, Any]:
        serialized = json.dumps(self.to_json(), sort_keys=True).encode("utf-8")
        return {"type": self.kind, "vocab_size": self.vocab_size, "eod_id": self.eod_id,
                "pad_id": self.pad_id, "sha256": hashlib.sha256(serialized).hexdigest()}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.describe() == other.describe()

    def __hash__(self) -> int:
        return hash(self.describe()["sha256"])


class BPETokenizer(_HFBackedTokenizer):
    """Byte-level BPE (as in GPT-2) trained offline with HF ``tokenizers``.

    Build one with :meth:`train` or :func:`load_tokenizer`. No normalisation and no added
    prefix space, so ``decode(encode(text)) == text`` for every string.
    """

    kind = "bpe"
    eod_id = 0
    pad_id = 1

    def __init__(self, hf_tokenizer: Any) -> None:
        self._tokenizer = hf_tokenizer
        # Text that spells a special token ("<|endoftext|>") is encoded as plain text, so only
        # token files, never user text, produce the special ids and every text round-trips.
        hf_tokenizer.encode_special_tokens = True
        for name, expected in ((EOD_TOKEN, self.eod_id), (PAD_TOKEN, self.pad_id)):
            if hf_tokenizer.token_to_id(name) != expected:
                raise NestlearnError(
                    f"BPE tokenizer: special token {name} must have id {expected}, "
                    f"has {hf_tokenizer.token_to_id(name)}"
                )

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2
    ) -> BPETokenizer:
        """Learn merges from ``texts`` until the vocabulary has ``vocab_size`` entries
        (fewer if the texts run out of pairs seen ``min_frequency`` times)."""
        minimum = 256 + 2
        check_int("vocab_size", vocab_size, minimum)
        if vocab_size > 2**32:
            raise invalid("vocab_size", vocab_size, "at most 2**32")
        tokenizers = _import_tokenizers()
        model = tokenizers.Tokenizer(tokenizers.models.BPE())
        model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=True
        )
        model.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOD_TOKEN, PAD_TOKEN],
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        model.train_from_iterator(texts, trainer=trainer)
        return cls(model)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = _prepare_dir(directory) / TOKENIZER_FILE
        atomic_write_json(
            path, {"format_version": _FORMAT_VERSION, "type": self.kind, "bpe": self.to_json()}
        )
        return path

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


# Names a pretrained vocabulary uses for its end-of-text and padding tokens, in the order tried.
EOD_CANDIDATES: tuple[str, ...] = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
PAD_CANDIDATES: tuple[str, ...] = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")


class PretrainedTokenizer(_HFBackedTokenizer):
    """A Hugging Face ``tokenizer.json`` used as it is (any model: BPE, WordPiece, Unigram).

    Text is encoded without the tokenizer's own BOS/EOS post-processing (nestlearn puts the
    end-of-document id between documents itself), and text that spells a special token is
    encoded as plain text, as with :class:`BPETokenizer`. ``decode(encode(text)) == text`` holds
    for byte-level vocabularies (GPT-2, Llama 3); tokenizers that normalise (lower-case, strip
    accents) or map unknown characters to ``[UNK]`` lose what they drop.
    """

    kind = "pretrained"

    def __init__(self, hf_tokenizer: Any, eod_id: int | None = None,
                 pad_id: int | None = None) -> None:
        self._tokenizer = hf_tokenizer
        hf_tokenizer.encode_special_tokens = True
        self.eod_id = _special_id(hf_tokenizer, eod_id, EOD_CANDIDATES, EOD_TOKEN, "eod_id")
        self.pad_id = _special_id(hf_tokenizer, pad_id, PAD_CANDIDATES, PAD_TOKEN, "pad_id")
        if self.pad_id == self.eod_id:
            raise invalid("pad_id", self.pad_id, f"an id other than eod_id {self.eod_id}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PretrainedTokenizer:
        """Load a Hugging Face ``tokenizer.json`` (the file, or the folder holding it)."""
        file = _tokenizer_path(path)
        tokenizers = _import_tokenizers()
        try:
            hf_tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:
            raise NestlearnError(
                f"tokenizer: cannot read {str(file)!r} as a Hugging Face tokenizer.json ({err})"
            ) from err
        return cls(hf_tokenizer)

    @property
    def vocab_size(self) -> int:
        # the largest id + 1: a vocabulary's ids need not be contiguous
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1 if vocab else 0

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = _prepare_dir(directory) / TOKENIZER_FILE
        atomic_write_json(path, {"format_version": _FORMAT_VERSION, "type": self.kind,
                                 "eod_id": self.eod_id, "pad_id": self.pad_id,
                                 "tokenizer": self.to_json()})
        return path

    def __repr__(self) -> str:
        return (f"PretrainedTokenizer(vocab_size={self.vocab_size}, eod_id={self.eod_id}, "
                f"pad_id={self.pad_id})")


def _special_id(hf_tokenizer: Any, given: int | None, candidates: Sequence[str],
                fallback: str, name: str) -> int:
    """``given``, else the id of the first of ``candidates`` in the vocabulary, else the id of
    ``fallback`` appended as a new special token."""
    if given is not None:
        size = max(hf_tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        check_int(name, given, 0)
        if given >= size:
            raise invalid(name, given, f"an id in [0, {size - 1}]")
        return given
    for token in candidates:
        found = hf_tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    tokenizers = _import_tokenizers()
    hf_tokenizer.add_special_tokens([tokenizers.AddedToken(fallback, special=True)])
    return int(hf_tokenizer.token_to_id(fallback))


def _tokenizer_path(path: str | os.PathLike[str]) -> Path:
    file = Path(path).expanduser()
    return file / TOKENIZER_FILE if file.is_dir() else file


def is_hf_tokenizer_json(data: object) -> bool:
    """True for the object of a Hugging Face ``tokenizer.json`` (not a nestlearn file)."""
    return isinstance(data, dict) and "format_version" not in data and "model" in data


Tokenizer = ByteTokenizer | BPETokenizer | PretrainedTokenizer


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise NestlearnError(
            "tokenizer 'bpe' needs the package 'tokenizers'; install it with: "
            "pip install 'nestlearn[data]'"
        ) from err
    return tokenizers


def _prepare_dir(directory: str | os.PathLike[str]) -> Path:
    from nestlearn.data.cache import ensure_writable_dir

    return ensure_writable_dir(directory, "tokenizer folder")


def tokenizer_from_json(data: Any, source: str = "tokenizer") -> Tokenizer:
    """Rebuild a tokenizer from the object :meth:`save` wrote."""
    if not isinstance(data, dict) or data.get("format_version") != _FORMAT_VERSION:
        raise NestlearnError(f"{source}: not a nestlearn tokenizer file (format_version 1)")
    kind = data.get("type")
    if kind == "byte":
        tokenizer = ByteTokenizer()
        if {k: data.get(k) for k in tokenizer.describe()} != tokenizer.describe():
            raise NestlearnError(f"{source}: byte tokenizer fields {data} differ from this version")
        return tokenizer
    if kind == "bpe":
        tokenizers = _import_tokenizers()
        try:
            hf_tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data["bpe"]))
        except (KeyError, Exception) as err:
            raise NestlearnError(f"{source}: cannot read the BPE tokenizer ({err})") from err
        return BPETokenizer(hf_tokenizer)
    if kind == "pretrained":
        tokenizers = _import_tokenizers()
        try:
            hf_tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data["tokenizer"]))
            eod_id, pad_id = data["eod_id"], data["pad_id"]
        except (KeyError, Exception) as err:
            raise NestlearnError(f"{source}: cannot read the pretrained tokenizer ({err})") from err
        return PretrainedTokenizer(hf_tokenizer, eod_id, pad_id)
    raise invalid(f"{source}: type", repr(kind), "'byte', 'bpe' or 'pretrained'")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer saved with ``save(dir)``, or a Hugging Face ``tokenizer.json`` (as a
    :class:`PretrainedTokenizer`); ``path`` is the folder or the JSON file."""
    file = _tokenizer_path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise NestlearnError(f"tokenizer: {str(file)!r} does not exist") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NestlearnError(f"tokenizer: cannot read {str(file)!r} ({err})") from err
    if is_hf_tokenizer_json(data):
        return PretrainedTokenizer.from_file(file)
    return tokenizer_from_json(data, str(file))


def is_tokenizer_path(kind: str) -> bool:
    """True when a ``tokenizer`` option names a file or folder rather than 'byte' or 'bpe'."""
    return kind not in ("byte", "bpe") and _tokenizer_path(kind).is_file()


def build_tokenizer(
    kind: str, texts: Iterable[str] = (), vocab_size: int | None = None
) -> Tokenizer:
    """``"byte"`` -> ByteTokenizer; ``"bpe"`` -> BPETokenizer trained on ``texts``; the path
    of a ``tokenizer.json`` (Hugging Face's or one ``save`` wrote) -> that tokenizer."""
    if kind == "byte":
        return ByteTokenizer()
    if is_tokenizer_path(kind):
        if vocab_size is not None:
            raise invalid("vocab_size", vocab_size, "no value for a pretrained tokenizer file")
        return load_tokenizer(kind)
    if kind == "bpe":
        if vocab_size is None:
            raise invalid("vocab_size", None, "an integer >= 258 for a BPE tokenizer")
        return BPETokenizer.train(texts, vocab_size)
    raise invalid("tokenizer", repr(kind), TOKENIZER_CHOICES)
