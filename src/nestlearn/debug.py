"""Value checks inside layers, off by default: each one is a device sync.

An op called directly checks its gates' values (finite, in range) once per call. A layer calls
its ops once per chunk or segment and skips those checks, and a model's forward skips the range
check of its token ids, since on a GPU each ``.item()`` stalls the stream: a training step then
reads nothing on the host. Turn them on to find where values go bad:

    nestlearn.debug_checks(True)          # from now on (None: back to the environment's)
    with nestlearn.debug_checks():        # inside the block only
        model(ids)

or set ``NESTLEARN_DEBUG_CHECKS=1`` in the environment.
"""

from __future__ import annotations

import os
from types import TracebackType

from nestlearn.errors import invalid

ENV_VAR = "NESTLEARN_DEBUG_CHECKS"
_enabled: bool | None = None  # None: the environment variable decides


def debug_checks_enabled() -> bool:
    """Whether layers check the values they pass to their ops."""
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("", "0", "false", "off")


class debug_checks:  # lower case: called like a function, also a context manager
    """Turn the value checks inside layers on (or off; None: back to what the environment
    says); as a context manager, only inside the ``with`` block (the previous setting comes
    back on exit)."""

    def __init__(self, enabled: bool | None = True) -> None:
        global _enabled
        if enabled is not None and not isinstance(enabled, bool):
            raise invalid("enabled", repr(enabled), "None, true or false")
        self._previous = _enabled
        _enabled = enabled

    def __enter__(self) -> debug_checks:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        global _enabled
        _enabled = self._previous
