"""One writer per run folder: a lock that a training run holds from start to end.

Two ``train`` runs on one folder would overwrite each other's checkpoints and config and mix
their metrics, so the trainer (rank 0) takes ``RUN/train.lock`` before it writes anything. The
lock is an ``flock`` on that file, held open for the run's lifetime: the operating system
drops it when the process ends in any way (SIGKILL included), so a lock file left behind by a
dead process never blocks. The file names its holder (pid, host, start time) for the
message a second writer gets. On platforms without ``fcntl`` (Windows) no lock is taken.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import IO

from nestlearn.errors import NestlearnError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, run folders are not guarded
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "train.lock"
_READ_TRIES = 20  # the holder writes its name just after locking: wait for it briefly
_READ_PAUSE_S = 0.025


class RunFolderLock:
    """Exclusive lock on a run folder: :meth:`acquire` or refuse naming the holder;
    :meth:`release` (or leaving the ``with`` block) frees it and removes the lock file."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._handle: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> None:
        """Take the lock (the folder must exist), or raise a one-line ``NestlearnError``."""
        if self._handle is not None or fcntl is None:
            return
        while True:
            # the file may be left by a run that died: opened, never truncated, until locked
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # modes follow the umask
            handle = os.fdopen(fd, "r+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                handle.close()
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise NestlearnError(in_use_message(self.run_dir, read_holder(self.path))
                                         ) from None
                # e.g. a network filesystem without locks: train, but unguarded
                warnings.warn(f"{self.path}: cannot lock ({err.strerror or err}); nothing "
                              "stops a second run from writing this folder", stacklevel=2)
                return
            if _same_file(handle, self.path):
                break
            # the previous holder removed the file between our open and our lock: retry
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now().astimezone().isoformat(timespec="seconds"),
        }) + "\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Free the lock (nothing if not held). The file goes first: while we hold the lock
        the path is ours, so no other run's lock file is removed."""
        if self._handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self._handle.close()  # closing drops the flock
            self._handle = None

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(handle: IO[str], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def read_holder(path: Path) -> dict[str, object] | None:
    """``{"pid", "host", "since"}`` written by the lock's holder, or None if unreadable."""
    for _ in range(_READ_TRIES):
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(holder, dict) and "pid" in holder:
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(_READ_PAUSE_S)
    return None


def in_use_message(run_dir: Path, holder: dict[str, object] | None) -> str:
    who = ("another process" if holder is None else
           f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}")
    return (f"run folder {str(run_dir)!r} is in use by {who}; wait for that run to end, "
            "or choose another --out")
