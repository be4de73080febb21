"""Turn the machine running out of something (disk, write access, memory) into one
:class:`nestlearn.errors.ResourceError` line that names the last good checkpoint.

Such a failure leaves the run as it was at its last checkpoint: checkpoints are written
atomically (a failed save removes its staging folder, :func:`nestlearn.atomic.atomic_directory`)
and nothing is saved after an out-of-memory step, whose parameters may be half updated.
"""

from __future__ import annotations

import errno
from pathlib import Path

import torch
from safetensors import SafetensorError

from nestlearn.errors import ResourceError

# errors of a write the run could not make: no space, file size or quota limit, no access
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM,
                          errno.EROFS, errno.EIO})


def last_good(run_dir: Path) -> str:
    """``the last good checkpoint is PATH (intact)``, or that there is none yet."""
    from nestlearn.training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    if latest is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint is {latest} (intact)"


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


def as_resource_error(err: BaseException, run_dir: Path, step: int | None) -> ResourceError | None:
    """The one-line error for a resource failure during a run, or None for any other error."""
    if isinstance(err, ResourceError):
        return err
    at = "" if step is None else f" after {step} steps"
    if is_out_of_memory(err):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return ResourceError(
            f"training stopped{at}: out of memory ({first[:160]}); {last_good(run_dir)}; a "
            "smaller data.batch_size or data.seq_len needs less memory"
        )
    if is_write_failure(err):
        where = f" {err.filename}" if isinstance(err, OSError) and err.filename else ""
        return ResourceError(f"training stopped{at}: cannot write{where} ({io_reason(err)}); "
                             f"{last_good(run_dir)}")
    return None
