"""Errors raised for bad input: each names what was wrong and what is allowed."""

from __future__ import annotations


class NestlearnError(ValueError):
    """Bad input to a nestlearn function or command.

    A subclass of ``ValueError`` so callers can catch it as one; the CLI turns it into a
    single line on stderr and exit code 2 instead of a traceback.
    """


def invalid(name: str, got: object, allowed: str) -> NestlearnError:
    """Build the standard message: ``name: got X; allowed: Y``."""
    return NestlearnError(f"{name}: got {got}; allowed: {allowed}")


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` is an int (not a bool) >= ``minimum``; returned unchanged."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(name, repr(value), f"an int >= {minimum}")
    return value


def check_positive(name: str, value: object) -> float:
    """``value`` is a real number (not a bool) > 0; returned unchanged."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise invalid(name, repr(value), "a number > 0")
    return value


def check_fraction(name: str, value: object) -> float:
    """``value`` is a real number (not a bool) strictly between 0 and 1; returned unchanged."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise invalid(name, repr(value), "a number in (0, 1)")
    return value
