"""Atomic writes: write to a temporary file or folder beside the target, fsync, then rename.

A reader therefore sees either the old file (folder) or the complete new one, never a
half-written one, even if the writer is killed in the middle. The temporary file (folder) is
created 0600 (0700) by :mod:`tempfile`; it is given the mode the process umask implies
(0644 / 0755 under umask 022) before the rename, as ``open`` or ``mkdir`` would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process umask, read from ``/proc/self/status`` where Linux shows it (reading it with
    ``os.umask`` means setting it for a moment, which races with other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically."""
    target = Path(path)
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(handle, mode, encoding=encoding) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as stream:
        stream.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a written file (or a folder's entries, after a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


STAGING_PREFIX = ".tmp-"  # a folder being written beside its target
REPLACED_PREFIX = ".old-"  # the previous folder, between the two renames of a replacement


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on success every file in it is given the
    mode the umask implies and flushed, and the folder is renamed to ``path`` (replacing an
    existing folder), so ``path`` is always absent, the old folder or the complete new one. On
    an error the staging folder is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-", dir=target.parent))
    try:
        yield staging
        publish_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_directory(staging: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """The end of :func:`atomic_directory` for a staging folder written by other means (the
    ranks of a sharded checkpoint): give every file (in subfolders too) and folder the modes
    the umask implies, flush them, and rename ``staging`` to ``path`` (replacing an existing
    folder). The caller removes ``staging`` if this fails."""
    staging, target = Path(staging), Path(path)
    umask = current_umask()
    os.chmod(staging, 0o777 & ~umask)
    for item in staging.rglob("*"):
        if item.is_dir():
            os.chmod(item, 0o777 & ~umask)
        elif item.is_file():
            # writers such as safetensors create their files 0600 whatever the umask
            os.chmod(item, 0o666 & ~umask)
            fsync_path(item)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{REPLACED_PREFIX}{target.name}-",
                                    dir=target.parent))
        os.rename(target, old / target.name)
        os.rename(staging, target)
        shutil.rmtree(old)
    else:
        os.rename(staging, target)
    fsync_path(target.parent)


def remove_staging_leftovers(folder: str | os.PathLike[str]) -> None:
    """Remove the staging and replaced folders a writer killed inside
    :func:`atomic_directory` left in ``folder``; only for a folder with a single writer."""
    for pattern in (f"{STAGING_PREFIX}*", f"{REPLACED_PREFIX}*"):
        for stale in Path(folder).glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
