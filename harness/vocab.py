"""The harness's vocabulary, declared once: record statuses and the registry of checks.

Every other module derives from these two tables: the CLI's and the plugin's ``--checks``
choices, the records schema's enums (``tests/test_vocab.py`` checks that the schema file agrees),
the report's columns and matrix, the known-issue keys, compare's ranks and the runner's order.
Adding a check is one :data:`CHECKS` entry here plus its judging function, registered with
:func:`harness.checks.check` (the only module that imports torch for it). This module imports
nothing heavy, so light paths (the plugin's option parsing, the schema, case files) can use it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(str, enum.Enum):
    """The outcome of one check of one case on one backend.

    ``rank`` orders outcomes for comparisons (higher is worse; ``skip`` is not a result and has
    no rank); ``failing`` says whether it makes a run exit 1; ``severity`` orders the cell of the
    portability matrix (lower shows first).
    """

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    XFAIL = "xfail"
    XPASS = "xpass"
    CRASH = "crash"
    TIMEOUT = "timeout"
    ERROR = "error"

    @property
    def rank(self) -> int | None:
        return _RANK[self]

    @property
    def failing(self) -> bool:
        return self in _FAILING

    @property
    def severity(self) -> int:
        return _SEVERITY.index(self)

    def __str__(self) -> str:
        return self.value


_RANK = {Status.PASS: 0, Status.XPASS: 0, Status.XFAIL: 1, Status.FAIL: 2, Status.ERROR: 2,
         Status.TIMEOUT: 3, Status.CRASH: 3, Status.SKIP: None}
_FAILING = frozenset({Status.FAIL, Status.XPASS, Status.CRASH, Status.TIMEOUT, Status.ERROR})
_SEVERITY = (Status.CRASH, Status.TIMEOUT, Status.ERROR, Status.FAIL, Status.XPASS, Status.XFAIL,
             Status.PASS, Status.SKIP)

#: Every status, in declaration order (what the schema and the report's columns list).
STATUSES: tuple[str, ...] = tuple(s.value for s in Status)
#: Statuses that make a run exit 1.
FAILING: tuple[str, ...] = tuple(s.value for s in Status if s.failing)
#: Rank of each ranked status (compare): higher is worse.
RANK: dict[str, int] = {s.value: s.rank for s in Status if s.rank is not None}
#: Worst first: the status a matrix cell shows when a case's checks disagree.
SEVERITY: tuple[str, ...] = tuple(s.value for s in _SEVERITY)


@dataclass(frozen=True)
class CheckSpec:
    """What a check is and what it needs; its judging function lives in :mod:`harness.checks`.

    Attributes:
        name: the name on the command line, in records and in known issues.
        summary: one line for ``--help`` and the README.
        judged: it judges numbers (a parity check: in the portability matrix, in known issues,
            its ratio compared); throughput only times.
        reference: needs the exact reference.
        baseline: needs the same-precision baseline.
        gradients: runs a backward pass.
        timing: times calls (skipped by exploration, which searches for wrong numbers).
        ratio: records ``metrics["ratio"]`` (err / baseline_err) that compare watches.
    """

    name: str
    summary: str
    judged: bool = True
    reference: bool = False
    baseline: bool = False
    gradients: bool = False
    timing: bool = False
    ratio: bool = False


#: The registry, in the order checks run and appear.
CHECKS: dict[str, CheckSpec] = {spec.name: spec for spec in (
    CheckSpec("fwd", "the forward output (and lse) against the exact reference",
              reference=True, baseline=True, ratio=True),
    CheckSpec("bwd", "dq, dk, dv against the exact reference's gradients",
              reference=True, baseline=True, gradients=True, ratio=True),
    CheckSpec("determinism", "identical inputs and seed give bitwise identical results"),
    CheckSpec("throughput", "median time and TFLOP/s", judged=False, timing=True),
)}

CHECK_NAMES: tuple[str, ...] = tuple(CHECKS)
#: Checks that judge numbers (the portability matrix, known issues, xpass).
JUDGED: tuple[str, ...] = tuple(n for n, c in CHECKS.items() if c.judged)
#: Checks whose error ratio compare watches.
RATIO_CHECKS: tuple[str, ...] = tuple(n for n, c in CHECKS.items() if c.ratio)
#: Checks exploration runs (it hunts for wrong numbers, not for speed).
EXPLORED: tuple[str, ...] = tuple(n for n, c in CHECKS.items() if not c.timing)


def check_order(name: str) -> int:
    """Position of a check in :data:`CHECKS` (for sorting)."""
    return CHECK_NAMES.index(name)
