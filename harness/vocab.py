"""The harness's vocabulary, declared once: record statuses and the registry of checks.

Every other module derives from these two tables: the CLI's and the plugin's ``--checks`` choices,
the records schema's enums (``tests/test_vocab.py`` checks that the schema file agrees), the
report's columns and matrix, the known-issue keys, compare's ranks and the runner's order. Adding a
check is one :data:`CHECKS` entry here plus its judging function, registered with
:func:`harness.checks.registry.check` (the only module that imports torch for it). This module
imports nothing heavy, so light paths (the plugin's option parsing, the schema, case files) can use
it.
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


#: Work of a backward pass in forward passes (flash-attn's benchmark counts the backward as 2.5
#: forwards: ``benchmarks/benchmark_flash_attention.py``).
BWD_FLOP_FACTOR = 2.5


@dataclass(frozen=True)
class CheckSpec:
    """What a check is and what it needs; the framework reads these flags, so a new check is
    one entry here and one function registered under its name with
    :func:`harness.checks.registry.check`.

    Attributes:
        name: the name on the command line, in records and in known issues.
        summary: one line for ``--help`` and the README.
        judged: it judges numbers (a parity check: in the portability matrix, in known issues,
            its ratio compared); a timing check only times.
        reference: needs the exact reference (planned memory: its float64 copies).
        baseline: needs the same-precision baseline (planned memory: its outputs).
        gradients: runs a backward pass: refused where a case or backend has none (fp8, the
            kv-cache entry, a paged varlen cache, a backend without backward), planned with
            the gradients' memory, its work counted as forward + backward, and exploration
            explores the corners only a backward reaches (a strided dout).
        timing: times calls: skipped by exploration (which hunts wrong numbers), shown in the
            report's throughput table and plots, and compared by time, not by status alone.
        ratio: records ``metrics["ratio"]`` (err / baseline_err) that compare watches.
        cost: forward passes' worth of arithmetic one check of a case does (the kernel, the
            reference and the baseline, each with its backward where there is one; repeated
            runs): what a shard's share is estimated by when no durations are given.
    """

    name: str
    summary: str
    judged: bool = True
    reference: bool = False
    baseline: bool = False
    gradients: bool = False
    timing: bool = False
    ratio: bool = False
    cost: float = 1.0

    @property
    def work(self) -> float:
        """Forward passes of work one call of the check does: 1, or 1 + the backward's."""
        return 1 + BWD_FLOP_FACTOR if self.gradients else 1.0


#: The registry, in the order checks run and appear.
CHECKS: dict[str, CheckSpec] = {spec.name: spec for spec in (
    CheckSpec("fwd", "the forward output (and lse) against the exact reference",
              reference=True, baseline=True, ratio=True, cost=3.0),
    CheckSpec("bwd", "dq, dk, dv against the exact reference's gradients",
              reference=True, baseline=True, gradients=True, ratio=True,
              cost=3.0 * (1 + BWD_FLOP_FACTOR)),
    CheckSpec("determinism", "identical inputs and seed give bitwise identical results",
              cost=2.0 * (1 + BWD_FLOP_FACTOR)),
    CheckSpec("throughput", "median time and TFLOP/s", judged=False, timing=True),
)}

CHECK_NAMES: tuple[str, ...] = ()
#: Checks that judge numbers (the portability matrix, known issues, xpass).
JUDGED: tuple[str, ...] = ()
#: Checks whose error ratio compare watches.
RATIO_CHECKS: tuple[str, ...] = ()
#: Checks exploration runs (it hunts for wrong numbers, not for speed).
EXPLORED: tuple[str, ...] = ()
#: Checks that time calls (the report's throughput table, compare's time rules).
TIMED: tuple[str, ...] = ()


def _derive() -> None:
    global CHECK_NAMES, JUDGED, RATIO_CHECKS, EXPLORED, TIMED
    CHECK_NAMES = tuple(CHECKS)
    JUDGED = tuple(n for n, c in CHECKS.items() if c.judged)
    RATIO_CHECKS = tuple(n for n, c in CHECKS.items() if c.ratio)
    EXPLORED = tuple(n for n, c in CHECKS.items() if not c.timing)
    TIMED = tuple(n for n, c in CHECKS.items() if c.timing)


_derive()


def register(spec: CheckSpec) -> CheckSpec:
    """Declare one more check (after the shipped ones). Other modules take the derived tuples
    when they are imported, so a check must be declared before the rest of the harness is
    imported (the shipped checks are declared above)."""
    if spec.name in CHECKS:
        raise ValueError(f"check {spec.name!r} is declared already")
    CHECKS[spec.name] = spec
    _derive()
    return spec


def gradients(checks) -> bool:
    """Whether any of ``checks`` (names) runs a backward pass."""
    return any(CHECKS[c].gradients for c in checks if c in CHECKS)


def check_order(name: str) -> int:
    """Position of a check in :data:`CHECKS` (for sorting)."""
    return CHECK_NAMES.index(name)


# ------------------------------------------------------------------------------- features

#: Features a case can turn on (``harness.case.Case.features``); backends claim a subset
#: (``harness.backends.base.Capabilities.features``) and known issues name them.
FEATURES = ("causal", "window", "softcap", "alibi", "dropout", "gqa", "scale", "strided", "paged",
            "seqlen_q>seqlen_k", "packed", "v-transposed", "dout-strided", "lastdim-strided",
            "append", "rotary", "leftpad", "batch-idx", "splits", "alibi-per-batch",
            "mla", "latent-kv", "sink", "sink-tokens", "fp8-kv", "padded")
#: The features of issue 26 (MLA head dims, the shared latent k = v, learnable sinks, sink
#: tokens, fp8 KV caches with 16-bit queries, padded varlen): no backend claims them unless its
#: family's API poses them (``harness.backends.base.DEFAULT_FEATURES`` leaves them out).
OPT_IN_FEATURES = ("mla", "latent-kv", "sink", "sink-tokens", "fp8-kv", "padded")

#: The regions of an input a kernel must not read (issue 26, ``harness.exact.padding``): each is
#: NaN in the inputs unless a backend's contract says it must be finite
#: (``harness.backends.base.Capabilities.finite_padding``), where it holds large finite junk.
PADDING_REGIONS = {
    "cache-tail": "kv-cache slots past each sequence's cache_seqlens",
    "leftpad": "kv-cache slots before each sequence's cache_leftpad",
    "cache-rows": "kv-cache rows no sequence uses (with cache_batch_idx)",
    "page-tail": "slots past a sequence's keys in its last, partly used page",
    "pages-unused": "pages holding none of a sequence's keys (the pool's spare pages and the "
                    "block-table entries past a sequence's keys)",
    "varlen-gap": "the padding at the end of each sequence's slot in a padded varlen layout "
                  "(rows past seqused_q/seqused_k)",
}
