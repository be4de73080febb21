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
