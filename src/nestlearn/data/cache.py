"""Where prepared corpora live: ``$NESTLEARN_CACHE`` or ``~/.cache/nestlearn``."""

from __future__ import annotations

import os
from pathlib import Path

from nestlearn.errors import NestlearnError

CACHE_ENV = "NESTLEARN_CACHE"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``override`` if given, else ``$NESTLEARN_CACHE``, else
    ``~/.cache/nestlearn``. The folder is not created here (see :func:`ensure_writable_dir`)."""
    if override is not None:
        return Path(override).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "nestlearn"


def ensure_writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Create ``path`` if needed and check that files can be written in it.

    Raises NestlearnError naming ``what`` (e.g. ``"--out"``) when that is not possible.
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NestlearnError(f"{what}: got {str(folder)!r}, which is a file; allowed: a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NestlearnError(
            f"{what}: cannot create folder {str(folder)!r} ({err.strerror}); "
            "allowed: a folder you can write to"
        ) from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise NestlearnError(
            f"{what}: folder {str(folder)!r} is not writable; allowed: a folder you can write to"
        )
    return folder
