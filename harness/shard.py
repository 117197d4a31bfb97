"""Shards: one sweep split over machines, each machine taking a deterministic share of the tasks.

A scheduler starts the same command on N machines (a Slurm array, a Kubernetes Indexed Job, a
CI matrix); ``--shard I/N`` makes each take the I-th of N disjoint shares of the run's tasks
(case x backend), and nothing else is shared: no coordinator, no network. The shares are a
function of the run's inputs only (the cases, the backends, the checks, the profile and the
``--durations`` files), so every machine computes the same partition.

* **I/N is 0-based**: ``0/4`` .. ``3/4``, as Slurm's ``--array=0-3``, Kubernetes'
  ``JOB_COMPLETION_INDEX`` and a CI matrix ``[0, 1, 2, 3]`` count. ``auto`` reads the index and
  the count from the scheduler (:func:`shard_from_env`): Slurm's ``SLURM_ARRAY_TASK_ID`` with
  ``SLURM_ARRAY_TASK_COUNT`` (or ``SLURM_ARRAY_TASK_MIN``/``MAX``/``STEP``: an array
  ``--array=1-4`` is shards 0..3); a Kubernetes Indexed Job's ``JOB_COMPLETION_INDEX`` with the
  count from ``auto/N`` or :data:`COUNT_ENV` (Kubernetes does not tell a pod the completions).
* **Balanced shares** (:func:`partition`): tasks are packed longest first onto the least-loaded
  shard, as FlashInfer's test-sharding planner packs JUnit durations; ties go to the lower case
  id and the lower shard index. A task's cost is its recorded wall time from earlier results
  (:func:`recorded_seconds`: the ``seconds`` of each record, or for older files the gaps between
  consecutive record times), or else the harness's own estimate (:func:`estimate_seconds`: FLOPs
  at a nominal rate plus the profile's timing budget; the same on every machine). The tasks of
  one case stay together when several backends run (the jury compares their outputs).
* **Exploration is shared**: shard I of N explores the I-th share of the plan of one run with N
  times the examples (:func:`explore_share`), drawing with its own seed (:func:`explore_seed`).
* **Identity**: every record carries its shard (``I/N``), the number of tasks in that share and
  the run id shared by the shards of one sweep (:func:`derive_run_id`, unless ``--run-id``);
  :func:`shard_runs` tells from records which shards of a run are present, missing or
  incomplete, for ``report`` and ``compare``.

Pure functions of values; the environment comes in as a mapping. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from harness.errors import UsageError
from harness.vocab import CHECKS

#: The shard count of ``--shard auto`` under a Kubernetes Indexed Job (set it to the Job's
#: ``completions``), or anywhere a scheduler gives only the index.
COUNT_ENV = "ATTN_HARNESS_SHARD_COUNT"
AUTO = "auto"
#: Variables ``--shard auto`` reads, in the words of its error message.
LOOKED_FOR = ("SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MIN/MAX "
              f"(Slurm arrays), JOB_COMPLETION_INDEX with auto/N or {COUNT_ENV} (Kubernetes "
              "Indexed Jobs)")
#: A run id: what ``--run-id`` accepts and records hold.
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


@dataclass(frozen=True, order=True)
class Shard:
    """The ``index``-th (0-based) of ``count`` shares of a run."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def dirname(self) -> str:
        """The folder under ``--out`` a shard writes to: ``shard-2-of-4``."""
        return f"shard-{self.index}-of-{self.count}"


@dataclass(frozen=True)
class AutoShard:
    """``--shard auto`` (count from the scheduler) or ``auto/N`` (count given)."""

    count: int | None = None

    def __str__(self) -> str:
        return AUTO if self.count is None else f"{AUTO}/{self.count}"


def _range_text(count: int) -> str:
    return f"0..{count - 1}" if count > 1 else "0"


def check_shard(index: int, count: int) -> Shard:
    """A :class:`Shard`, or ValueError saying what is wrong (the index is 0-based)."""
    if count < 1:
        raise ValueError(f"the shard count N must be >= 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"the shard index is 0-based: 0 <= I < N, so {_range_text(count)} "
                         f"for N={count}, got {index}")
    return Shard(index, count)


def parse_shard(value: str) -> Shard | AutoShard:
    """Parse ``--shard``: ``I/N`` (0-based, ``0 <= I < N``), ``auto`` or ``auto/N``.

    Raises:
        ValueError: the message says what is accepted.
    """
    text = value.strip().lower()
    if text == AUTO:
        return AutoShard()
    match = re.fullmatch(r"(auto|\d+)\s*/\s*(\d+)", text)
    if not match:
        raise ValueError("give I/N with a 0-based index, 0 <= I < N (e.g. 0/4 .. 3/4), 'auto' "
                         "(index and count from Slurm) or 'auto/N' (index from the scheduler)")
    count = int(match.group(2))
    if match.group(1) == AUTO:
        if count < 1:
            raise ValueError(f"the shard count N must be >= 1, got {count}")
        return AutoShard(count)
    return check_shard(int(match.group(1)), count)


def _int_var(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not re.fullmatch(r"\d+", raw):
        raise UsageError(f"--shard auto: {name}={raw!r} is not a non-negative integer; run under "
                         "the scheduler that sets it, or give --shard I/N (0-based)")
    return int(raw)


def shard_from_env(spec: AutoShard, env: Mapping[str, str]) -> Shard:
    """The shard a scheduler gave this process (see the module docstring).

    Raises:
        UsageError: no scheduler variable is set (the message lists the ones looked for), or
            they contradict each other or ``auto/N``.
    """
    task_id = _int_var(env, "SLURM_ARRAY_TASK_ID")
    if task_id is not None:
        return _slurm_shard(spec, env, task_id)
    job_index = _int_var(env, "JOB_COMPLETION_INDEX")
    if job_index is not None:
        count = spec.count if spec.count is not None else _int_var(env, COUNT_ENV)
        if count is None:
            raise UsageError(f"--shard auto: JOB_COMPLETION_INDEX={job_index} gives the index but "
                             "not the count: give --shard auto/N or set "
                             f"{COUNT_ENV}=N (the Job's completions)")
        return _checked(job_index, count, f"JOB_COMPLETION_INDEX={job_index}")
    raise UsageError(f"--shard {spec}: no scheduler variable is set; looked for {LOOKED_FOR}; "
                     "give --shard I/N (0-based) outside a scheduler")


def _slurm_shard(spec: AutoShard, env: Mapping[str, str], task_id: int) -> Shard:
    low, high = _int_var(env, "SLURM_ARRAY_TASK_MIN"), _int_var(env, "SLURM_ARRAY_TASK_MAX")
    step = _int_var(env, "SLURM_ARRAY_TASK_STEP") or 1
    count = _int_var(env, "SLURM_ARRAY_TASK_COUNT")
    low = 0 if low is None else low
    where = f"SLURM_ARRAY_TASK_ID={task_id}"
    if (task_id - low) % step:
        raise UsageError(f"--shard auto: {where} is not on the array's range from {low} in "
                         f"steps of {step}; submit the array as one range, e.g. --array=0-3")
    index = (task_id - low) // step
    if high is not None:
        span = (high - low) // step + 1
        if count is not None and count != span:
            raise UsageError(f"--shard auto: SLURM_ARRAY_TASK_COUNT={count} but the array spans "
                             f"{low}-{high} ({span} indices): submit it as one range without "
                             f"gaps, e.g. --array=0-{count - 1}")
        count = span
    if count is None:
        raise UsageError(f"--shard auto: {where} without SLURM_ARRAY_TASK_COUNT or "
                         "SLURM_ARRAY_TASK_MAX; give --shard auto/N")
    if spec.count is not None and spec.count != count:
        raise UsageError(f"--shard {spec}: the Slurm array has {count} tasks, not {spec.count}; "
                         "give --shard auto, or submit --array with N tasks")
    return _checked(index, count, where)


def _checked(index: int, count: int, where: str) -> Shard:
    try:
        return check_shard(index, count)
    except ValueError as exc:
        raise UsageError(f"--shard auto: {where}: {exc}") from None


def resolve_shard(spec: Shard | AutoShard | None, env: Mapping[str, str]) -> Shard | None:
    """``--shard`` as the shard to take: an explicit one as given, ``auto`` from ``env``."""
    if isinstance(spec, AutoShard):
        return shard_from_env(spec, env)
    return spec


def check_run_id(value: str) -> str:
    """A ``--run-id``: letters, digits and ``._:-``, at most 64 characters (ValueError)."""
    if not RUN_ID.match(value):
        raise ValueError("a run id is 1-64 letters, digits, '.', '_', ':' or '-', starting "
                         "with a letter or digit")
    return value


# ------------------------------------------------------------------------------ task costs

#: Forward FLOPs per second the estimate assumes for every check's arithmetic (kernel, baseline,
#: float64 reference): about what the reference reaches on a CPU core (harness.checks.plan). Only
#: ratios matter; it is fixed so that the estimate is the same on every machine.
NOMINAL_FLOPS_PER_S = 2e9
#: Seconds of fixed cost per check (inputs, plan, the record), in the estimate.
CHECK_OVERHEAD_S = 0.05
#: Timed passes of a timing check (the throughput check's forward, backward and both), each
#: warmed up and timed for the profile's budgets.
TIMED_PASSES = 3


def estimate_seconds(flops_fwd: float, check: str, *, warmup_s: float, budget_s: float) -> float:
    """The harness's own estimate of one check's wall time, the same on every machine.

    Args:
        flops_fwd: the case's forward FLOPs (``Case.flops_fwd``).
        check: the check.
        warmup_s, budget_s: the profile's throughput warm-up and budget per timed pass, seconds.
    """
    spec = CHECKS[check]
    if spec.timing:
        return CHECK_OVERHEAD_S + TIMED_PASSES * (warmup_s + budget_s)
    return CHECK_OVERHEAD_S + spec.cost * flops_fwd / NOMINAL_FLOPS_PER_S


@dataclass(frozen=True)
class Work:
    """One task (a case on a backend) to share out, with the estimate of each of its checks.

    Attributes:
        case_id: the case.
        backend: the backend spec.
        estimates: ``(check, seconds)`` for every check the task runs (:func:`estimate_seconds`).
    """

    case_id: str
    backend: str
    estimates: tuple[tuple[str, float], ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.case_id, self.backend)


def _seconds_of(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def recorded_seconds(files: Iterable[Sequence[Any]]) -> dict[tuple[str, str, str], float]:
    """``{(backend, case_id, check): seconds}`` from earlier results (``--durations``).

    Args:
        files: the records of each results file, in file order
            (:class:`~harness.results.records.Record` or anything with ``backend_name``,
            ``case_id``, ``check``, ``seconds``, ``time``).

    A record's wall time is its ``seconds`` field; a record written before that field existed
    gets the gap since the record before it in its file (``time`` has whole seconds, so this is
    coarse; a negative gap, an unreadable time or a file's first record give nothing). Where a
    check was recorded several times (several files or runs), the median counts.
    """
    seen: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for records in files:
        previous = None
        for r in records:
            at = _seconds_of(getattr(r, "time", ""))
            seconds = getattr(r, "seconds", None)
            if seconds is None and at is not None and previous is not None and at >= previous:
                seconds = at - previous
            if at is not None:
                previous = at
            if seconds is not None and seconds >= 0:
                seen[(r.backend_name, r.case_id, r.check)].append(float(seconds))
    return {key: statistics.median(values) for key, values in sorted(seen.items())}


def task_costs(work: Sequence[Work], recorded: Mapping[tuple[str, str, str], float] | None = None
               ) -> dict[tuple[str, str], float]:
    """Each task's cost in seconds: recorded seconds where earlier results have the check, else
    the estimate, scaled by how the recorded checks compare with their estimates (so that a
    machine ten times slower than the nominal rate puts new cases in the same units)."""
    recorded = recorded or {}
    known = est = 0.0
    for w in work:
        for check, seconds in w.estimates:
            got = recorded.get((w.backend, w.case_id, check))
            if got is not None:
                known += got
                est += seconds
    scale = known / est if known > 0 and est > 0 else 1.0
    out = {}
    for w in work:
        total = 0.0
        for check, seconds in w.estimates:
            got = recorded.get((w.backend, w.case_id, check))
            total += got if got is not None else seconds * scale
        out[w.key] = total
    return out


# -------------------------------------------------------------------------------- partition


def partition(costs: Mapping[tuple[str, str], float], count: int, *,
              together: bool = False) -> dict[tuple[str, str], int]:
    """``{(case_id, backend): shard index}``: longest first onto the least-loaded shard.

    Args:
        costs: each task's cost (:func:`task_costs`), keyed by ``(case_id, backend)``.
        count: the number of shards.
        together: keep the tasks of one case on one shard (several backends: the jury).

    Groups are placed in order of decreasing cost, ties by case id (then backend); each goes to
    the shard with the least cost so far, ties to the lowest index. The same costs give the same
    partition on every machine.
    """
    groups: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for key in costs:
        groups[(key[0], "") if together else key].append(key)
    order = sorted(groups, key=lambda g: (-sum(costs[k] for k in groups[g]), g))
    loads = [(0.0, i) for i in range(count)]
    heapq.heapify(loads)
    out: dict[tuple[str, str], int] = {}
    for group in order:
        load, index = heapq.heappop(loads)
        cost = 0.0
        for key in sorted(groups[group]):
            out[key] = index
            cost += costs[key]
        heapq.heappush(loads, (load + cost, index))
    return out


def shard_loads(costs: Mapping[tuple[str, str], float], shares: Mapping[tuple[str, str], int],
                count: int) -> list[float]:
    """The summed cost of each shard's share."""
    loads = [0.0] * count
    for key, index in shares.items():
        loads[index] += costs[key]
    return loads


def derive_run_id(shares: Mapping[tuple[str, str], int], settings: Mapping[str, Any]) -> str:
    """The run id shared by the shards of one sweep: ``sweep-`` and 12 hex digits of SHA-256
    over the partition (every task with its shard) and the run's settings. Every shard computes
    the same id; a shard started with other cases, backends, durations or settings gets another,
    and the report then shows both runs incomplete rather than mixing them."""
    text = json.dumps({"shares": sorted([c, b, i] for (c, b), i in shares.items()),
                       "settings": dict(settings)}, sort_keys=True, default=str)
    return "sweep-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# ------------------------------------------------------------------------------ exploration


def explore_share(phases: Sequence[tuple[str | None, int]], shard: Shard
                  ) -> list[tuple[str | None, int, bool]]:
    """This shard's part of an exploration plan made for N times the examples.

    The plan's cases are numbered 0, 1, ... across its phases in order, and case ``j`` goes to
    shard ``j mod N``: so the shards' parts add up to the plan phase by phase (each corner gets
    the cases one run with N times the examples gives it), and each shard gets the same number
    of cases, give or take one.

    Returns:
        ``(corner, cases, first)`` per phase; ``first`` says whether this shard holds the
        phase's first case. Hypothesis draws the simplest case of a strategy first whatever the
        seed, so only that shard may run it; the others draw another in its place.
    """
    def upto(end: int) -> int:  # cases j < end with j mod N == I
        return max(0, (end - shard.index + shard.count - 1) // shard.count)

    out, start = [], 0
    for corner, n in phases:
        out.append((corner, upto(start + n) - upto(start), start % shard.count == shard.index))
        start += n
    return out


def explore_seed(seed: int, shard: Shard | None) -> int:
    """The hypothesis seed of a shard's exploration: the run's seed for an unsharded run (and for
    N = 1), else 32 bits of SHA-256 over the seed and the shard, so that the shards draw from
    different streams and each shard's draws are reproducible."""
    if shard is None or shard.count == 1:
        return seed
    text = f"attn-harness explore seed {seed} shard {shard.index}/{shard.count}"
    return int(hashlib.sha256(text.encode("ascii")).hexdigest()[:8], 16)


# ---------------------------------------------------------------------- shards in the records


@dataclass(frozen=True)
class RunShards:
    """Which shards of one sharded run on one setup the records hold.

    Attributes:
        run_id: the run id.
        count: N.
        setup: the setup (machine and software) the shards ran on.
        present: the indices with at least one record.
        planned: ``(index, tasks in its share)`` as the shards recorded it.
        recorded: ``(index, distinct tasks it recorded)`` (exploration not counted).
        twice: ``(case_id, backend, indices)`` of tasks recorded by more than one shard.
    """

    run_id: str
    count: int
    setup: str
    present: tuple[int, ...]
    planned: tuple[tuple[int, int], ...] = ()
    recorded: tuple[tuple[int, int], ...] = ()
    twice: tuple[tuple[str, str, tuple[int, ...]], ...] = ()

    @property
    def missing(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.count) if i not in self.present)

    @property
    def incomplete(self) -> tuple[tuple[int, int, int], ...]:
        """``(index, tasks recorded, tasks planned)`` of shards that recorded fewer tasks than
        their share holds (stopped before the end)."""
        recorded = dict(self.recorded)
        return tuple((i, recorded.get(i, 0), n) for i, n in self.planned
                     if recorded.get(i, 0) < n)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.incomplete and not self.twice

    def line(self) -> str:
        """``shards: 4 of 4 (0,1,2,3)``, then what is missing, incomplete or doubled."""
        text = (f"shards: {len(self.present)} of {self.count} "
                f"({','.join(map(str, self.present)) or 'none'})")
        parts = []
        if self.missing:
            which = ", ".join(f"{i}/{self.count}" for i in self.missing)
            parts.append(f"missing {which}: no record (the shard did not run, failed before its "
                         "first record, or its results file was not given)")
        for i, got, planned in self.incomplete:
            parts.append(f"incomplete {i}/{self.count}: {got} of its {planned} task(s) recorded "
                         "(the shard stopped before the end)")
        if self.twice:
            parts.append(f"{len(self.twice)} task(s) recorded by more than one shard (shares "
                         "of different partitions under one run id)")
        return text + ("; " + "; ".join(parts) if parts else "")


def shard_runs(records: Iterable[Any], setup: Callable[[Any], str] | None = None
               ) -> list[RunShards]:
    """The sharded runs among ``records`` (those with a ``shard``): one per run id, shard count
    and setup (``setup(record)``, default the target id), so that two machine kinds that ran the
    same sweep are each checked for every shard."""
    setup = setup or (lambda r: r.target_id)
    groups: dict[tuple[str, int, str], dict[str, Any]] = {}
    for r in records:
        shard = getattr(r, "shard", "") or ""
        if not shard:
            continue
        index, _, count = shard.partition("/")
        g = groups.setdefault((getattr(r, "run_id", "") or "", int(count), setup(r)),
                              {"present": set(), "planned": {}, "tasks": defaultdict(set)})
        i = int(index)
        g["present"].add(i)
        planned = getattr(r, "shard_tasks", None)
        if planned is not None:
            g["planned"][i] = max(planned, g["planned"].get(i, 0))
        if getattr(r, "suite", "") != "explore":
            g["tasks"][(r.case_id, r.backend_name)].add(i)
    out = []
    for (run_id, count, where), g in sorted(groups.items()):
        recorded: dict[int, int] = defaultdict(int)
        twice = []
        for (case_id, backend), shards in sorted(g["tasks"].items()):
            for i in shards:
                recorded[i] += 1
            if len(shards) > 1:
                twice.append((case_id, backend, tuple(sorted(shards))))
        out.append(RunShards(run_id, count, where, tuple(sorted(g["present"])),
                             tuple(sorted(g["planned"].items())),
                             tuple(sorted(recorded.items())), tuple(twice)))
    return out
