"""Tokenizer round trips (byte and BPE, Unicode), special ids, saving and loading."""

from __future__ import annotations

import json

import pytest

from nestlearn.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    load_tokenizer,
)
from nestlearn.errors import NestlearnError

SAMPLES = [
    "",
    "plain ascii text.",
    "  leading spaces, trailing spaces  \n\ttabs\r\nand CRLF",
    "Ünïcödé — ‘quotes’ … 日本語のテキスト 🎭🎉 e\u0301 (combining)",
    "\x00\x01 control characters \x7f",
    "text that spells <|endoftext|> and <|pad|>",
]
TRAIN_TEXTS = [
    "To be, or not to be, that is the question:\n",
    "Whether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\n",
    "Or to take arms against a sea of troubles\n",
] * 20


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TRAIN_TEXTS, vocab_size=300)


def test_byte_round_trip_and_ids():
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 258
    assert (tokenizer.eod_id, tokenizer.pad_id) == (256, 257)
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    ids = [*tokenizer.encode("a"), 256, 257]
    assert tokenizer.decode(ids) == "a"
    assert tokenizer.decode(ids, skip_special=False) == "a<|endoftext|><|pad|>"
    assert tokenizer.decode(tokenizer.encode("é")[:1]) == "\ufffd"
    with pytest.raises(NestlearnError, match="token id: got 258"):
        tokenizer.decode([258])


def test_bpe_round_trip_and_specials(bpe):
    assert bpe.vocab_size == 300
    assert (bpe.eod_id, bpe.pad_id) == (0, 1)
    for text in [*SAMPLES, *TRAIN_TEXTS[:4]]:
        assert bpe.decode(bpe.encode(text)) == text
    # Merges were learned: the training text takes fewer tokens than bytes.
    assert len(bpe.encode(TRAIN_TEXTS[0])) < 0.75 * len(TRAIN_TEXTS[0].encode())
    # No text encodes to a special id.
    assert not {0, 1} & set(bpe.encode("<|endoftext|><|pad|>"))
    assert bpe.decode([*bpe.encode("x"), 0], skip_special=False) == "x<|endoftext|>"
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(t) for t in SAMPLES]
    with pytest.raises(NestlearnError, match="token id: got 300"):
        bpe.decode([300])


def test_save_and_load(tmp_path, bpe):
    path = bpe.save(tmp_path / "bpe")
    assert path.name == "tokenizer.json"
    loaded = load_tokenizer(tmp_path / "bpe")
    assert isinstance(loaded, BPETokenizer)
    assert loaded == bpe and loaded.describe() == bpe.describe()
    assert [loaded.encode(t) for t in SAMPLES] == [bpe.encode(t) for t in SAMPLES]
    ByteTokenizer().save(tmp_path / "byte")
    assert load_tokenizer(tmp_path / "byte" / "tokenizer.json") == ByteTokenizer()
    assert not list((tmp_path / "bpe").glob("*.tmp"))


def test_bad_tokenizer_input(tmp_path):
    with pytest.raises(NestlearnError, match="vocab_size: got 100"):
        BPETokenizer.train(TRAIN_TEXTS, vocab_size=100)
    with pytest.raises(NestlearnError, match="tokenizer: got 'wordpiece'"):
        build_tokenizer("wordpiece")
    with pytest.raises(NestlearnError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(NestlearnError, match="cannot read"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"format_version": 1, "type": "x"}))
    with pytest.raises(NestlearnError, match="type: got 'x'"):
        load_tokenizer(tmp_path)
