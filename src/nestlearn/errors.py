"""Errors, and the one set of argument checks every module uses.

Three kinds of failure, kept apart so a caller can tell them apart:

* :class:`NestlearnError` (a ``ValueError``): bad input. Its message names the field, the value
  and what is allowed: ``name: got X; allowed: Y`` (:func:`invalid`).
* :class:`NonFiniteError` (an ``ArithmeticError``, not a ``NestlearnError``): the inputs were
  valid but values computed from them went bad (NaN/Inf). The trainer catches this one to stop
  and keep the last good checkpoint; a ``NestlearnError`` is a bug in the call and propagates.
* :class:`ResourceError` (a ``RuntimeError``): the machine ran out of disk, memory or write
  access during a valid run; the message names the last good checkpoint.

The ``check_*`` functions check plain Python values (config fields, op arguments) and never
touch tensor values, so they cost no device sync.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


class NestlearnError(ValueError):
    """Bad input to a nestlearn function or command.

    A subclass of ``ValueError`` so callers can catch it as one; the CLI turns it into a
    single line on stderr and exit code 2 instead of a traceback.
    """


class NonFiniteError(ArithmeticError):
    """Values went bad: NaN/Inf in a loss, a gate, a memory state or a gradient.

    Not a :class:`NestlearnError`: the input was valid, the numbers computed from it were not.
    The trainer stops on it and keeps its last good checkpoint; the CLI prints it as one line.
    """


class ResourceError(RuntimeError):
    """The machine could not give a valid run what it needs: disk space, a writable folder,
    memory. The message says what ran out and which checkpoint is the last good one; the CLI
    prints it as one line with exit code 1 (not 2: the input was not at fault)."""


def invalid(name: str, got: object, allowed: str) -> NestlearnError:
    """Build the standard message: ``name: got X; allowed: Y``."""
    return NestlearnError(f"{name}: got {got}; allowed: {allowed}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` is an int (not a bool) >= ``minimum``; returned unchanged."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(name, repr(value), f"an int >= {minimum}")
    return value


def check_optional_int(name: str, value: object, minimum: int = 1) -> int | None:
    """``value`` is None or an int >= ``minimum``; returned unchanged."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < minimum):
        raise invalid(name, repr(value), f"None or an int >= {minimum}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` is True or False (not 0 / 1); returned unchanged."""
    if not isinstance(value, bool):
        raise invalid(name, repr(value), "true or false")
    return value


def check_choice(name: str, value: object, choices: Iterable[T]) -> T:
    """``value`` is one of ``choices``; returned unchanged."""
    choices = tuple(choices)
    if value not in choices:
        raise invalid(name, repr(value), "one of " + ", ".join(repr(c) for c in choices))
    return value  # type: ignore[return-value]


def check_number(name: str, value: object, low: float = -math.inf, high: float = math.inf, *,
                 open_low: bool = False, open_high: bool = False) -> float:
    """``value`` is a finite real number (not a bool) in the interval from ``low`` to
    ``high`` (each end closed unless ``open_low`` / ``open_high``); returned as a float."""
    in_range = _is_number(value) and math.isfinite(value) \
        and (value > low if open_low else value >= low) \
        and (value < high if open_high else value <= high)
    if not in_range:
        if math.isinf(high):
            allowed = f"a finite number {'>' if open_low else '>='} {low}"
        else:
            allowed = (f"a number in {'(' if open_low else '['}{low}, "
                       f"{high}{')' if open_high else ']'}")
        raise invalid(name, repr(value), allowed)
    return float(value)


def check_positive(name: str, value: object) -> float:
    """A finite real number > 0 (step sizes, epsilons)."""
    return check_number(name, value, 0, open_low=True)


def check_nonnegative(name: str, value: object) -> float:
    """A finite real number >= 0 (learning rates, weight decay)."""
    return check_number(name, value, 0)


def check_fraction(name: str, value: object) -> float:
    """A real number strictly between 0 and 1 (gate caps and initial values)."""
    return check_number(name, value, 0, 1, open_low=True, open_high=True)


def check_decay(name: str, value: object) -> float:
    """A momentum or decay factor in [0, 1)."""
    return check_number(name, value, 0, 1, open_high=True)


def check_unit(name: str, value: object) -> float:
    """A strength or ratio in [0, 1]."""
    return check_number(name, value, 0, 1)
