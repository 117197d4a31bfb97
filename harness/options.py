"""Parsers for option values, shared by the command line and the pytest plugin.

Each raises ``argparse.ArgumentTypeError("could not parse 'VALUE': ...")``, which both argparse
and pytest turn into a one-line usage error. Nothing here imports torch.
"""

from __future__ import annotations

import argparse

CHECKS = ("fwd", "bwd", "determinism", "throughput")
PROFILES = ("quick", "nightly", "exhaustive")


def _fail(value: str, why: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"could not parse {value!r}: {why}")


def checks(value: str) -> tuple[str, ...]:
    """A comma-separated subset of fwd, bwd, determinism, throughput."""
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items or any(v not in CHECKS for v in items):
        raise _fail(value, f"checks are a comma-separated subset of {','.join(CHECKS)}")
    return items


def profile(value: str) -> str:
    if value not in PROFILES:
        raise _fail(value, f"one of {', '.join(PROFILES)}")
    return value


def _number(value: str, kind=float):
    try:
        return kind(value)
    except ValueError:
        raise _fail(value, "not an integer" if kind is int else "not a number") from None


def count(value: str) -> int:
    """An integer >= 0."""
    n = _number(value, int)
    if n < 0:
        raise _fail(value, "must be >= 0")
    return n


def positive(value: str) -> float:
    """A number > 0 (seconds, fractions)."""
    x = _number(value)
    if not x > 0:
        raise _fail(value, "must be > 0")
    return x


def non_negative(value: str) -> float:
    """A number >= 0 (0 often meaning: no limit)."""
    x = _number(value)
    if not x >= 0:
        raise _fail(value, "must be >= 0")
    return x
