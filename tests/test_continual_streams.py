"""Continual streams: every built-in builder at a tiny size, and the user's stream files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from nestlearn.continual.stream import ClassSplit, SeriesSplit
from nestlearn.continual.streams import STREAM_NAMES, build_stream, load_stream_file, stream_knobs
from nestlearn.continual.streams._common import stratified_cut
from nestlearn.data import wiki
from nestlearn.data.cache import CACHE_ENV
from nestlearn.data.corpora import load_split_records
from nestlearn.data.splits import split_of
from nestlearn.data.tokenizers import ByteTokenizer
from nestlearn.errors import NestlearnError

BYTES = ByteTokenizer()
TINY = {
    "domain-lm": {"train_tokens": 600, "eval_tokens": 200, "tasks": 3},
    "wiki-classes": {"examples_per_class": 4, "seq_len": 32, "tasks": 2},
    "split-digits": {"examples_per_class": 10, "tasks": 2},
    "permuted-digits": {"examples_per_class": 10, "tasks": 3},
    "split-mnist": {"examples_per_class": 10, "tasks": 2},
    "permuted-mnist": {"examples_per_class": 10, "tasks": 3},
    "regime-shift": {"segment_len": 300, "eval_len": 100},
}


def _tensors(stream):
    for task in stream.tasks:
        for split in (task.train, task.validation, task.test):
            yield from (getattr(split, f) for f in split.__dataclass_fields__
                        if isinstance(getattr(split, f), torch.Tensor))


def _same(a, b) -> bool:
    return a.task_names == b.task_names and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b),
                                                                   strict=True))


@pytest.mark.parametrize("name", STREAM_NAMES)
def test_every_stream_is_deterministic_per_seed_and_in_vocab(name):
    first = build_stream(name, seed=3, **TINY[name])
    assert _same(first, build_stream(name, seed=3, **TINY[name]))
    assert not _same(first, build_stream(name, seed=4, **TINY[name]))
    for task in first.tasks:
        for split in (task.train, task.validation, task.test):
            tokens = split.inputs if isinstance(split, ClassSplit) else split.tokens
            assert tokens.dtype == torch.long
            assert int(tokens.min()) >= 0 and int(tokens.max()) < first.vocab_size
            if isinstance(split, ClassSplit):
                assert split.inputs.shape[1] == first.seq_len
                assert all(int(label) in task.classes for label in split.labels)


def test_unknown_stream_and_knob_list_what_is_allowed():
    with pytest.raises(NestlearnError, match="allowed: domain-lm, wiki-classes"):
        build_stream("mnist")
    with pytest.raises(NestlearnError,
                       match=r"unknown size knob 'steps'; allowed: seed|unknown size knob "
                             r"'steps'; allowed: tasks, examples_per_class"):
        build_stream("split-digits", steps=3)
    assert set(stream_knobs("domain-lm")) == {"train_tokens", "eval_tokens", "seq_len",
                                              "tasks", "topics"}
    with pytest.raises(NestlearnError, match="stream 'split-digits': tasks: got 6"):
        build_stream("split-digits", tasks=6)
    with pytest.raises(NestlearnError, match="seq_len: got 0; allowed: an int >= 1"):
        build_stream("domain-lm", seq_len=0)


def test_domain_lm_budgets_topics_and_disjoint_splits():
    stream = build_stream("domain-lm", train_tokens=600, eval_tokens=200, tasks=3,
                          topics=("History", "Arts"))
    assert stream.kind == "lm" and stream.vocab_size == 258 and stream.seq_len == 128
    assert stream.task_names == ("Shakespeare", "History", "Arts")
    records = {split: [BYTES.encode(d.text) for corpus in ("shakespeare", "wiki")
                       for d in load_split_records(corpus, split)]
               for split in ("train", "validation", "test")}
    for task in stream.tasks:
        assert (len(task.train), len(task.validation), len(task.test)) == (600, 200, 200)
        for split in ("train", "validation", "test"):
            ids = getattr(task, split).tokens.tolist()
            first = ids[: ids.index(BYTES.eod_id)] if BYTES.eod_id in ids else ids
            # each split starts with a document of that split and of no other
            owners = {name for name, texts in records.items()
                      if any(text[: len(first)] == first for text in texts)}
            assert owners == {split}
            eods = ids.count(BYTES.eod_id)
            assert getattr(task, split).documents == eods + (ids[-1] != BYTES.eod_id)
    assert stream.meta["topics"] == ["History", "Arts"]
    with pytest.raises(NestlearnError, match="topics: got 'Cooking'; allowed: 'Arts'"):
        build_stream("domain-lm", topics=("Cooking",))
    with pytest.raises(NestlearnError, match=r"tasks: got 4; allowed: 1 to 3"):
        build_stream("domain-lm", tasks=4, topics=("History", "Arts"))


def test_domain_lm_says_how_to_prepare_wiki(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with pytest.raises(NestlearnError, match="run: nestlearn data prepare wiki") as err:
        build_stream("domain-lm", train_tokens=100, eval_tokens=50, tasks=2)
    assert "\n" not in str(err.value)
    # Shakespeare alone needs no wiki
    assert build_stream("domain-lm", train_tokens=100, eval_tokens=50, tasks=1).task_names == (
        "Shakespeare",)


def test_wiki_classes_are_class_incremental_balanced_and_padded():
    stream = build_stream("wiki-classes", examples_per_class=5, seq_len=40)
    assert stream.class_names == wiki.TOPICS
    assert [task.classes for task in stream.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7),
                                                        (8, 9, 10)]
    for task in stream.tasks:
        counts = torch.bincount(task.train.labels, minlength=11)
        assert [int(counts[c]) for c in task.classes] == [5] * len(task.classes)
        assert int(counts.sum()) == 5 * len(task.classes)
        for split in (task.train, task.validation, task.test):
            assert split.inputs.shape[1] == 40
            assert int(split.lengths.min()) >= 1 and int(split.lengths.max()) <= 40
            for row, length in zip(split.inputs, split.lengths, strict=True):
                assert (row[length:] == BYTES.pad_id).all() and (row[:length] < 256).all()
        rows = {split: {tuple(r.tolist()) for r in getattr(task, split).inputs}
                for split in ("train", "validation", "test")}
        assert not rows["train"] & rows["test"] and not rows["train"] & rows["validation"]
    counts = stream.meta["eval_per_class"]
    assert counts["test"]["Mathematics"] == len([
        1 for label in stream.tasks[2].test.labels if int(label) == 5])
    assert "Mathematics" in stream.meta["small_eval"]
    three = build_stream("wiki-classes", classes_per_task=3, examples_per_class=2, seq_len=8)
    assert [task.classes for task in three.tasks] == [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9, 10)]


def test_stratified_cut_is_disjoint_complete_and_balanced():
    labels = np.repeat(np.arange(4), 20)
    train, val, test = stratified_cut(labels, np.random.default_rng(0))
    together = np.concatenate([train, val, test])
    assert sorted(together.tolist()) == list(range(80))
    assert [int((labels[train] == c).sum()) for c in range(4)] == [14] * 4
    assert [int((labels[val] == c).sum()) for c in range(4)] == [3] * 4


@pytest.mark.parametrize("name", ["split-digits", "split-mnist"])
def test_split_streams_hold_two_new_digits_per_task(name):
    stream = build_stream(name, seed=1)
    assert [task.classes for task in stream.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert stream.seq_len == (64 if name == "split-digits" else 196)
    assert stream.vocab_size == (17 if name == "split-digits" else 16)
    sizes = stream.meta["split_sizes"]
    for position, split in enumerate(("train", "validation", "test")):
        assert sum(len(getattr(t, split)) for t in stream.tasks) == sizes[position]
    assert sum(sizes) == (1797 if name == "split-digits" else 5000)
    for task in stream.tasks:
        assert set(task.train.labels.tolist()) == set(task.classes)
        assert (task.train.lengths == stream.seq_len).all()


@pytest.mark.parametrize("name", ["permuted-digits", "permuted-mnist"])
def test_permuted_streams_permute_the_same_images(name):
    stream = build_stream(name, tasks=4, examples_per_class=6, pool=7) if name.endswith(
        "mnist") else build_stream(name, tasks=4, examples_per_class=6)
    permutations = stream.meta["permutations"]
    assert permutations[0] == list(range(stream.seq_len))
    assert len({tuple(p) for p in permutations}) == 4
    base = stream.tasks[0]
    for task, permutation in zip(stream.tasks[1:], permutations[1:], strict=True):
        assert sorted(permutation) == list(range(stream.seq_len))
        assert task.classes == tuple(range(10))
        assert torch.equal(task.test.inputs, base.test.inputs[:, permutation])
        assert torch.equal(task.test.labels, base.test.labels)


def test_mnist_pool_sizes():
    assert build_stream("split-mnist", tasks=1, examples_per_class=2, pool=1).seq_len == 784
    with pytest.raises(NestlearnError, match="pool: got 3; allowed: one of 1, 2, 4, 7"):
        build_stream("permuted-mnist", pool=3)


def test_regime_shift_recurs_with_the_same_process():
    stream = build_stream("regime-shift", seed=2, segment_len=3000, eval_len=400, num_bins=32,
                          schedule="ABCAA")
    assert stream.kind == "forecast" and stream.vocab_size == 32 and len(stream.bins) == 31
    assert stream.task_names == ("A", "B", "C", "A (again)", "A (again 2)")
    assert stream.meta["recurrence_of"] == [None, None, None, 0, 0]
    edges = torch.tensor(stream.bins, dtype=torch.float64)
    for task in stream.tasks:
        for split in (task.train, task.validation, task.test):
            assert isinstance(split, SeriesSplit)
            assert torch.equal(split.tokens, torch.bucketize(split.values.double(), edges,
                                                             right=True))
        assert not torch.equal(task.validation.values, task.test.values)
        assert not torch.equal(task.train.values[:400], task.validation.values)
    first, again = stream.tasks[0], stream.tasks[3]
    assert set(first.train.regimes.tolist()) == set(again.train.regimes.tolist()) == {0}
    assert not torch.equal(first.train.values, again.train.values)
    # the same AR(1) process: the same mean and spread, unlike regime B
    for stat in (torch.mean, torch.std):
        assert abs(float(stat(first.train.values) - stat(again.train.values))) < 0.15
    assert abs(float(first.train.values.mean() - stream.tasks[1].train.values.mean())) > 1.0
    with pytest.raises(NestlearnError, match="schedule: got 'AXB'; allowed"):
        build_stream("regime-shift", schedule="AXB")


# ---------------------------------------------------------------- stream files


def _text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _lm_data(root):
    for topic in ("legal", "cooking"):
        for i in range(60):
            _text(root / topic / f"doc{i}.txt", f"{topic} document number {i}. " * 3)
    _text(root / "extra.txt", "\n\n".join(f"extra paragraph {i}" for i in range(30)))


def _class_data(root):
    for task, classes in (("a", ("cat", "dog")), ("b", ("cat", "eel"))):
        for name in classes:
            for i in range(30):
                _text(root / task / name / f"{i}.txt", f"{task} {name} text {i}")


def test_lm_stream_file_json_and_toml_give_the_same_stream(tmp_path):
    _lm_data(tmp_path)
    spec = {"name": "mine", "kind": "lm", "seq_len": 64,
            "tasks": [{"name": "legal", "paths": ["legal", "extra.txt"]},
                      {"name": "cooking", "paths": [str(tmp_path / "cooking")]}]}
    _text(tmp_path / "s.json", json.dumps(spec))
    _text(tmp_path / "s.toml", f"""name = "mine"
kind = "lm"
seq_len = 64
[[tasks]]
name = "legal"
paths = ["legal", "extra.txt"]
[[tasks]]
name = "cooking"
paths = ["{tmp_path / 'cooking'}"]
""")
    stream = load_stream_file(tmp_path / "s.json")
    assert _same(stream, load_stream_file(tmp_path / "s.toml"))
    assert stream.kind == "lm" and stream.seq_len == 64 and stream.task_names == ("legal",
                                                                                  "cooking")
    legal = stream.tasks[0]
    assert legal.train.documents + legal.validation.documents + legal.test.documents == 90
    expected = sum(split_of(f"legal/doc{i}.txt") == "test" for i in range(60)) + sum(
        split_of(f"extra paragraph {i}\n") == "test" for i in range(30))
    assert legal.test.documents == expected
    assert stream.meta["fallback"] == {}


def test_class_stream_file_shares_class_names_across_tasks(tmp_path):
    _class_data(tmp_path)
    _text(tmp_path / "s.toml", """name = "pets"
kind = "classification"
seq_len = 16
[[tasks]]
name = "first"
paths = ["a"]
[[tasks]]
name = "second"
paths = ["b"]
""")
    stream = load_stream_file(tmp_path / "s.toml")
    assert stream.class_names == ("cat", "dog", "eel")
    assert [task.classes for task in stream.tasks] == [(0, 1), (0, 2)]
    for task in stream.tasks:
        for split in (task.train, task.validation, task.test):
            assert set(split.labels.tolist()) <= set(task.classes)
            assert split.inputs.shape[1] == 16
    spec = {"name": "pets", "kind": "classification", "seq_len": 16,
            "tasks": [{"name": "first", "paths": ["a"]}, {"name": "second", "paths": ["b"]}]}
    _text(tmp_path / "s.json", json.dumps(spec))
    assert _same(stream, load_stream_file(tmp_path / "s.json"))


def test_stream_file_falls_back_to_a_recorded_cut(tmp_path):
    text = "a single document that is long enough to cut in three parts"
    _text(tmp_path / "one.txt", text)
    for name in ("x", "y"):
        for i in range(3):
            _text(tmp_path / "c" / name / f"{i}.txt", f"{name} {i}")
    _text(tmp_path / "lm.json", json.dumps({"name": "s", "tasks": [
        {"name": "t", "paths": ["one.txt"]}]}))
    lm = load_stream_file(tmp_path / "lm.json")
    assert "80/10/10" in lm.meta["fallback"]["t"]
    task = lm.tasks[0]
    assert len(task.train) + len(task.validation) + len(task.test) == len(text) + 2
    _text(tmp_path / "c.json", json.dumps({"name": "s", "kind": "classification", "tasks": [
        {"name": "t", "paths": ["c"]}]}))
    classes = load_stream_file(tmp_path / "c.json")
    task = classes.tasks[0]
    assert (len(task.train), len(task.validation), len(task.test)) == (2, 2, 2)
    assert "last file test" in classes.meta["fallback"]["t"]


BAD_FILES = [
    ({"name": "s", "tasks": [{"name": "t", "paths": ["legal"]}], "steps": 3},
     "unknown key 'steps'; allowed: name, kind, seq_len, description, tasks"),
    ({"name": "s", "tasks": [{"name": "t", "paths": ["legal"], "weight": 2}]},
     "task 't': unknown key 'weight'; allowed: name, paths"),
    ({"tasks": [{"name": "t", "paths": ["legal"]}]}, "name: got None; allowed: a non-empty"),
    ({"name": "s", "tasks": [{"paths": ["legal"]}]}, "task '#1': name: got None"),
    ({"name": "s", "tasks": [{"name": "t"}]}, "task 't': paths: got None; allowed: a non-empty "
                                              "list"),
    ({"name": "s", "tasks": [{"name": "t", "paths": ["legal"]},
                             {"name": "t", "paths": ["legal"]}]}, "task 't': the task name "
                                                                  "repeats"),
    ({"name": "s", "tasks": [{"name": "t", "paths": ["nowhere"]}]},
     "task 't': path 'nowhere' does not exist"),
    ({"name": "s", "tasks": [{"name": "t", "paths": ["empty"]}]},
     "task 't': folder 'empty' has no .txt or .md files"),
    ({"name": "s", "kind": "forecast", "tasks": [{"name": "t", "paths": ["legal"]}]},
     "kind: got 'forecast'; allowed: 'lm', 'classification'"),
    ({"name": "s", "tasks": []}, "tasks: missing or empty"),
    ({"name": "s", "kind": "classification", "tasks": [{"name": "t", "paths": ["extra.txt"]}]},
     "task 't': path 'extra.txt' is not a folder"),
    ({"name": "s", "kind": "classification", "tasks": [{"name": "t", "paths": ["legal"]}]},
     "task 't': folder 'legal' has no class sub-folders"),
    ({"name": "s", "kind": "classification", "tasks": [{"name": "t", "paths": ["classes"]}]},
     "task 't': class folder 'classes/b' has no .txt or .md files"),
    ({"name": "s", "kind": "classification", "tasks": [{"name": "t", "paths": ["one"]}]},
     "only the class ['a']; allowed: >= 2 class"),
    ({"name": "s", "seq_len": True, "tasks": [{"name": "t", "paths": ["legal"]}]},
     "seq_len: got True; allowed: an int >= 1"),
    ([{"name": "t"}], "got a list at the top"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_FILES)
def test_bad_stream_files_fail_in_one_line(tmp_path, spec, message):
    _lm_data(tmp_path)
    (tmp_path / "empty").mkdir()
    _text(tmp_path / "classes" / "a" / "1.txt", "text")
    (tmp_path / "classes" / "b").mkdir()
    _text(tmp_path / "one" / "a" / "1.txt", "text")
    file = _text(tmp_path / "bad.json", json.dumps(spec))
    with pytest.raises(NestlearnError) as err:
        load_stream_file(file)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"stream file {str(file)!r}")
    assert message in text


def test_stream_file_is_checked_whole_before_reading_and_format_errors(tmp_path):
    # task 1 holds a file that is not UTF-8, task 2 a missing path: the path is reported
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.txt").write_bytes(b"\xff\xfe\xfa")
    _text(tmp_path / "s.json", json.dumps({"name": "s", "tasks": [
        {"name": "one", "paths": ["bin"]}, {"name": "two", "paths": ["gone"]}]}))
    with pytest.raises(NestlearnError, match="task 'two': path 'gone' does not exist"):
        load_stream_file(tmp_path / "s.json")
    _text(tmp_path / "ok.json", json.dumps({"name": "s", "tasks": [
        {"name": "one", "paths": ["bin"]}]}))
    with pytest.raises(NestlearnError, match=r"task 'one': .*not UTF-8"):
        load_stream_file(tmp_path / "ok.json")
    _text(tmp_path / "s.yaml", "name: s")
    with pytest.raises(NestlearnError, match=re.escape("unknown format '.yaml'; allowed: "
                                                       ".json, .toml")):
        load_stream_file(tmp_path / "s.yaml")
    _text(tmp_path / "broken.toml", "name = ")
    with pytest.raises(NestlearnError, match="not valid TOML") as err:
        load_stream_file(tmp_path / "broken.toml")
    assert "\n" not in str(err.value)
    with pytest.raises(NestlearnError, match="does not exist or is not a file"):
        load_stream_file(tmp_path / "missing.json")
