"""Run options, declared once: the option table both front ends register, the value parsers,
the profiles' budgets and :class:`RunOptions`, what a run is asked to do.

``attn-harness run`` registers :data:`OPTIONS` with no prefix (``--explore``) and the pytest
plugin with ``attn-`` (``--attn-explore``): same names, same defaults, same parsers
(:func:`add_options`). Each parser raises ``argparse.ArgumentTypeError("could not parse
'VALUE': ...")``, which argparse and pytest both turn into a one-line usage error. Checking the
options against the machine (backend specs, suites, known issues) is the session's business
(:func:`harness.run.session.validate_options`). This module imports nothing heavy, so the plugin
can import it in every pytest session.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import shard as sharding
from harness.errors import UsageError
from harness.shard import Shard
from harness.vocab import CHECK_NAMES

PREFIX = "attn-"
#: Seconds accepted as a real time limit; above this (or "none", "inf") there is no limit.
MAX_TIMEOUT_S = 1e6


# ------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """Budgets of one profile: how much effort each check gets.

    Attributes:
        name: quick, nightly or exhaustive.
        explore_examples: hypothesis-generated cases per backend on top of the suites.
        explore_compilers_on_cpu: whether the main job (no ``--explore`` given) also explores,
            on a CPU, a backend that compiles a graph per structure
            (:attr:`harness.backends.base.Backend.compiles_per_structure`): there nearly every
            draw is a structure of its own and costs a compile of about 5 s (FlexAttention's
            C++ template), 20 draws some 100 CPU-seconds on a first run.
    """

    name: str
    explore_examples: int
    warmup_s: float
    budget_s: float
    min_reps: int
    dropout_samples: int
    timeout_s: float
    determinism_runs: int = 2
    graph_replay: bool = False
    explore_compilers_on_cpu: bool = True


PROFILES = {
    "quick": Profile("quick", explore_examples=20, warmup_s=0.05, budget_s=0.25, min_reps=5,
                     dropout_samples=48, timeout_s=300.0, determinism_runs=3,
                     explore_compilers_on_cpu=False),
    "nightly": Profile("nightly", explore_examples=300, warmup_s=0.2, budget_s=1.0, min_reps=10,
                       dropout_samples=96, timeout_s=900.0, determinism_runs=50),
    "exhaustive": Profile("exhaustive", explore_examples=3000, warmup_s=0.5, budget_s=2.0,
                          min_reps=20, dropout_samples=192, timeout_s=1800.0,
                          determinism_runs=250),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(f"--profile {name}: unknown profile "
                         f"(choose {', '.join(PROFILES)})") from None


# ----------------------------------------------------------------------------- parsers
# Each raises argparse.ArgumentTypeError("could not parse 'VALUE': ..."), which argparse and
# pytest both turn into a one-line usage error.


def _fail(value: str, why: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"could not parse {value!r}: {why}")


def parse_checks(value: str) -> tuple[str, ...]:
    """A comma-separated subset of the checks in ``harness.vocab.CHECKS``."""
    items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not items or any(v not in CHECK_NAMES for v in items):
        raise _fail(value, f"checks are a comma-separated subset of {','.join(CHECK_NAMES)}")
    return items


def parse_profile(value: str) -> str:
    if value not in PROFILES:
        raise _fail(value, f"one of {', '.join(PROFILES)}")
    return value


def _number(value: str, kind: Callable = float):
    try:
        return kind(value)
    except ValueError:
        raise _fail(value, "not an integer" if kind is int else "not a number") from None


def parse_count(value: str) -> int:
    """An integer >= 0."""
    n = _number(value, int)
    if n < 0:
        raise _fail(value, "must be >= 0")
    return n


#: ``--explore profile``: the profile's count of examples, even where a suite or case is given.
EXPLORE_PROFILE = -1


def parse_explore(value: str) -> int:
    """An integer >= 0, or ``profile`` for the profile's count (:data:`EXPLORE_PROFILE`)."""
    if value.strip().lower() == "profile":
        return EXPLORE_PROFILE
    return parse_count(value)


def parse_seed(value: str) -> int:
    """An integer >= 0; an integral float such as ``7.0`` or ``1e3`` is accepted as that
    integer (replay commands always write the integer)."""
    try:
        return parse_count(value)
    except argparse.ArgumentTypeError:
        x = _number(value)
        if not (math.isfinite(x) and x == int(x) and x >= 0):
            raise _fail(value, "a seed is an integer >= 0") from None
        return int(x)


def parse_positive(value: str) -> float:
    """A finite number > 0 (seconds, fractions)."""
    x = _number(value)
    if not (x > 0 and math.isfinite(x)):
        raise _fail(value, "must be a finite number > 0")
    return x


def parse_non_negative(value: str) -> float:
    """A finite number >= 0 (0 often meaning: no limit)."""
    x = _number(value)
    if not (x >= 0 and math.isfinite(x)):
        raise _fail(value, "must be a finite number >= 0")
    return x


def parse_shard(value: str) -> Shard | str:
    """``I/N`` (0-based, ``0 <= I < N``), ``auto`` or ``auto/N`` (:mod:`harness.shard`)."""
    try:
        return sharding.parse_shard(value)
    except ValueError as exc:
        raise _fail(value, str(exc)) from None


def parse_run_id(value: str) -> str:
    """A run id: 1-64 letters, digits, ``.``, ``_``, ``:`` or ``-``."""
    try:
        return sharding.check_run_id(value)
    except ValueError as exc:
        raise _fail(value, str(exc)) from None


def parse_timeout(value: str) -> float:
    """Seconds > 0; ``none``, ``inf`` or anything above 1e6 s means no limit (``math.inf``)."""
    if value.strip().lower() in ("none", "inf", "infinity", "0"):
        if value.strip() == "0":
            raise _fail(value, "must be > 0 (or 'none' for no limit)")
        return math.inf
    x = _number(value)
    if x != x or x <= 0:
        raise _fail(value, "must be > 0 (or 'none' for no limit)")
    return math.inf if x > MAX_TIMEOUT_S else x


# ------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Option:
    """One run option, registered by both front ends (see :func:`add_options`).

    Attributes:
        name: the option without its prefix (``explore`` -> ``--explore`` / ``--attn-explore``).
        help: what it does; the default is appended as ``(default: ...)``.
        default_text: how the default reads in ``--help``.
        metavar: the value's placeholder; None for a flag.
        type: the parser of its value.
        default: the value when not given.
        append: repeatable, values collected in a list.
        flag: takes no value (``store_true``).
        alias: the plugin's former spelling, still accepted (deprecated, one release).
        greedy: with ``append``, the command line also takes several values after one flag
            (``--durations a.jsonl b.jsonl``); pytest takes one per flag, so that the values
            cannot swallow the test paths that follow.
    """

    name: str
    help: str
    default_text: str
    metavar: str | None = None
    type: Callable[[str], Any] | None = None
    default: Any = None
    append: bool = False
    flag: bool = False
    alias: str = ""
    greedy: bool = False

    def dest(self, prefix: str) -> str:
        return (prefix + self.name).replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("backend", "backend to test, repeatable: a name, FAMILY@MODULE, FAMILY@FILE.py, "
                      "FILE.py:FUNC or a plugin", "every backend available here",
           metavar="NAME|FAMILY@MODULE|FILE.py:FUNC", append=True),
    Option("suite", "case suite by name (shipped with the harness, or in ./cases or "
                    "--cases-dir) or path, repeatable", "smoke",
           metavar="NAME|FILE.toml", append=True),
    Option("cases-dir", "a directory of the project's own suites and known_issues.toml, added "
                        "to the shipped ones (same names shadow them)", "./cases when it exists",
           metavar="DIR"),
    Option("max-cases", "refuse suites holding more than N cases in all, counted from their "
                        "tables before any case is built (0 = no limit)", "1000000",
           metavar="N", type=parse_count, default=1_000_000),
    # No string defaults with a parser: argparse and pytest would parse them at start-up, which
    # imports the harness in every session. A None default means the documented one.
    Option("profile", "effort per check, exploration examples and cost budget", "quick",
           metavar="quick|nightly|exhaustive", type=parse_profile),
    Option("checks", "comma-separated checks", "every check: fwd,bwd,determinism,throughput",
           metavar="LIST", type=parse_checks),
    Option("seed", "seed of every input tensor, dropout draw and hypothesis", "0",
           metavar="N", type=parse_seed, default=0),
    Option("explore", "hypothesis-generated cases per backend after the suites, shrunk to the "
                      "minimal failure (0 = none; 'profile' = the profile's count)",
           "the profile's (20 for quick) in the main job, but in quick none on a CPU for a "
           "backend that compiles a graph per structure (flex-attention); none when a suite or "
           "case is given",
           metavar="N|profile", type=parse_explore, alias="examples"),
    Option("explore-budget", "seconds each backend's free draws may take: then no new free draw "
                             "is judged, while every corner is still visited and a failure is "
                             "still shrunk ('none' for no limit)", "none",
           metavar="S", type=parse_timeout),
    Option("timeout", "seconds one check may run before it is recorded as a timeout ('none' "
                      "for no limit)", "the profile's, 300 for quick",
           metavar="S", type=parse_timeout),
    Option("max-gflop", "skip checks whose forward (or forward + backward) pass needs more than "
                        "N GFLOP, recording why; 0 = no limit", "2 on a CPU, no limit on a GPU",
           metavar="N", type=parse_non_negative),
    Option("audit", "also run cases a backend does not claim, and classify how it treats them",
           "off", flag=True),
    Option("out", "where results.jsonl and report.md go", "reports/<target-id>/",
           metavar="DIR", alias="records"),
    Option("regressions", "where minimal failing cases found by exploration are written as TOML "
                          "(attn-harness promote FILE copies one into cases/regressions/)",
           "the run's folder, RUN/regressions/", metavar="DIR"),
    Option("graph-replay", "throughput: capture each timed call in a CUDA/HIP graph and time its "
                           "replays (tiny problems); records say when capture was impossible",
           "plain calls", flag=True),
    Option("shard", "take the I-th of N disjoint shares of the tasks (case x backend), the same "
                    "partition on every machine; I is 0-based (0 <= I < N); 'auto' reads "
                    "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, 'auto/N' also "
                    "JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs); results go to "
                    "OUT/shard-I-of-N/ and exploration covers the shard's part of N times the "
                    "examples", "no sharding", metavar="I/N|auto|auto/N", type=parse_shard),
    Option("durations", "results files of an earlier run (or folders holding results*.jsonl): "
                        "shares are packed longest first by the recorded time of each check, "
                        "repeatable", "the harness's own cost estimate",
           metavar="FILE|DIR", append=True, greedy=True),
    Option("run-id", "the id every record of this sweep carries, the same for all its shards",
           "with --shard, derived from the partition and the settings (sweep-<12 hex>); none "
           "otherwise", metavar="ID", type=parse_run_id),
)


def add_options(addoption: Callable[..., Any], prefix: str,
                options: tuple[Option, ...] = OPTIONS) -> None:
    """Register ``options`` with ``addoption`` (argparse's ``add_argument`` or pytest's
    ``group.addoption``) as ``--{prefix}{name}``; a deprecated alias is registered as a second
    spelling of the same option where ``prefix`` is the plugin's."""
    for opt in options:
        names = [f"--{prefix}{opt.name}"]
        if opt.alias and prefix == PREFIX:
            names.append(f"--{prefix}{opt.alias}")
        kwargs: dict[str, Any] = {"dest": opt.dest(prefix),
                                  "help": f"{opt.help} (default: {opt.default_text})"}
        if opt.flag:
            kwargs.update(action="store_true", default=False)
        else:
            kwargs.update(metavar=opt.metavar, default=opt.default)
            if opt.type is not None:
                kwargs["type"] = opt.type
            if opt.append:
                kwargs["action"] = "append"
            if opt.append and opt.greedy and prefix != PREFIX:
                kwargs.update(action="extend", nargs="+")
        addoption(*names, **kwargs)


def option_values(get: Callable[[str], Any], prefix: str) -> dict[str, Any]:
    """``{name: value}`` of every run option, read with ``get(dest)``."""
    return {opt.name: get(opt.dest(prefix)) for opt in OPTIONS}


# ------------------------------------------------------------------------------ run options


@dataclass(frozen=True)
class RunOptions:
    """What a run is asked to do, whichever front end asked (see :data:`OPTIONS` for each
    option's meaning and default)."""

    backends: tuple[str, ...] = ()
    suites: tuple[str, ...] = ()
    cases_dir: Path | None = None
    #: The most cases the suites may hold in all (0 = no limit): see harness.case.suites.MAX_CASES.
    max_cases: int = 1_000_000
    profile: str = "quick"
    checks: tuple[str, ...] = CHECK_NAMES
    seed: int = 0
    explore: int | None = None
    #: ``--explore-budget``: seconds for each backend's free draws (None or inf: no limit).
    explore_budget: float | None = None
    timeout_s: float | None = None
    max_gflop: float | None = None
    audit: bool = False
    out: Path | None = None
    #: None: the run's own folder (``RUN/regressions/``)
    regressions: Path | None = None
    graph_replay: bool = False
    notes: tuple[str, ...] = ()
    #: The share of a sharded sweep this run takes (``--shard``, ``auto`` resolved), or None.
    shard: Shard | None = None
    #: ``--durations``: results files of an earlier run that balance the shares.
    durations: tuple[Path, ...] = ()
    #: ``--run-id`` until :func:`harness.run.session.take_share` sets the sweep's id (derived
    #: when not given).
    run_id: str = ""
    #: Tasks in this run's share (set by :func:`harness.run.session.take_share`).
    shard_tasks: int | None = None

    @property
    def timeout(self) -> float:
        """The per-check time limit in force (the profile's when not given); inf = none."""
        return self.timeout_s if self.timeout_s is not None else get_profile(self.profile).timeout_s

    def examples_for(self, *, inline: bool = False, compiles_on_cpu: bool = False) -> int:
        """Generated cases per backend: ``--explore`` when given (``profile``: the profile's
        count); otherwise the profile's in the main job, and none when suites or inline cases
        (``--case``, a replay) say what to run: a replay of one case must not explore for
        minutes. ``compiles_on_cpu``: the backend compiles a graph per structure and the
        target is a CPU, which the main job explores only where the profile says so
        (:attr:`Profile.explore_compilers_on_cpu`; not in the quick profile)."""
        if self.explore is None and (self.suites or inline):
            return 0
        if (self.explore is None and compiles_on_cpu
                and not get_profile(self.profile).explore_compilers_on_cpu):
            return 0
        if self.explore is None or self.explore == EXPLORE_PROFILE:
            return get_profile(self.profile).explore_examples
        return self.explore

    @property
    def examples(self) -> int:
        return self.examples_for()

    @property
    def explore_budget_s(self) -> float | None:
        """``--explore-budget`` in seconds, or None for no limit."""
        budget = self.explore_budget
        return None if budget is None or math.isinf(budget) else budget
