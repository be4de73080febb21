"""Streams of the user's own text, described by a JSON or TOML file.

```toml
name = "my-stream"
kind = "lm"            # or "classification"
seq_len = 128          # optional (default 128)
description = "..."    # optional
[[tasks]]
name = "legal"
paths = ["data/legal", "data/more_legal.txt"]
```

Relative paths are read from the stream file's folder. ``kind = "lm"``: each path is a text
file (blank-line separated documents) or a folder of ``.txt``/``.md`` files (one document
each), read with nestlearn.data.userfiles. ``kind = "classification"``: each path is a folder
with one sub-folder per class; a sub-folder's name is its class across the whole stream, so
two tasks that share a name share the class. Every document keeps the split of its key
(nestlearn.data.splits; keys are file paths relative to the stream file's folder, absolute
for files outside it, or a paragraph's text for a single text file). When that leaves a
task's split empty, a deterministic cut is used instead and recorded in ``meta["fallback"]``:
for "lm" the task's tokens (documents in order) are cut 80 / 10 / 10; for "classification"
each class with an empty split sends its last file (by path) to test and the one before to
validation.

The whole file and every path are checked before any text is read.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from nestlearn.continual.stream import LMSplit, Stream, Task
from nestlearn.continual.streams._common import BYTES, text_rows
from nestlearn.data.documents import Document
from nestlearn.data.splits import SPLITS, split_of
from nestlearn.data.userfiles import TEXT_SUFFIXES, load_path
from nestlearn.errors import NestlearnError

FILE_KINDS: tuple[str, ...] = ("lm", "classification")
TOP_KEYS: tuple[str, ...] = ("name", "kind", "seq_len", "description", "tasks")
TASK_KEYS: tuple[str, ...] = ("name", "paths")
DEFAULT_SEQ_LEN = 128
LM_FALLBACK = (0.8, 0.1)


def _fail(file: Path, problem: str, task: str | None = None) -> NestlearnError:
    where = f"stream file {str(file)!r}" + ("" if task is None else f": task {task!r}")
    return NestlearnError(f"{where}: {' '.join(problem.split())}")


def _read(file: Path) -> Any:
    if not file.is_file():
        raise _fail(file, "does not exist or is not a file; allowed: a .json or .toml file")
    suffix = file.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise _fail(file, f"unknown format {suffix or '(no suffix)'!r}; allowed: .json, .toml")
    try:
        raw = file.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise _fail(file, f"cannot read ({err})") from None
    if suffix == ".json":
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise _fail(file, f"not valid JSON ({err})") from None
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        try:
            import tomli as tomllib
        except ImportError:
            raise _fail(file, "reading TOML needs Python 3.11+ or the 'tomli' package; "
                        "allowed: a .json stream file") from None
    try:
        return tomllib.loads(raw)
    except tomllib.TOMLDecodeError as err:
        raise _fail(file, f"not valid TOML ({err})") from None


def _text_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file()
                  and f.suffix.lower() in TEXT_SUFFIXES
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def _class_folders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _check_unknown(file: Path, table: dict, allowed: tuple[str, ...], task: str | None) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise _fail(file, f"unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}", task)


def _check_path(file: Path, task: str, written: str, path: Path, kind: str) -> None:
    if not path.exists():
        raise _fail(file, f"path {written!r} does not exist", task)
    if kind == "lm":
        if path.is_dir():
            if not _text_files(path):
                raise _fail(file, f"folder {written!r} has no .txt or .md files; allowed: a "
                            "folder holding at least one", task)
        elif not path.is_file():
            raise _fail(file, f"path {written!r} is not a regular file or folder", task)
        return
    if not path.is_dir():
        raise _fail(file, f"path {written!r} is not a folder; allowed for 'classification': "
                    "a folder with one sub-folder per class", task)
    classes = _class_folders(path)
    if not classes:
        raise _fail(file, f"folder {written!r} has no class sub-folders; allowed: one "
                    "sub-folder of .txt/.md files per class", task)
    for folder in classes:
        if not _text_files(folder):
            raise _fail(file, f"class folder {written + '/' + folder.name!r} has no .txt or .md "
                        "files", task)


def _validate(file: Path, spec: Any) -> tuple[str, str, int, str, list[tuple[str, list]]]:
    """The checked file: name, kind, seq_len, description and each task's (written, path)s."""
    if not isinstance(spec, dict):
        raise _fail(file, f"got a {type(spec).__name__} at the top; allowed: a table of "
                    + ", ".join(TOP_KEYS))
    _check_unknown(file, spec, TOP_KEYS, None)
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(file, f"name: got {name!r}; allowed: a non-empty string")
    kind = spec.get("kind", "lm")
    if kind not in FILE_KINDS:
        raise _fail(file, f"kind: got {kind!r}; allowed: " + ", ".join(map(repr, FILE_KINDS)))
    seq_len = spec.get("seq_len", DEFAULT_SEQ_LEN)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise _fail(file, f"seq_len: got {seq_len!r}; allowed: an int >= 1")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise _fail(file, f"description: got {description!r}; allowed: a string")
    tasks = spec.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise _fail(file, "tasks: missing or empty; allowed: a list of tables with "
                    + " and ".join(TASK_KEYS))
    plan: list[tuple[str, list]] = []
    for position, task in enumerate(tasks):
        label = f"#{position + 1}"
        if not isinstance(task, dict):
            raise _fail(file, f"got a {type(task).__name__}; allowed: a table with "
                        + " and ".join(TASK_KEYS), label)
        task_name = task.get("name")
        if not isinstance(task_name, str) or not task_name.strip():
            raise _fail(file, f"name: got {task_name!r}; allowed: a non-empty string", label)
        _check_unknown(file, task, TASK_KEYS, task_name)
        if any(task_name == seen for seen, _ in plan):
            raise _fail(file, "the task name repeats; allowed: a different name per task",
                        task_name)
        paths = task.get("paths")
        if (not isinstance(paths, list) or not paths
                or not all(isinstance(p, str) and p.strip() for p in paths)):
            raise _fail(file, f"paths: got {paths!r}; allowed: a non-empty list of file or "
                        "folder paths", task_name)
        resolved = []
        for written in paths:
            path = Path(written).expanduser()
            path = path if path.is_absolute() else file.parent / path
            _check_path(file, task_name, written, path, kind)
            resolved.append((written, path))
        plan.append((task_name, resolved))
    if kind == "classification":
        names = {folder.name for _, paths in plan for _, path in paths
                 for folder in _class_folders(path)}
        if len(names) < 2:
            raise _fail(file, f"only the class {sorted(names)}; allowed: >= 2 class "
                        "sub-folders across the tasks")
    return name, kind, seq_len, description, plan


def _read_documents(file: Path, task: str, path: Path) -> list[Document]:
    try:
        documents = load_path(path)
    except NestlearnError as err:
        raise _fail(file, str(err), task) from None
    if not path.is_dir():
        return documents
    # keys relative to the stream file's folder, so splits survive moving the whole project
    try:
        base = path.resolve().relative_to(file.parent.resolve()).as_posix()
    except ValueError:
        base = path.resolve().as_posix()
    return [Document(key=f"{base}/{d.key}", text=d.text) for d in documents]


def _lm_task(file: Path, name: str, paths: list, fallback: dict) -> Task:
    documents = [doc for _, path in paths
                 for doc in _read_documents(file, name, path)]
    by_split = {split: [d for d in documents if split_of(d.key) == split] for split in SPLITS}

    def joined(docs: list[Document]) -> list[int]:
        return [t for d in docs for t in (*BYTES.encode(d.text), BYTES.eod_id)]

    if all(by_split.values()):
        return Task(name=name, **{
            split: LMSplit(torch.tensor(joined(docs), dtype=torch.long), documents=len(docs))
            for split, docs in by_split.items()})
    tokens = joined(documents)
    n_train = int(len(tokens) * LM_FALLBACK[0])
    n_val = int(len(tokens) * LM_FALLBACK[1])
    if n_val < 2 or len(tokens) - n_train - n_val < 2:
        raise _fail(file, f"too little text ({len(tokens)} tokens) to cut train/validation/"
                    "test; allowed: >= 20 bytes of text", name)
    fallback[name] = "tokens cut 80/10/10 (a split had no documents)"
    parts = (tokens[:n_train], tokens[n_train:n_train + n_val], tokens[n_train + n_val:])
    return Task(name=name, **{split: LMSplit(torch.tensor(part, dtype=torch.long),
                                             documents=len(documents))
                              for split, part in zip(SPLITS, parts, strict=True)})


def _class_task(file: Path, name: str, paths: list, class_ids: dict[str, int], seq_len: int,
                fallback: dict) -> Task:
    by_class: dict[int, list[Document]] = {}
    for _, path in paths:
        for folder in _class_folders(path):
            cid = class_ids.setdefault(folder.name, len(class_ids))
            docs = _read_documents(file, name, folder)
            by_class.setdefault(cid, []).extend(docs)
    rows: dict[str, tuple[list[str], list[int]]] = {split: ([], []) for split in SPLITS}
    for cid, docs in sorted(by_class.items()):
        assigned = {split: [d for d in docs if split_of(d.key) == split] for split in SPLITS}
        if not all(assigned.values()) and len(docs) >= 3:
            ordered = sorted(docs, key=lambda d: d.key)
            assigned = {"train": ordered[:-2], "validation": [ordered[-2]], "test": [ordered[-1]]}
            fallback.setdefault(name, []).append(next(k for k, v in class_ids.items()
                                                      if v == cid))
        for split, chosen in assigned.items():
            rows[split][0].extend(d.text for d in chosen)
            rows[split][1].extend([cid] * len(chosen))
    for split, (texts, _) in rows.items():
        if not texts:
            raise _fail(file, f"the {split} split is empty; allowed: classes with >= 3 files "
                        "each (or enough files for every split)", name)
    return Task(name=name, classes=tuple(sorted(by_class)),
                **{split: text_rows(texts, labels, seq_len)
                   for split, (texts, labels) in rows.items()})


def load_stream_file(path: str | os.PathLike[str]) -> Stream:
    """The stream described by a JSON or TOML file (see the module docstring)."""
    file = Path(path).expanduser()
    name, kind, seq_len, description, plan = _validate(file, _read(file))
    fallback: dict[str, Any] = {}
    class_ids: dict[str, int] = {}
    if kind == "lm":
        tasks = [_lm_task(file, task, paths, fallback) for task, paths in plan]
    else:
        tasks = [_class_task(file, task, paths, class_ids, seq_len, fallback)
                 for task, paths in plan]
    if fallback and kind == "classification":
        fallback = {task: f"classes {names} cut by path: last file test, one before validation"
                    for task, names in fallback.items()}
    return Stream(
        name=name, kind=kind, tasks=tuple(tasks), vocab_size=BYTES.vocab_size, seq_len=seq_len,
        class_names=tuple(sorted(class_ids, key=class_ids.__getitem__)),
        description=description or f"user stream from {file.name}",
        meta={"file": str(file), "fallback": fallback, "tokenizer": BYTES.describe()})
