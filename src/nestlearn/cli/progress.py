"""A progress bar for long CLI commands (``eval``), shown only on a terminal.

The library reports progress through a ``progress(done, total)`` callback and prints nothing;
this turns the callback into a tqdm bar on stderr. When stderr is not a terminal (a log file,
a pipe) nothing is drawn, so logs and captured output stay clean.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO


class ProgressBar:
    """``progress(done, total)`` callback drawing a bar on ``stream`` (default stderr) while
    ``enabled`` and the stream is a terminal; a context manager that clears it at the end."""

    def __init__(self, description: str, unit: str, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        stream = sys.stderr if stream is None else stream
        self.bar = None
        if not enabled or not stream.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is a dependency; a stripped install still evaluates
            return
        self.bar = tqdm(desc=description, unit=unit, unit_scale=True, dynamic_ncols=True,
                        leave=False, file=stream)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            return
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)
        if done >= total:  # tqdm draws at most every 0.1 s: show the end
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
