"""Pretrained Hugging Face ``tokenizer.json`` files as nestlearn tokenizers: special ids,
round trips, save/load, ``nestlearn data tokenize --tokenizer FILE``, training and generation.

The tokenizers are built here with HF ``tokenizers`` in the layouts of GPT-2 (byte-level BPE,
``<|endoftext|>`` last, no padding token) and BERT (WordPiece, lower-casing, ``[SEP]``/``[PAD]``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from nestlearn.cli import main
from nestlearn.data.dataset import open_dataset, tokenize_corpus
from nestlearn.data.tokenizers import (
    EOD_TOKEN,
    PAD_TOKEN,
    PretrainedTokenizer,
    build_tokenizer,
    load_tokenizer,
)
from nestlearn.errors import NestlearnError
from nestlearn.training.run_folder import load_trained
from nestlearn.training.runconfig import DataConfig
from trainkit import tiny_sets, write_corpus

TEXTS = [
    "To be, or not to be, that is the question:\n",
    "Whether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\n",
] * 20
SAMPLES = ["plain ascii text.", "  spaces \n\ttabs", "Ünïcödé — 日本語 🎭",
           "text that spells <|endoftext|>"]


def gpt2_like(path: Path) -> Path:
    """Byte-level BPE whose only special token, ``<|endoftext|>``, comes after the merges."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens([EOD_TOKEN])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def bert_like(path: Path) -> Path:
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TEXTS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        show_progress=False))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory) -> Path:
    return gpt2_like(tmp_path_factory.mktemp("gpt2"))


def test_gpt2_like_file_round_trips_and_gets_a_padding_id(gpt2_file):
    raw = tokenizers.Tokenizer.from_file(str(gpt2_file))
    size = raw.get_vocab_size(with_added_tokens=True)
    tokenizer = load_tokenizer(gpt2_file)
    assert isinstance(tokenizer, PretrainedTokenizer)
    # its own end-of-text token, and a padding token appended after the vocabulary
    assert tokenizer.eod_id == raw.token_to_id(EOD_TOKEN) == size - 1
    assert tokenizer.pad_id == size and tokenizer.vocab_size == size + 1
    for text in [*SAMPLES, *TEXTS[:3]]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.eod_id not in ids and tokenizer.pad_id not in ids
    # the same ids as the file's own tokenizer (no BOS/EOS added)
    assert tokenizer.encode(TEXTS[0]) == raw.encode(TEXTS[0], add_special_tokens=False).ids
    assert len(tokenizer.encode(TEXTS[0])) < 0.75 * len(TEXTS[0].encode())
    ids = [*tokenizer.encode("a"), tokenizer.eod_id, tokenizer.pad_id]
    assert tokenizer.decode(ids) == "a"
    assert tokenizer.decode(ids, skip_special=False) == f"a{EOD_TOKEN}{PAD_TOKEN}"
    with pytest.raises(NestlearnError, match="token id: got"):
        tokenizer.decode([tokenizer.vocab_size])


def test_bert_like_file_uses_its_own_specials_and_normalises(tmp_path):
    file = bert_like(tmp_path / "bert")
    raw = tokenizers.Tokenizer.from_file(str(file))
    tokenizer = build_tokenizer(str(file))
    assert tokenizer.eod_id == raw.token_to_id("[SEP]")
    assert tokenizer.pad_id == raw.token_to_id("[PAD]")
    assert tokenizer.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    # a normalising tokenizer loses what it drops (documented): case here
    assert tokenizer.decode(tokenizer.encode("To be, or NOT")) == "to be, or not"


def test_save_and_load_keep_the_special_ids(gpt2_file, tmp_path):
    tokenizer = PretrainedTokenizer.from_file(gpt2_file.parent)
    saved = tokenizer.save(tmp_path / "copy")
    data = json.loads(saved.read_text())
    assert data["type"] == "pretrained" and data["pad_id"] == tokenizer.pad_id
    again = load_tokenizer(tmp_path / "copy")
    assert again == tokenizer and again.describe() == tokenizer.describe()
    assert (again.eod_id, again.pad_id) == (tokenizer.eod_id, tokenizer.pad_id)
    assert again.encode(SAMPLES[2]) == tokenizer.encode(SAMPLES[2])


def test_bad_files_and_options_are_one_clear_error(gpt2_file, tmp_path):
    not_a_tokenizer = tmp_path / "tokenizer.json"
    not_a_tokenizer.write_text(json.dumps({"model": {"type": "nothing"}}))
    with pytest.raises(NestlearnError, match=r"cannot read .* as a Hugging Face tokenizer\.json"):
        load_tokenizer(not_a_tokenizer)
    with pytest.raises(NestlearnError, match="vocab_size: got 300"):
        build_tokenizer(str(gpt2_file), vocab_size=300)
    with pytest.raises(NestlearnError, match=r"tokenizer: got 'missing\.json'; allowed: one of"):
        build_tokenizer("missing.json")
    with pytest.raises(NestlearnError, match=r"data\.tokenizer: got 'missing\.json'"):
        DataConfig(tokenizer="missing.json")
    raw = tokenizers.Tokenizer.from_file(str(gpt2_file))
    with pytest.raises(NestlearnError, match="pad_id: got"):
        PretrainedTokenizer(raw, eod_id=5, pad_id=5)


def test_data_tokenize_cli_writes_a_dataset_with_the_file(gpt2_file, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "verse.txt", paragraphs=40)
    out = tmp_path / "tokens"
    assert main(["data", "tokenize", str(corpus), "--tokenizer", str(gpt2_file),
                 "--out", str(out)]) == 0
    assert "vocabulary 302" in capsys.readouterr().out
    dataset = open_dataset(out)
    assert dataset.tokenizer == PretrainedTokenizer.from_file(gpt2_file)
    first = dataset.splits["train"].document(0).tolist()
    assert dataset.tokenizer.decode(first) in corpus.read_text()
    assert main(["data", "tokenize", str(corpus), "--tokenizer", str(tmp_path / "none.json"),
                 "--out", str(out)]) == 2
    assert "tokenizer: got" in capsys.readouterr().err
    with pytest.raises(NestlearnError, match="vocab_size"):
        tokenize_corpus(str(corpus), out, tokenizer=str(gpt2_file), vocab_size=300)


def test_train_and_generate_with_a_pretrained_tokenizer(gpt2_file, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "verse.txt", paragraphs=60)
    run = tmp_path / "run"
    assert main(["train", "--recipe", "tiny-transformer", "--out", str(run), "--no-progress",
                 *tiny_sets(f"data.corpus={corpus}", f"data.tokenizer={gpt2_file}",
                            "train.steps=2")]) == 0
    model, config, tokenizer, step = load_trained(run)
    assert step == 2 and isinstance(tokenizer, PretrainedTokenizer)
    assert model.config.vocab_size == tokenizer.vocab_size == 302
    assert config.data.tokenizer == str(gpt2_file)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "The king", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The king")
    # a run reading the tokenized folder records the folder's copy of the tokenizer
    run2 = tmp_path / "run2"
    assert main(["train", "--recipe", "tiny-transformer", "--out", str(run2), "--no-progress",
                 *tiny_sets(f"data.corpus={run / 'data'}", "train.steps=1")]) == 0
    _, config2, tokenizer2, _ = load_trained(run2)
    assert tokenizer2 == tokenizer
    assert config2.data.tokenizer == str(run / "data" / "tokenizer.json")
