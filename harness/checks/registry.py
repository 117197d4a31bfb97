"""The registry of check functions and what a kernel call may raise.

Each check is one function registered with :func:`check` under its name in
:data:`harness.vocab.CHECKS`; it takes the check context (:mod:`harness.checks.context`) and
returns a new :class:`~harness.exact.judge.Verdict`. The harness's own checks live in
:mod:`harness.checks.parity` (fwd, bwd), :mod:`harness.checks.determinism` and
:mod:`harness.checks.throughput`; :mod:`harness.checks.context` imports them, so every check is
registered once the context can run it. What a kernel call raises is sorted by
:func:`kernel_errors` into the kernel's refusal, out of memory, a broken contract or an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from harness.backends.base import BadReturn, Unsupported
from harness.vocab import CHECKS

if TYPE_CHECKING:
    from harness.checks.context import CheckContext
    from harness.exact import judge


class KernelError(Exception):
    """The kernel raised on a case it claims to support."""


class KernelRefused(Exception):
    """The kernel raised ``NotImplementedError``: Python's idiomatic refusal, a skip."""


class KernelOutOfMemory(Exception):
    """The kernel ran out of memory on a case the harness estimates fits the device."""


class ContractViolation(Exception):
    """What the kernel returned (or did to its inputs) breaks the forward contract."""


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of memory (torch's, Python's, or a RuntimeError saying so)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()



def describe(exc: BaseException) -> str:
    """``TypeName: first line of the message``, at most 500 characters."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


#: check name -> its judging function ``(context) -> Verdict``, in the order of
#: :data:`harness.vocab.CHECKS` whatever order the modules registering them are imported in.
CHECK_FUNCTIONS: dict[str, Callable[[CheckContext], judge.Verdict]] = {}


def check(name: str):
    """Register the judging function of the check ``name`` (declared in harness.vocab)."""
    if name not in CHECKS:
        raise ValueError(f"check {name!r} is not declared in harness.vocab.CHECKS")

    def register(fn):
        CHECK_FUNCTIONS[name] = fn
        for known in [n for n in CHECKS if n in CHECK_FUNCTIONS]:  # re-inserted in CHECKS order
            CHECK_FUNCTIONS[known] = CHECK_FUNCTIONS.pop(known)
        return fn

    return register


@contextlib.contextmanager
def kernel_errors(prefix: str = ""):
    """What a kernel call raises is the kernel's: a refusal (:class:`Unsupported`) passes
    through, a return that is not the family's convention (:class:`BadReturn`) breaks the
    contract (:class:`ContractViolation`), ``NotImplementedError`` is a refusal too
    (:class:`KernelRefused`), out-of-memory is :class:`KernelOutOfMemory`, anything else
    :class:`KernelError`."""
    try:
        yield
    except Unsupported:
        raise
    except BadReturn as exc:
        raise ContractViolation(f"kernel output breaks the forward contract: {exc}") from None
    except NotImplementedError as exc:
        raise KernelRefused(prefix + describe(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - every kernel failure becomes a record
        if is_oom(exc):
            raise KernelOutOfMemory(prefix + describe(exc)) from exc
        raise KernelError(prefix + describe(exc)) from exc
