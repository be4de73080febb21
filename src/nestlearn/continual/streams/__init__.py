"""Continual-learning streams: built-in builders and the user's own stream files.

``build_stream(name, seed=0, **size)`` builds one of ``STREAM_NAMES``; the size knobs each
builder takes are listed by :func:`stream_knobs`. ``load_stream_file(path)`` reads a JSON or
TOML description of the user's own tasks (see :mod:`.files`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from nestlearn.continual.stream import Stream
from nestlearn.continual.streams import digits, domain_lm, mnist, regime, wiki_classes
from nestlearn.continual.streams.files import load_stream_file
from nestlearn.errors import NestlearnError, invalid

_BUILDERS: dict[str, Callable[..., Stream]] = {
    "domain-lm": domain_lm.build,
    "wiki-classes": wiki_classes.build,
    "split-digits": digits.build_split,
    "permuted-digits": digits.build_permuted,
    "split-mnist": mnist.build_split,
    "permuted-mnist": mnist.build_permuted,
    "regime-shift": regime.build,
}
STREAM_NAMES: tuple[str, ...] = tuple(_BUILDERS)

__all__ = ["STREAM_NAMES", "build_stream", "load_stream_file", "stream_knobs"]


def stream_knobs(name: str) -> dict[str, object]:
    """The size knobs of stream ``name`` with their defaults."""
    if name not in _BUILDERS:
        raise invalid("stream", repr(name), ", ".join(STREAM_NAMES))
    parameters = inspect.signature(_BUILDERS[name]).parameters
    return {key: p.default for key, p in parameters.items() if key != "seed"}


def build_stream(name: str, *, seed: int = 0, **size: object) -> Stream:
    """Stream ``name`` built with ``seed`` (the same seed gives the same stream) and the size
    knobs in ``size`` (see :func:`stream_knobs`)."""
    knobs = stream_knobs(name)
    unknown = sorted(set(size) - set(knobs))
    if unknown:
        raise NestlearnError(f"stream {name!r}: unknown size knob {unknown[0]!r}; allowed: "
                             + ", ".join(knobs))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise invalid("seed", repr(seed), "an int >= 0")
    return _BUILDERS[name](seed=seed, **size)
