"""One session for both front ends: options, backend choice, tasks, records and the report.

``attn-harness run`` and the pytest plugin translate their options into one
:class:`~harness.options.RunOptions` (:func:`validate_options`) and then share everything else here:
which backends run (:func:`choose_backends`), the one task factory (:func:`make_task`), the cases
and their deduplication (:func:`collect_cases`), where results go and whether they may be resumed
(:func:`prepare_out_dir`, :func:`resume_records`), and the report with its jury
(:func:`write_report`). :class:`PytestSession` is the plugin's state on top of the same pieces.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness import shard as sharding
from harness.backends import known_backends, spec_problem
from harness.case import Case, known_issues, suites
from harness.case.suites import iter_cases, parse_inline_case
from harness.errors import HarnessError, RecordsError, UsageError
from harness.options import RunOptions, get_profile
from harness.results import outdir, storage
from harness.results import records as recs
from harness.results.plot import write_plots
from harness.results.records import (
    Record,
    RecordWriter,
    read_many,
    read_records,
    replay_command,
    setup_fingerprint,
)
from harness.results.report import render
from harness.run.worker import ExplorationWorker, Task
from harness.vocab import CHECK_NAMES, EXPLORED, FAILING, gradients


def _unique(values: Iterable[str] | None, what: str, notes: list[str]) -> tuple[str, ...]:
    values = list(values or ())
    kept = tuple(dict.fromkeys(values))
    if len(kept) < len(values):
        repeated = sorted({v for v in values if values.count(v) > 1})
        notes.append(f"{what} {', '.join(repeated)} given more than once: run once")
    return kept


def validate_options(values: dict[str, Any], where: str = "--") -> RunOptions:
    """Check run options before anything starts (one-line HarnessErrors naming the option) and
    build :class:`RunOptions`. ``values`` maps option names (``OPTIONS``) to what was given."""
    notes: list[str] = []
    backends = _unique(values.get("backend"), "--backend", notes)
    for spec in backends:
        problem = static_backend_problem(spec, where)
        if problem:
            raise UsageError(problem)
    cases_dir = Path(values["cases-dir"]) if values.get("cases-dir") else None
    if cases_dir is not None and not cases_dir.is_dir():
        raise UsageError(f"{where}cases-dir {cases_dir}: no such directory")
    suites.set_project_dir(cases_dir)
    suite_specs = _unique(values.get("suite"), "--suite", notes)
    for spec in suite_specs:
        try:
            suites.resolve_suite(spec)
        except HarnessError as exc:
            raise UsageError(str(exc) if where == "--" else f"{where}suite: {exc}") from None
    validate_known_issues()
    checks = values.get("checks") or CHECK_NAMES
    shard, durations = _shard_options(values, where)
    return RunOptions(
        backends=backends, suites=suite_specs,
        cases_dir=cases_dir,
        max_cases=suites.MAX_CASES if values.get("max-cases") is None else values["max-cases"],
        profile=values.get("profile") or "quick", checks=tuple(checks),
        seed=int(values.get("seed") or 0), explore=values.get("explore"),
        explore_budget=values.get("explore-budget"),
        timeout_s=values.get("timeout"), max_gflop=values.get("max-gflop"),
        audit=bool(values.get("audit")),
        out=Path(values["out"]) if values.get("out") else None,
        regressions=Path(values["regressions"]) if values.get("regressions") else None,
        graph_replay=bool(values.get("graph-replay")), notes=tuple(notes),
        shard=shard, durations=durations, run_id=values.get("run-id") or "")


def _shard_options(values: dict[str, Any], where: str):
    """``--shard`` (``auto`` read from the scheduler's variables now) and ``--durations`` (every
    path must exist; a folder must hold results files)."""
    try:
        shard = sharding.resolve_shard(values.get("shard"), os.environ)
    except HarnessError as exc:
        raise UsageError(str(exc).replace("--shard", f"{where}shard", 1)) from None
    paths = [Path(p) for p in values.get("durations") or ()]
    if paths and shard is None:
        raise UsageError(f"{where}durations balances the shares of a sharded run: give "
                         f"{where}shard I/N too, or drop {where}durations")
    for path in paths:
        if not path.exists():
            raise UsageError(f"{where}durations {path}: no such file or directory; give results "
                             "files of an earlier run or folders holding them")
        if path.is_dir() and not _results_files(path):
            raise UsageError(f"{where}durations {path}: holds no results*.jsonl file; give "
                             "results files of an earlier run or folders holding them")
    return shard, tuple(paths)


def _results_files(path: Path) -> list[Path]:
    """A results file itself, or the results*.jsonl files under a folder, in name order."""
    return sorted(path.rglob("results*.jsonl")) if path.is_dir() else [path]


def validate_known_issues() -> list[Any]:
    """Read every known-issues file now, in the main process: a broken one is bad input (exit
    2 naming file, line and key), not one traceback per worker. Returns the entries."""
    return list(known_issues.validate())


def static_backend_problem(spec: str, where: str = "--") -> str:
    """What can be said about a backend spec without importing anything heavy
    (:func:`harness.backends.spec_problem`, worded for the front end's option prefix).

    Whether ``FILE.py`` defines ``FUNC`` is not among it: a file may define it any way Python
    allows (a loop over ``globals()``, ``setattr`` on its own module, ``from pkg import *``, a
    module ``__getattr__``), as kernel libraries generating their variants do, so reading the
    source can only ever say "maybe". The worker's import says, in one line naming the file and
    what it defines.
    """
    problem = spec_problem(spec)
    return problem.replace("--backend", f"{where}backend", 1) if problem else ""


# --------------------------------------------------------------------------------- backends


def choose_backends(worker, requested: Sequence[str], timeout_s: float | None = None
                    ) -> tuple[list[str], list[str], dict[str, Any]]:
    """The backends to run and the notes about the others.

    With ``requested``, exactly those (an unloadable one is a UsageError; an unavailable one
    runs, its cases recorded as skips). Without, every available backend, and a note for each
    one left out, so nothing disappears silently. Each import may take ``timeout_s`` (the run's
    ``--timeout``; default, the worker's own). Returns (specs, notes, resolved info).
    """
    specs = list(requested) or known_backends()
    resolved = worker.resolve(specs) if timeout_s is None else worker.resolve(specs, timeout_s)
    errors = [info["error"] for info in resolved.values() if "error" in info]
    if errors and requested:
        raise UsageError(errors[0])
    notes = []
    if requested:
        for spec, info in resolved.items():
            if info["availability"]:
                notes.append(f"{spec} is unavailable here ({info['availability']}): its cases "
                             "are recorded as skips")
        return specs, notes, resolved
    for spec, info in resolved.items():
        why = info.get("error") or info.get("availability")
        if why:
            notes.append(f"not run: {spec} ({why}); name it with --backend to record its "
                         "cases as skips")
    chosen = [s for s, info in resolved.items() if "error" not in info and not info["availability"]]
    if not chosen:
        raise UsageError("no backend is available here; attn-harness info says why")
    return chosen, notes, resolved


# ----------------------------------------------------------------------------- cases, tasks


def collect_cases(options: RunOptions, inline: Sequence[str] = ()) -> tuple[
        list[tuple[str, Case]], list[str]]:
    """``(suite, case)`` for every case to run, each case once, and notes on what repeated.

    Suites default to ``smoke`` unless inline cases (``--case``) are given.
    """
    explicit = [("inline", parse_inline_case(text)) for text in inline]
    suites = list(options.suites) or ([] if explicit else ["smoke"])
    out: list[tuple[str, Case]] = []
    seen: dict[str, str] = {}
    repeats = 0
    for suite, case in iter_cases(suites, options.max_cases) + explicit:
        if case.case_id in seen:
            repeats += 1
            continue
        seen[case.case_id] = suite
        out.append((suite, case))
    notes = [f"{repeats} case(s) appear more than once (same case_id in several suites or "
             "--case): each runs once"] if repeats else []
    return out, notes


def make_task(suite: str, case: Case, spec: str, options: RunOptions, *,
              checks: Sequence[str] | None = None, jury_dir: str = ""):
    """The one place a :class:`harness.run.worker.Task` is built."""
    return Task(suite=suite, case=case, backend=spec,
                checks=tuple(options.checks if checks is None else checks), seed=options.seed,
                audit=options.audit, profile=options.profile, max_gflop=options.max_gflop,
                graph_replay=options.graph_replay, jury_dir=jury_dir, run_id=options.run_id,
                shard=str(options.shard) if options.shard is not None else "",
                shard_tasks=options.shard_tasks)


# ----------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Share:
    """What :func:`take_share` decided for a sharded run.

    Attributes:
        options: the run options with the sweep's run id and this share's task count.
        keys: ``(case_id, backend)`` of the tasks in this share.
        loads: every shard's summed cost, seconds (estimated or recorded).
        notes: what to tell the user.
    """

    options: RunOptions
    keys: frozenset[tuple[str, str]]
    loads: tuple[float, ...] = ()
    notes: tuple[str, ...] = ()


def take_share(cases: Sequence[tuple[str, Case]], specs: Sequence[str],
               options: RunOptions) -> Share:
    """This run's share of ``cases`` x ``specs`` (everything when not sharded), with the run id.

    The partition is :func:`harness.shard.partition` over the costs of
    :func:`harness.shard.task_costs`: recorded seconds from ``--durations`` where they have the
    check, else the estimate. The tasks of one case stay on one shard when several backends run.
    """
    if options.shard is None:
        return Share(options, frozenset((c.case_id, s) for _, c in cases for s in specs))
    profile = get_profile(options.profile)
    work = []
    for _, case in cases:
        checks = [c for c in options.checks if case.checks is None or c in case.checks]
        estimates = tuple((c, sharding.estimate_seconds(case.flops_fwd(), c,
                                                        warmup_s=profile.warmup_s,
                                                        budget_s=profile.budget_s))
                          for c in checks)
        work.extend(sharding.Work(case.case_id, spec, estimates) for spec in specs)
    recorded = sharding.recorded_seconds(read_durations(options.durations))
    costs = sharding.task_costs(work, recorded)
    count = options.shard.count
    shares = sharding.partition(costs, count, together=len(specs) > 1)
    keys = frozenset(k for k, i in shares.items() if i == options.shard.index)
    run_id = options.run_id or sharding.derive_run_id(shares, {
        "checks": list(options.checks), "seed": options.seed, "profile": options.profile,
        "explore": options.examples, "audit": options.audit, "max_gflop": options.max_gflop,
        "graph_replay": options.graph_replay, "count": count})
    loads = tuple(sharding.shard_loads(costs, shares, count))
    basis = (f"recorded times of {len(options.durations)} --durations path(s)" if recorded
             else "the harness's cost estimate")
    note = (f"shard {options.shard} of run {run_id}: {len(keys)} of {len(shares)} task(s), "
            f"packed by {basis} (this share {loads[options.shard.index]:.3g} s of "
            f"{sum(loads):.3g} s; shares {min(loads):.3g}-{max(loads):.3g} s)")
    return Share(replace(options, run_id=run_id, shard_tasks=len(keys)), keys, loads, (note,))


def read_durations(paths: Sequence[Path]) -> list[list[Record]]:
    """The records of each ``--durations`` file (folders: their results*.jsonl), file by file."""
    return [read_records(f) for p in paths for f in _results_files(Path(p))]


def shard_out_dir(out: Path, options: RunOptions) -> Path:
    """Where a run writes: ``out``, or ``out/shard-I-of-N`` for a share of a sweep (so that the
    shards of one sweep can share ``--out`` on a shared file system)."""
    return out / options.shard.dirname if options.shard is not None else out


def explore_checks(options: RunOptions) -> tuple[str, ...]:
    """The checks exploration runs: those of the run that judge numbers."""
    return tuple(c for c in options.checks if c in EXPLORED)


def compiles_on_cpu(info: dict[str, Any], target: dict[str, Any]) -> bool:
    """Whether a resolved backend (``info``: :meth:`harness.run.worker.Worker.resolve`'s) compiles
    a graph per structure on a CPU target (:meth:`RunOptions.examples_for`)."""
    return bool(info.get("compiles_per_structure")) and target.get("vendor") == "cpu"


def not_explored_note(spec: str) -> str:
    """Why the main job does not explore ``spec``, and how to have it explored."""
    return (f"not exploring {spec}: it compiles a graph per structure, about 5 s each on a "
            "CPU, and nearly every draw is a structure of its own; the quick profile explores "
            "it only when asked (--explore profile or --explore N; the nightly profile does)")


# ------------------------------------------------------------------------------ out and resume


def prepare_out_dir(path: Path, what: str = "--out") -> Path:
    """Make ``path`` a writable directory, or say in one line why it cannot be one."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{what} {path}: {parent} is a file, not a directory; give a "
                             "directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot create it ({exc.strerror}); give a writable "
                         "directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: not writable; give a writable directory")
    return path


def open_run(options: RunOptions, target: dict[str, Any], *, resume: str | None = None,
             inline: Sequence[str] = (), started: str | None = None,
             what: str = "--out") -> Path:
    """The folder a run writes to: ``--out`` exactly when given; else a new numbered run under
    ``reports/<target-id>/`` (:mod:`harness.results.storage`), or with ``resume`` (``latest`` or
    a run number) that earlier run. ``started`` (a start stamp) joins the run of that stamp when
    it exists: the pytest-xdist workers of one session share one run."""
    if options.out is not None:
        if resume not in (None, storage.LATEST):
            raise UsageError(f"--resume {resume} names a kept run; with {what} DIR give --resume "
                             "alone (it resumes DIR)")
        return prepare_out_dir(options.out, what)
    directory = storage.machine_dir(target["target_id"])
    if resume is not None and (storage.runs(directory) or resume != storage.LATEST):
        return prepare_out_dir(storage.find_run(directory, resume).path, "--resume")
    revision = storage.revision_slug(str(target.get("git_revision") or ""),
                                     str(target.get("harness") or ""))
    run = storage.new_run(directory, revision, started=started, join=started is not None,
                          meta=run_meta(options, inline))
    return prepare_out_dir(run.path, what)


def run_meta(options: RunOptions, inline: Sequence[str] = ()) -> dict[str, Any]:
    """What ``run.json`` keeps about how a run was asked for; ``selection`` is what ``compare``
    matches to find the run before it that asked for the same."""
    return {"argv": list(sys.argv), "cwd": str(Path.cwd()),
            "selection": {"backends": list(options.backends), "suites": list(options.suites),
                          "cases": list(inline), "checks": list(options.checks),
                          "profile": options.profile, "seed": options.seed,
                          "shard": str(options.shard) if options.shard is not None else ""}}


def prepare_output_file(path: Path, what: str = "-o", inputs: Iterable[str | Path] = ()) -> Path:
    """Make the parent of an output file exist; one line when it cannot, or when the output is
    one of ``inputs`` (by the file itself, whatever the links and spellings that name it)."""
    if path.is_dir():
        raise UsageError(f"{what} {path}: is a directory; give a file name")
    for given in inputs:
        with contextlib.suppress(OSError):  # an input that does not exist is reported later
            if path.exists() and os.path.samefile(path, given):
                raise UsageError(f"{what} {path} is the input {given}: writing there would "
                                 f"replace its records; give another {what}")
    prepare_out_dir(path.parent, what=what)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path}: not writable")
    return path


#: The fields a resumed record must share with the run that resumes it.
RESUME_FIELDS = ("target", "backend version", "seed", "profile")


def resume_records(results: Path, target: dict[str, Any], options: RunOptions, *,
                   retry_crashed: bool = False) -> tuple[set[tuple[str, str, str]], list[str]]:
    """The ``(backend, case_id, check)`` keys a resumed run may keep, and notes.

    Only records of this machine (same target fingerprint), the same seed and profile and the
    same backend versions are kept; any other record makes the resume a usage error naming the
    field that differs. ``retry_crashed`` drops crash and timeout records so they run again. A
    torn last line (a run killed mid-write) is dropped, and said.
    """
    reader = getattr(recs, "read_for_resume", None)
    notes: list[str] = []
    if reader is not None:
        kept, note = reader(results)
        if note:
            notes.append(note)
    else:  # pragma: no cover - older records module
        kept = recs.read_records(results)
    mine = setup_fingerprint(target)
    done: set[tuple[str, str, str]] = set()
    for r in kept:
        differs = []
        if setup_fingerprint(r.target) != mine:
            differs.append(f"target ({r.target.get('target_id')} with other software)"
                           if r.target.get("target_id") == target.get("target_id")
                           else f"target ({r.target.get('target_id')})")
        if r.seed != options.seed:
            differs.append(f"seed ({r.seed}, this run {options.seed})")
        if r.profile != options.profile:
            differs.append(f"profile ({r.profile or 'not recorded: an older attn-harness'}, "
                           f"this run {options.profile})")
        if differs:
            raise UsageError(f"--resume {results}: its records differ from this run in "
                             f"{'; '.join(differs)}; resume with the same settings or use "
                             "another --out")
        shard = str(options.shard) if options.shard is not None else ""
        if (getattr(r, "shard", "") or "") != shard:
            raise UsageError(f"--resume {results}: its records are of shard "
                             f"{r.shard or 'none (unsharded)'}, this run is "
                             f"{shard or 'unsharded'}; resume each shard in its own folder")
        if shard and r.run_id and r.run_id != options.run_id:
            raise UsageError(f"--resume {results}: its records are of run {r.run_id}, this run "
                             f"is {options.run_id}: the cases, backends, --durations or settings "
                             "differ, so the shares would too; resume with those of the run "
                             "that wrote it, or use another --out")
        if retry_crashed and r.status in ("crash", "timeout"):
            continue
        done.add((r.backend_name, r.case_id, r.check))
    return done, notes


def check_backend_versions(records: Iterable[Record], describe: dict[str, dict[str, str]],
                           results: Path) -> None:
    """A resumed record's backend must be the very build this run loads."""
    for r in records:
        now = describe.get(r.backend_name)
        if now and (now.get("version"), now.get("flavor")) != (r.backend.get("version"),
                                                               r.backend.get("flavor")):
            raise UsageError(f"--resume {results}: {r.backend_name} was "
                             f"{r.backend.get('version')} ({r.backend.get('flavor')}) in its "
                             f"records and is {now.get('version')} ({now.get('flavor')}) now; "
                             "use another --out")


# ------------------------------------------------------------------------------------ report


def write_report(records: Sequence[Record], out_dir: Path) -> Path:
    """Render ``out_dir/report.md``: plots, the jury's findings when a jury sat, and the known
    issues that matched nothing in these records."""
    from harness.results import jury

    try:
        plots = write_plots(records, out_dir)
    except OSError as exc:
        raise RecordsError(f"cannot write the plots into {out_dir} ({exc.strerror or exc}); "
                           f"the records are kept in {out_dir}: attn-harness report renders "
                           "them again once it can write") from None
    extra = []
    jury_file = out_dir / "jury.jsonl"
    if jury_file.exists():
        extra.append(jury.section(jury.read(jury_file)))
    path = out_dir / "report.md"
    known = validate_known_issues()
    text = render(records, plots=plots, extra_sections=extra, known_issues=known or None)
    try:
        with outdir.open_for_writing(path) as out:
            out.write(text)
    except OSError as exc:  # a full disk, a vanished or read-only file system
        raise RecordsError(f"cannot write {path} ({exc.strerror or exc}); the records are kept "
                           f"in {out_dir}: attn-harness report renders them again once it can "
                           "write") from None
    return path


def deliberate(jury_dir: Path, out_dir: Path, *, keep_previous: bool = False) -> None:
    """Compare the backends' saved rows and write ``out_dir/jury.jsonl``."""
    from harness.results import jury

    verdicts = jury.deliberate(jury_dir)
    if verdicts or not keep_previous:
        jury.write(verdicts, out_dir / "jury.jsonl")


def count_statuses(records: Iterable[Record]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def failed(records: Iterable[Record]) -> bool:
    return any(r.status in FAILING for r in records)


# ----------------------------------------------------------------------------------- pytest


@dataclass
class PytestSession:
    """The plugin's state: one worker (replaced when a kernel kills it), records streamed to
    ``--attn-out`` (``results-<xdist worker>.jsonl`` under ``pytest -n``), the report at the end
    rendered from this session's files only."""

    options: RunOptions
    #: the pytest-xdist worker id (``gw0``) when this session is one, else None
    worker_id: str | None = None
    backends: list[str] = field(default_factory=list)
    capabilities: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    #: the start stamp of the run this session writes to (the controller's under pytest -n)
    started_stamp: str | None = None
    _runner: Any = None
    _writer: RecordWriter | None = None
    _out: Path | None = None
    _lock: Any = None
    _count: int = 0
    _cases: list[tuple[str, Case]] | None = None
    _share: frozenset[tuple[str, str]] | None = None
    #: each backend's resolved info and the target (the worker's), for the exploration count
    _resolved: dict[str, Any] = field(default_factory=dict)
    _target: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._runner = ExplorationWorker(self.options.timeout)
        worker = self._runner
        try:
            specs, _, resolved = choose_backends(worker, self.options.backends,
                                                 self.options.timeout)
        except Exception:
            worker.__exit__(None, None, None)
            raise
        self._resolved = resolved
        for spec in specs:
            info = resolved[spec]
            self.backends.append(spec)
            self.capabilities[spec] = info["capabilities"]
            self.unavailable[spec] = info["availability"] or ""
        target = self._target = worker.outcome.target
        try:
            # The xdist workers of one session share one run: the controller's start stamp.
            run = open_run(self.options, target, started=self.started_stamp, what="--attn-out")
            self._out = prepare_out_dir(shard_out_dir(run, self.options), "--attn-out")
            name = f"results-{self.worker_id}.jsonl" if self.worker_id else "results.jsonl"
            # xdist workers share the folder, each with a file of its own; one session owns it.
            self._lock = None if self.worker_id else outdir.lock(self._out, "--attn-out")
            outdir.refuse_links(self._out, (name, "report.md", "jury.jsonl"), "--attn-out")
            self._writer = RecordWriter(self._out / name)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            worker.__exit__(None, None, None)
            raise

    def suite_cases(self) -> list[tuple[str, Case]]:
        """Every case of the suites; under ``--attn-shard`` the share is decided here too (the
        options then carry the run id), and :meth:`in_share` says which tests keep running."""
        if self._cases is None:
            self._cases, _ = collect_cases(self.options)
            share = take_share(self._cases, self.backends, self.options)
            self.options, self._share = share.options, share.keys
            self.notes.extend(share.notes)
        return self._cases

    def in_share(self, case: Case, spec: str) -> bool:
        """Whether this session's share (``--attn-shard``) holds ``case`` on ``spec``."""
        self.suite_cases()
        return self._share is None or (case.case_id, spec) in self._share

    def _sink(self, record: Record) -> None:
        self._count += 1
        if self._writer is not None:
            self._writer.write(record)

    def run(self, suite: str, case: Case, spec: str) -> list[Record]:
        """Run one case's checks on one backend; records are streamed as they come."""
        return self._runner.run(make_task(suite, case, spec, self.options), self._sink)

    def check(self, suite_case: tuple[str, Case], spec: str) -> None:
        """Run a suite case and turn its records into the test's outcome."""
        suite, case = suite_case
        outcome(self.run(suite, case, spec), case, spec)

    def explore(self, spec: str) -> None:
        """Explore a backend; fail with the minimal case when something fails."""
        import pytest

        from harness.run.explore import explore, summary

        if self.unavailable.get(spec):
            pytest.skip(f"{spec} is unavailable: {self.unavailable[spec]}")
        checks = explore_checks(self.options)
        if not checks:
            pytest.skip("exploration needs a check that judges numbers among --attn-checks")
        if self.options.examples <= 0:
            pytest.skip("no exploration: it runs by default only without --attn-suite "
                        "(--attn-explore N or --attn-explore profile turns it on)"
                        if self.options.explore is None else "--attn-explore 0")
        examples = self.options.examples_for(
            compiles_on_cpu=compiles_on_cpu(self._resolved[spec], self._target))
        if examples <= 0:
            pytest.skip(not_explored_note(spec))

        def run_case(case: Case) -> list[Record]:
            task = make_task("explore", case, spec, self.options, checks=checks)
            return self._runner.run(task, lambda r: None)

        self.suite_cases()  # the run id of a sharded session
        result = explore(spec, self.capabilities[spec], run_case, profile=self.options.profile,
                         examples=examples, seed=self.options.seed,
                         on_record=self._sink,
                         regressions=self.options.regressions or self._out / "regressions",
                         database_dir=self._out / ".hypothesis",
                         backward=gradients(checks), shard=self.options.shard,
                         budget_s=self.options.explore_budget_s)
        text = summary(result)
        if result.skipped:
            pytest.skip(text)
        if result.minimal is not None:
            self.findings.append(text)
            pytest.fail(text, pytrace=False)

    def close(self, *, controller: bool = True) -> None:
        if self._runner is not None:
            self._runner.__exit__(None, None, None)
            self._runner = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        try:
            if controller and self._out is not None:
                self.report = report_from_files(self._out, since=self.started)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    @property
    def out(self) -> Path | None:
        """The folder this session writes its records to, once it has started."""
        return self._out

    def summary_lines(self) -> list[str]:
        lines = [f"{self._count} record(s) from backends {', '.join(self.backends)}"]
        lines.extend(self.notes)
        for finding in self.findings:
            lines.extend(finding.splitlines())
        report = getattr(self, "report", None)
        if report is not None:
            lines.append(f"report: {report}")
        return lines


def report_from_files(directory: Path, *, since: float = 0.0) -> Path | None:
    """Render ``report.md`` from the results files a session (or its xdist workers) wrote since
    ``since`` (a time.time()); older files in the directory are not merged in."""
    files = sorted(p for p in directory.glob("results*.jsonl")
                   if p.stat().st_mtime >= since - 1 and p.stat().st_size > 0)
    if not files:
        return None
    try:
        records = read_many(files)
    except RecordsError:
        return None
    return write_report(records, directory)


def outcome(records: list[Record], case: Case, spec: str) -> None:
    """pytest's verdict for a case's records: fail, skip, strict xfail, or pass."""
    import pytest

    failing = [r for r in records if r.status in FAILING]
    if failing:
        lines = [f"{spec} on {case.label} (case_id {case.case_id}):"]
        lines += [f"  {r.check} {r.status}: {r.reason}" for r in failing]
        lines += ["case:", case.to_toml().rstrip(), f"replay: {replay_command(failing[0])}"]
        pytest.fail("\n".join(lines), pytrace=False)
    expected = [r for r in records if r.status == "xfail"]
    if expected:
        pytest.xfail("; ".join(f"{r.check}: {r.reason}" for r in expected))
    if records and all(r.status == "skip" for r in records):
        reasons = dict.fromkeys(r.reason for r in records)
        pytest.skip("; ".join(reasons))

