"""Exploration: hypothesis draws cases, a worker judges them, shrinking finds the minimal failure.

Both ``attn-harness run --profile X`` and the parity suite under pytest drive the same function,
:func:`explore`: it draws up to ``examples`` cases from :func:`harness.run.strategies.cases` for the
backend's declared capabilities, runs each through ``run_case`` (which isolates the kernel in a
worker process), and on the first failing record lets hypothesis shrink to the smallest case that
still fails. The minimal case is written to the run's ``regressions/`` folder as TOML, with the
backend, target and error it failed with, and is reported with the command that replays it.

The cases are drawn in phases (:func:`plan`): free draws first, so that a kernel wrong almost
everywhere fails on a simple case; then a few cases inside each corner of the input space where
reported bugs live (:data:`harness.run.strategies.CORNERS`: past the grid limit, past 16k keys,
16-bit overflow, key-bias, packed, v strided unlike k, a strided dout, dropout), which free
draws reach in a few cases of a hundred, so that every profile, the quick one's 20 cases
included, visits each. A failure inside a corner shrinks inside it, and is then tried once
outside it (normal values, contiguous tensors, no dropout): if it still fails, that is the
minimal case reported, so a corner never takes credit for a bug it does not need.

A shard of a sharded sweep (``--shard I/N``) explores its own part of the seed space: it makes
the plan of one run with N times the examples, takes the cases ``j`` of that plan (numbered
across its phases) with ``j mod N == I`` (:func:`harness.shard.explore_share`), and draws them
with its own hypothesis seed (:func:`harness.shard.explore_seed`: SHA-256 of the seed and the
shard). So N shards together run the phases and corner counts of one run of ``N x examples``,
each with a different random stream; they do not draw the very cases that one run would (a
hypothesis run cannot be split without drawing all of it), and two shards may, rarely, draw
the same case. Input tensors still use the run's ``--seed``, so every replay command holds.

Settings profiles (``attn-quick``, ``attn-nightly``, ``attn-exhaustive``) are registered with
hypothesis: no deadline (kernels compile on first use), an explicit seed (``--seed``) so a run
is reproducible (the draws depend on the seed alone, not on the modules the process has
loaded: :func:`seed_only_draws`), and the example database in the run's folder
(``RUN/.hypothesis/``) locally, none in CI (``CI`` set), where runs must depend on the seed
alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Unsatisfiable

try:  # hypothesis 6.131 and later reads constants from local modules (seed_only_draws)
    from hypothesis.internal.conjecture import providers as _providers
    from hypothesis.internal.constants_ast import Constants as _Constants
except ImportError:  # pragma: no cover - a hypothesis without them
    _providers = _Constants = None

from harness.backends.base import Capabilities
from harness.case import Case
from harness.escape import one_line
from harness.options import get_profile
from harness.results.records import FAILING, Record, replay_command
from harness.run.strategies import BUDGETS, cases, corners_for, outside_corner, undrawable
from harness.shard import Shard, explore_seed, explore_share

DATABASE_DIR = Path(".hypothesis") / "attn-harness"


class CaseFailed(AssertionError):
    """Raised inside the hypothesis test when a case fails; carries its records."""

    def __init__(self, case: Case, records: list[Record]) -> None:
        self.case = case
        self.records = records
        failing = [r for r in records if r.status in FAILING]
        super().__init__("; ".join(f"{r.check} {r.status}: {r.reason}" for r in failing)[:2000])


@dataclass
class Exploration:
    """What an exploration found.

    Attributes:
        backend: the backend spec explored.
        examples: distinct cases run in the generate phase (before any failure).
        records: records of those cases, and of the minimal failing case.
        minimal: the smallest failing case found, or None.
        failing: the minimal case's failing records.
        seconds_to_first_failure: wall time from the start to the first failing case.
        shrink_steps: cases run while shrinking.
        regression: the TOML file the minimal case was written to.
        seconds: total wall time.
        phases: the ``(corner, cases)`` plan it followed (:func:`plan`).
        unreachable: corners of the plan no case of which the backend's claims and the budget
            allow.
        shard: ``I/N`` when this was a shard's part of a sharded exploration.
        skipped: why nothing was explored ('' when it was): the backend's claims leave no case
            to draw (:func:`harness.run.strategies.undrawable`).
        budget_s: the time budget of the free draws, seconds (None: none).
        budget_spent: whether the budget ended the free draws: drawn cases were left unjudged.
        free_judged: free draws judged.
    """

    backend: str
    examples: int = 0
    records: list[Record] = field(default_factory=list)
    minimal: Case | None = None
    failing: list[Record] = field(default_factory=list)
    seconds_to_first_failure: float | None = None
    shrink_steps: int = 0
    regression: Path | None = None
    seconds: float = 0.0
    phases: list[tuple[str | None, int]] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    shard: str = ""
    skipped: str = ""
    budget_s: float | None = None
    budget_spent: bool = False
    free_judged: int = 0

    @property
    def planned(self) -> int:
        """Cases the plan asked for (the sum of ``phases``)."""
        return sum(n for _, n in self.phases)

    @property
    def free_planned(self) -> int:
        """Free draws the plan asked for."""
        return sum(n for corner, n in self.phases if corner is None)


def settings_for(profile: str, examples: int | None = None, database_dir: Path | None = None):
    """The hypothesis settings of a profile (registered as ``attn-<profile>``); the example
    database in ``database_dir`` (a run's own ``.hypothesis/``; default :data:`DATABASE_DIR`),
    none in CI."""
    count = get_profile(profile).explore_examples if examples is None else examples
    database = None if os.environ.get("CI") else DirectoryBasedExampleDatabase(
        str(database_dir or DATABASE_DIR))
    return settings(
        max_examples=max(1, count), deadline=None, database=database, print_blob=False,
        report_multiple_bugs=False,
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )


@contextlib.contextmanager
def seed_only_draws() -> Iterator[None]:
    """Draws that depend on the seed and the strategies alone.

    Hypothesis (6.131 and later) mixes into its draws constants it reads from the "local"
    modules loaded in the process: those outside site-packages, such as an editable install
    of this harness or a user's kernel file. So the same ``--seed`` drew other cases in a clone
    than from the wheel, and other cases once a user's module was imported. Inside this
    context that pool is empty (hypothesis's own edge values stay), and the constants hypothesis
    cached from it are dropped on the way in and out. A hypothesis without these internals is
    left as it is.
    """
    providers = _providers
    cache = getattr(getattr(providers, "CONSTANTS_CACHE", None), "cache", None)
    local = getattr(providers, "_get_local_constants", None)
    if local is None or cache is None or _Constants is None:  # pragma: no cover - other internals
        yield
        return
    empty = _Constants()
    cache.clear()
    providers._get_local_constants = lambda: empty
    try:
        yield
    finally:
        providers._get_local_constants = local
        cache.clear()


def register_profiles() -> None:
    for name in BUDGETS:
        settings.register_profile(f"attn-{name}", settings_for(name))


#: Share of the examples given to the corners (at least one case each, at most half of all).
CORNER_SHARE = 0.2
#: Free draws kept whatever the number of corners: with issue 26's corners (13 in all) the
#: quick profile's 20 cases visit every corner once and keep 7 free draws.
MIN_FREE = 7


def plan(corners: list[str], examples: int, seed: int = 0) -> list[tuple[str | None, int]]:
    """The phases of an exploration: ``(corner, cases)`` pairs, free draws (corner None) first.

    The corners get :data:`CORNER_SHARE` of ``examples``, spread evenly, at least one case each
    while they fit in half the examples, or in all but :data:`MIN_FREE` of them when that is
    more (the quick profile's 20 hold 13 corners); when fewer fit, the seed chooses which
    (rotating the list), so runs with other seeds visit the others.
    """
    if examples <= 1 or not corners:
        return [(None, max(1, examples))]
    fit = min(len(corners), max(examples // 2, examples - MIN_FREE))
    shift = seed % len(corners)
    chosen = (corners[shift:] + corners[:shift])[:fit]
    share = max(len(chosen), min(examples // 2, round(CORNER_SHARE * examples)))
    counts = [share // len(chosen) + (i < share % len(chosen)) for i in range(len(chosen))]
    return [(None, examples - share)] + list(zip(chosen, counts, strict=True))


def explore(backend: str, capabilities: Capabilities, run_case: Callable[[Case], list[Record]], *,
            profile: str = "quick", examples: int | None = None, seed: int = 0,
            on_record: Callable[[Record], None] | None = None, backward: bool = True,
            regressions: Path | None = None, shard: Shard | None = None,
            database_dir: Path | None = None, budget_s: float | None = None,
            on_case: Callable[[str, Case, list[Record], int], None] | None = None
            ) -> Exploration:
    """Search for a failing case of ``backend`` (see the module docstring).

    Args:
        backend: backend spec (for messages and regression files).
        capabilities: what the backend claims; only such cases are drawn.
        run_case: runs one case through the checks, returns its records.
        profile: quick, nightly or exhaustive (example count and cost budget).
        examples: override the profile's example count.
        seed: hypothesis seed; the same seed draws the same cases.
        on_record: called with every record of the generate phase and of the minimal case.
        backward: whether the backward is judged (bwd among the checks): only then is the
            strided-dout corner explored.
        regressions: where to write the minimal failing case (None: do not write).
        shard: this run's share of a sharded sweep: explore its part of the plan for
            ``N x examples`` with its own seed (see the module docstring).
        database_dir: hypothesis's example database (the run's ``.hypothesis/``).
        budget_s: stop judging new free draws once this much wall time has passed, seconds
            (``--explore-budget``; None: judge every planned case). The corners,
            where shipped bugs lived, are visited whatever the time; a case begun is finished
            and a failure is shrunk; the cases are drawn in the same order, so a budget only
            cuts the free draws short.
        on_case: called with ``(phase, case, records, step)`` as each case is judged: phase
            ``generate`` (step: the case's number) or ``shrink`` (step: the shrinking step), so
            a front end can print progress as it happens.
    """
    result = Exploration(backend=backend)
    result.skipped = undrawable(capabilities)
    if result.skipped:
        return result
    start = time.perf_counter()
    state: dict = {"failed": False, "error": None}
    budget = BUDGETS[profile]
    count = get_profile(profile).explore_examples if examples is None else examples
    corners = corners_for(capabilities, budget, backward)
    #: phases whose first draw (the strategy's simplest case, the same for every seed) another
    #: shard runs: this one draws another case in its place
    not_first: set[int] = set()
    if shard is None:
        result.phases = plan(corners, count, seed)
    else:
        mine = [p for p in explore_share(plan(corners, count * shard.count, seed), shard) if p[1]]
        result.phases = [(c, n) for c, n, _ in mine]
        not_first = {p for p, (_, _, first) in enumerate(mine) if not first}
        result.shard = str(shard)
    result.budget_s = budget_s
    draw_seed = explore_seed(seed, shard)

    def out_of_time() -> bool:
        return budget_s is not None and time.perf_counter() - start >= budget_s

    emitted: set[tuple[str, str]] = set()

    def emit(record: Record) -> None:
        key = (record.case_id, record.check)
        if key in emitted:  # hypothesis may draw a case twice: record it once
            return
        emitted.add(key)
        result.records.append(record)
        if on_record:
            on_record(record)

    seen: set[str] = set()

    def phase(corner: str | None, n: int, skip_first: bool = False) -> None:
        calls = [0]

        @hypothesis_seed(draw_seed)
        @settings_for(profile, n, database_dir)
        @given(cases(capabilities, budget, backward=False, corner=corner))
        def body(case: Case) -> None:
            if state.get("error") is not None:
                return  # the harness itself broke: stop judging, re-raised below
            if corner is None and not state["failed"] and out_of_time():
                result.budget_spent = True
                return  # the budget is spent: the rest of the free draws are not judged
            calls[0] += 1
            if not state["failed"]:
                if skip_first and calls[0] == 1:  # another shard runs this phase's first case
                    seen.add(case.case_id)
                    reject()
                if case.case_id in seen:  # a repeat teaches nothing: ask for another
                    reject()
                seen.add(case.case_id)
            try:
                records = run_case(case)
            except Exception as exc:  # noqa: BLE001 - not a kernel failure: must not be shrunk
                state["error"] = exc
                return
            if state["failed"]:
                result.shrink_steps += 1
                if on_case:
                    on_case("shrink", case, records, result.shrink_steps)
            else:
                result.examples += 1
                for record in records:
                    emit(record)
                if on_case:
                    on_case("generate", case, records, result.examples)
            if any(r.status in FAILING for r in records):
                if not state["failed"]:
                    state["failed"] = True
                    result.seconds_to_first_failure = time.perf_counter() - start
                raise CaseFailed(case, records)

        with seed_only_draws():
            body()

    try:
        for number, (corner, n) in enumerate(result.phases):
            before = result.examples
            try:
                phase(corner, n, number in not_first)
            except Unsatisfiable:
                if corner is None:
                    raise
                # e.g. head dims that are multiples of 32 cannot make 65,536 tiny problems fit
                # the budget: the corner is out of this backend's reach, not a failure.
                result.unreachable.append(corner)
            except CaseFailed as exc:
                case, records = exc.case, exc.records
                twin = outside_corner(case, corner) if corner else None
                if twin is not None and state.get("error") is None:
                    try:
                        twin_records = run_case(twin)
                    except Exception as error:  # noqa: BLE001 - re-raised below
                        state["error"], twin_records = error, []
                    result.shrink_steps += 1
                    if on_case and twin_records:
                        on_case("shrink", twin, twin_records, result.shrink_steps)
                    if any(r.status in FAILING for r in twin_records):
                        case, records = twin, twin_records
                raise CaseFailed(case, records) from None
            finally:
                if corner is None:
                    result.free_judged += result.examples - before
            if state.get("error") is not None:
                break
    except CaseFailed as exc:
        result.minimal = exc.case
        result.failing = [r for r in exc.records if r.status in FAILING]
        for record in exc.records:
            emit(record)
        if regressions is not None:
            result.regression = write_regression(regressions, backend, exc.case, result.failing)
    result.seconds = time.perf_counter() - start
    if state.get("error") is not None:
        raise state["error"]
    return result


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "backend"


def _describe_backend(backend: dict[str, str]) -> str:
    return (f" ({backend.get('family')}, {backend.get('flavor') or 'no flavor'}, version "
            f"{backend.get('version') or 'unknown'})")


def _comment(text: str) -> str:
    """A TOML comment line: whatever the text holds (a kernel's flavor or message may hold
    newlines, a ``[[case]]`` or control characters), it stays one comment of printable
    characters (:func:`harness.escape.one_line`)."""
    return "# " + one_line(text)


def write_regression(directory: Path, backend: str, case: Case, failing: list[Record]) -> Path:
    """Write a minimal failing case as a suite file; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{_slug(backend)}-{case.case_id}.toml"
    first = failing[0] if failing else None
    target = first.target if first else {}
    lines = [
        _comment("Minimal failing case found by attn-harness exploration (hypothesis "
                 "shrinking)."),
        _comment(f"backend: {backend}" + (_describe_backend(first.backend) if first else "")),
        _comment(f"target: {target.get('target_id', '?')} ({target.get('device_name', '?')}, "
                 f"torch {target.get('torch', '?')})"),
    ]
    for record in failing:
        reason = " ".join(record.reason.split())
        lines.append(_comment(f"failed: {record.check} {record.status}: {reason[:400]}"))
    if first:
        lines.append(_comment(f"replay: {replay_command(first)}"))
    named = case.replace(name=case.name or f"regression {backend}")
    text = "\n".join(lines) + "\n\n" + named.to_toml()
    path.write_text(text, encoding="utf-8")
    return path


def budget_note(result: Exploration) -> str:
    """``; the 20 s budget of free draws was spent after 3 of 7 ...``, or '' when it was
    not."""
    if not result.budget_spent:
        return ""
    return (f"; the {result.budget_s:g} s budget of free draws (--explore-budget) was spent "
            f"after {result.free_judged} of {result.free_planned} (the corners were all "
            "visited)")


def summary(result: Exploration) -> str:
    """One paragraph for the terminal."""
    if result.skipped:
        return f"not explored {result.backend}: {result.skipped}"
    distinct = len({r.case_id for r in result.records})
    unreachable = (f" (no case of the {', '.join(result.unreachable)} corner(s) fits the "
                   f"backend's claims and the budget)" if result.unreachable else "")
    part = f" (shard {result.shard}'s part)" if result.shard else ""
    if result.minimal is None:
        return (f"explored {result.examples} generated case(s) ({distinct} distinct){part} on "
                f"{result.backend} in {result.seconds:.1f}s: no failure{unreachable}"
                f"{budget_note(result)}")
    lines = [f"explored {result.backend}: case {result.examples} failed after "
             f"{result.seconds_to_first_failure:.1f}s; shrunk in {result.shrink_steps} step(s) to",
             f"  {result.minimal.label}  (case_id {result.minimal.case_id})"]
    for record in result.failing:
        lines.append(f"  {record.check} {record.status}: {one_line(record.reason[:300])}")
    if result.failing:
        lines.append(f"  replay: {replay_command(result.failing[0])}")
    if result.regression:
        lines.append(f"  written to {result.regression}")
    return "\n".join(lines)
