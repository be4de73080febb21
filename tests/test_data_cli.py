"""``nestlearn data`` through a subprocess (list, errors) and in-process (tokenize), and the
tokenized-dataset folder it writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nestlearn.cli import main
from nestlearn.data.dataset import open_dataset, tokenize_corpus
from nestlearn.data.splits import SPLITS
from nestlearn.data.tokenizers import BPETokenizer, ByteTokenizer
from nestlearn.errors import NestlearnError


def _nestlearn(*args: str, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NESTLEARN_CACHE": cache, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nestlearn", *args], capture_output=True,
                          text=True, check=False, env=env)


def test_data_list_shows_readiness(tmp_path):
    result = _nestlearn("data", "list", cache=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("shakespeare") and " ready " in line for line in lines)
    assert any(line.startswith("wiki") and "not ready" in line for line in lines)
    assert "nestlearn data prepare wiki" in result.stdout


def test_bad_corpus_is_one_line_and_exit_2(tmp_path):
    result = _nestlearn("data", "tokenize", "no-such-corpus", "--out", str(tmp_path / "o"),
                        cache=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("nestlearn data: error: corpus: got 'no-such-corpus'")
    assert result.stdout == ""


def _user_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    paragraphs = [f"paragraph {i}: sing, goddess, the wrath {i % 7}" for i in range(60)]
    path.write_text("\n\n".join(paragraphs))
    return path


def test_tokenize_byte_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "tokens"
    assert main(["data", "tokenize", str(_user_corpus(tmp_path)), "--out", str(out)]) == 0
    assert "train" in capsys.readouterr().out
    dataset = open_dataset(out)
    assert dataset.tokenizer == ByteTokenizer()
    assert set(dataset.splits) == set(SPLITS)
    assert sum(tf.num_documents for tf in dataset.splits.values()) == 60
    assert dataset.info["splits"]["train"]["tokens"] == dataset.splits["train"].num_tokens
    first = dataset.splits["train"].document(0).tolist()
    assert ByteTokenizer().decode(first).startswith("paragraph ")


def test_tokenize_bpe_and_mismatch_refused(tmp_path):
    out = tmp_path / "bpe"
    assert main(["data", "tokenize", str(_user_corpus(tmp_path)), "--tokenizer", "bpe",
                 "--vocab-size", "300", "--out", str(out)]) == 0
    dataset = open_dataset(out)
    assert isinstance(dataset.tokenizer, BPETokenizer) and dataset.tokenizer.vocab_size <= 300
    ByteTokenizer().save(out)  # a tokenizer other than the one the token files were made with
    with pytest.raises(NestlearnError, match="written with tokenizer"):
        open_dataset(out)


def test_tokenize_bad_arguments(tmp_path, capsys):
    corpus = str(_user_corpus(tmp_path))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["data", "tokenize", corpus, "--out", str(blocker)]) == 2
    assert "out: got" in capsys.readouterr().err
    assert main(["data", "tokenize", corpus, "--vocab-size", "500", "--out", str(tmp_path)]) == 2
    assert "vocab_size: got 500" in capsys.readouterr().err
    with pytest.raises(NestlearnError, match="vocab_size: got 10"):
        tokenize_corpus(corpus, tmp_path / "x", tokenizer="bpe", vocab_size=10)
    with pytest.raises(NestlearnError, match=r"no dataset\.json"):
        open_dataset(tmp_path)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["data", "tokenize", "--help"])
    text = capsys.readouterr().out
    for option in ("--tokenizer", "--vocab-size", "--out", "--cache-dir", "CORPUS"):
        assert option in text
