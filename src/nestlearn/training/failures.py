"""What a failed run says and leaves: the machine running out of something (disk, write
access, memory) becomes one :class:`nestlearn.errors.ResourceError` line that names the last
good checkpoint, and a run refused before its first step removes the folders it created.

Such a failure leaves the run as it was at its last checkpoint: checkpoints are written
atomically (a failed save removes its staging folder, :func:`nestlearn.atomic.atomic_directory`)
and nothing is saved after an out-of-memory step, whose parameters may be half updated.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from nestlearn.errors import ResourceError

# errors of a write the run could not make: no space, file size or quota limit, no access
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM,
                          errno.EROFS, errno.EIO})


def io_reason(err: BaseException) -> str:
    """The OS's words for a failed write: ``No space left on device``, ``File too large``."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    text = str(err)
    # safetensors reports a failed write as "Error while serializing: I/O error: <os message>"
    return text.split("I/O error: ", 1)[-1]


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: ``MemoryError``, CUDA's ``OutOfMemoryError`` or the CPU
    allocator's ``RuntimeError`` ("can't allocate memory")."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def is_write_failure(err: BaseException) -> bool:
    """A write refused by the machine (not a bug): see :data:`WRITE_ERRNOS`; safetensors'
    own error when it wraps one."""
    if isinstance(err, OSError):
        return err.errno in WRITE_ERRNOS
    return isinstance(err, SafetensorError) and "I/O error" in str(err)


def as_resource_error(err: BaseException, step: int | None, last_good: str
                      ) -> ResourceError | None:
    """The one-line error for a resource failure during a run, or None for any other error;
    ``last_good`` names the run's last good checkpoint
    (:func:`nestlearn.training.checkpoint.last_good`)."""
    if isinstance(err, ResourceError):
        return err
    at = "" if step is None else f" after {step} steps"
    if is_out_of_memory(err):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return ResourceError(
            f"training stopped{at}: out of memory ({first[:160]}); {last_good}; a "
            "smaller data.batch_size or data.seq_len needs less memory"
        )
    if is_write_failure(err):
        where = f" {err.filename}" if isinstance(err, OSError) and err.filename else ""
        return ResourceError(f"training stopped{at}: cannot write{where} ({io_reason(err)}); "
                             f"{last_good}")
    return None


@dataclass(frozen=True)
class FolderBefore:
    """What existed of a run folder before a run began (see :func:`remove_what_a_run_made`)."""

    created: Path | None  # the outermost folder the run creates (None: the run folder existed)
    entries: frozenset[str]  # names inside the run folder, if it existed


def folder_before(run_dir: Path) -> FolderBefore:
    """Note what exists of ``run_dir`` (and its parents) before a run writes there."""
    created = None
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            break
        created = folder
    entries = frozenset() if created is not None or not run_dir.is_dir() \
        else frozenset(p.name for p in run_dir.iterdir())
    return FolderBefore(created, entries)


def remove_what_a_run_made(run_dir: Path, before: FolderBefore, keep: str) -> None:
    """Remove the entries of ``run_dir`` that were not there before (all, in a folder the run
    created) but ``keep`` (the run's lock file, which its lock removes)."""
    for entry in list(run_dir.iterdir()) if run_dir.is_dir() else []:
        if entry.name in before.entries or entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def remove_created_folders(run_dir: Path, before: FolderBefore) -> None:
    """Remove ``run_dir`` and the parents the run created, each only if empty (another run
    may have started there since), so a refused run leaves no empty run folder behind."""
    if before.created is None:
        return
    for folder in (run_dir, *run_dir.parents):
        if not folder.is_relative_to(before.created):
            break
        try:
            os.rmdir(folder)
        except OSError:  # not empty, or already gone
            if folder.exists():
                break
