"""Running many cases safely: a worker process per device, records streamed as they exist.

A kernel bug can abort the process (a GPU memory fault poisons the whole context) or hang it.
The parent hands one task (a case on a backend) at a time to a worker process, which sends back a
``begin`` message before each check and the record after it. If the worker dies, the check in
flight is recorded as ``crash``; if it stays silent past the timeout, it is killed and the check
is recorded as ``timeout``. Either way the remaining checks of that case are recorded as skips
with the reason, a fresh worker starts, and the run goes on. Records are appended and flushed one
by one, so an interrupted run loses nothing and ``--resume`` picks up where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.backends import FAMILIES, load_backend
from harness.case import Case
from harness.case.known_issues import match
from harness.errors import HarnessError, UsageError
from harness.options import get_profile
from harness.results.records import Record, now
from harness.run import reaper
from harness.run.machine import detect
from harness.run.warmup import Plan, die_with_parent, lower_priority, warm
from harness.vocab import CHECK_NAMES, JUDGED

#: Seconds a fresh worker may take to import torch and probe the device.
STARTUP_TIMEOUT_S = 300.0
#: How often a waiting parent checks that its worker still lives, seconds.
LIVENESS_POLL_S = 0.25


@dataclass(frozen=True)
class Task:
    """One case on one backend: the unit handed to a worker."""

    suite: str
    case: Case
    backend: str
    checks: tuple[str, ...]
    seed: int = 0
    audit: bool = False
    profile: str = "quick"
    #: Work limit per pass in GFLOP; None = the machine's default (see dispatch.work_limit_gflop).
    max_gflop: float | None = None
    #: Time CUDA/HIP graph replays in the throughput check (see Profile.graph_replay).
    graph_replay: bool = False
    #: Where the forward check leaves sampled output rows for the jury ("" = nowhere).
    jury_dir: str = ""
    #: The sweep and the share of it this task belongs to, written into its records
    #: (``harness.shard``; empty for an unsharded run).
    run_id: str = ""
    shard: str = ""
    shard_tasks: int | None = None


@dataclass
class Outcome:
    """What a run produced: counts per status and the records written."""

    counts: dict[str, int] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    target: dict[str, Any] = field(default_factory=dict)
    #: the worker left running for the caller (``run_tasks(keep_worker=True)``), if one lived
    worker: Worker | None = field(default=None, repr=False, compare=False)

    def add(self, record: Record) -> None:
        self.counts[record.status] = self.counts.get(record.status, 0) + 1
        self.records.append(record)


# ----------------------------------------------------------------------------- worker side


def _own_process_group() -> None:
    """Make this worker the leader of a new session and process group, so the parent can kill
    it together with every process a kernel started (``os.killpg``), and watch the parent: when
    it is gone (killed), end the group at once and quietly, instead of finishing the task and
    dying of a BrokenPipeError traceback on the next send."""
    if not hasattr(os, "setsid"):  # pragma: no cover - Windows has no process groups
        return
    with contextlib.suppress(OSError):
        os.setsid()
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        _end_quietly()

    threading.Thread(target=watch, name="attn-harness-parent-watch", daemon=True).start()


def _end_quietly() -> None:
    """Leave now, without a traceback, taking the kernel's child processes along."""
    reaper.end_descendants()  # those in sessions of their own too
    if hasattr(os, "killpg") and os.getpgrp() == os.getpid():  # only a group of our own
        with contextlib.suppress(OSError):
            os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(0)


def _send(conn, message) -> None:
    """Send to the parent; if it is gone, end quietly (nobody is left to read a traceback)."""
    try:
        conn.send(message)
    except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
        _end_quietly()


def _worker_main(conn, device_index: int | None, env: dict[str, str],
                 idle: bool = False) -> None:
    """Entry point of the worker process: probe once, then serve tasks until told to stop.

    The worker is a child subreaper (:mod:`harness.run.reaper`): what its kernels start stays below
    it, and it ends what left its process group after each case, and everything when it stops.
    An ``idle`` worker (a warmer, :mod:`harness.run.warmup`) runs at idle priority from its
    first instruction, and dies with its parent even while stopped (the run stops it during
    timed checks).
    """
    if idle:
        lower_priority()
        die_with_parent()
    _own_process_group()
    reaper.become_subreaper()
    os.environ.update(env)
    try:
        _serve(conn, device_index)
    finally:
        reaper.end_descendants()


def _serve(conn, device_index: int | None) -> None:
    try:
        target = detect(device_index or 0)
        if device_index is not None and target.vendor != "cpu":
            import torch

            torch.cuda.set_device(device_index)
        _send(conn, ("ready", target.to_dict()))
    except Exception as exc:  # noqa: BLE001
        _send(conn, ("fatal", f"{type(exc).__name__}: {exc}"))
        return
    backends: dict[str, Any] = {}
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        if isinstance(task, tuple) and task[0] == "resolve":
            _send(conn, ("resolved", resolve(task[1], backends,
                                             lambda spec: _send(conn, ("loading", spec)))))
            continue
        if isinstance(task, tuple) and task[0] == "warm":  # harness.run.warmup: compile ahead
            _send(conn, ("warmed", warm(task[1], target, backends)))
            continue
        try:
            for message in execute(task, target, backends):
                _send(conn, message)
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt, SystemExit, GeneratorExit
            # raised by a kernel: it would end the process with a traceback; say what it was
            # and end quietly, as a crash (the parent starts a fresh worker)
            text = str(exc).strip().splitlines()
            _send(conn, ("ended", f"{type(exc).__name__}{': ' + text[0] if text else ''}"))
            return
        reaper.end_descendants(outside_group=os.getpgrp() if hasattr(os, "getpgrp") else None)
        _send(conn, ("done", None))


def resolve(specs: Iterable[str], backends: dict[str, Any],
            announce: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Load backends by spec: ``{spec: {"error": ...}}`` or their identity and availability.

    ``announce(spec)`` is called before each is loaded (the worker tells its parent, which then
    knows whose import hung or ended the process). Whatever loading raises is that spec's error,
    in one line: an import may raise anything, KeyboardInterrupt and SystemExit included.
    """
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if announce is not None:
            announce(spec)
        try:
            backend = backends.get(spec) or load_backend(spec)
        except HarnessError as exc:
            out[spec] = {"error": str(exc)}
            continue
        except BaseException as exc:  # noqa: BLE001 - user code at import time
            text = str(exc).strip().splitlines()
            out[spec] = {"error": f"--backend {spec}: importing {import_source(spec)} raised "
                                  f"{type(exc).__name__}{': ' + text[0] if text else ''}"}
            continue
        backends[spec] = backend
        out[spec] = {"describe": backend.describe(), "availability": backend.availability(),
                     "capabilities": backend.capabilities,
                     "compiles_per_structure": bool(getattr(backend, "compiles_per_structure",
                                                            False))}
    return out


def execute(task: Task, target, backends: dict[str, Any]):
    """Run a task in this process, yielding ``begin`` and ``record`` messages."""
    from harness.checks.plan import plan
    from harness.checks.runner import CHECK_ORDER, run_plan

    backend = backends.get(task.backend)
    if backend is None:
        backend = backends[task.backend] = load_backend(task.backend)
    yield ("backend", backend.describe())
    the_plan = plan(task.case, backend, target, task.checks, audit=task.audit,
                    max_gflop=task.max_gflop)
    order = [c for c in CHECK_ORDER if c in task.checks]
    profile = get_profile(task.profile)
    if task.graph_replay:
        profile = replace(profile, graph_replay=True)
    verdicts = run_plan(the_plan, backend, target, seed=task.seed, profile=profile,
                        jury_dir=task.jury_dir)
    for check in order:
        yield ("begin", check)
        verdict = next(verdicts)
        record = Record(
            case_id=task.case.case_id, case=task.case.to_dict(), backend=backend.describe(),
            target=target.to_dict(), check=verdict.check, status=verdict.status,
            metrics=_clean(verdict.metrics), reason=verdict.reason, suite=task.suite,
            seed=task.seed, profile=task.profile, time=now(), **_identity(task))
        known = match(task.case, backend.describe(), target, check=record.check)
        if known is not None:
            # The id tells the report which entries matched (known_issues.unmatched).
            # Its description and link travel with the record, so a report of these records
            # on another machine explains the expected failure without the entries file.
            record = replace(record, metrics={
                **record.metrics, "known_issue": known.id, "known_issue_link": known.link,
                "known_issue_description": " ".join(known.description.split())})
            record = expected_failure(record, known.label, strict=known.strict,
                                      source=known.source)
        yield ("record", record)


def _identity(task: Task) -> dict[str, Any]:
    """The sweep fields every record of ``task`` carries."""
    return {"run_id": task.run_id, "shard": task.shard, "shard_tasks": task.shard_tasks}


def expected_failure(record: Record, known: str, *, strict: bool = True,
                     source: str = "") -> Record:
    """Expected failure: fail -> xfail; when strict, a pass of a judged check -> xpass (the fix
    shows). ``source`` is where the entry is written (``file:line``), for the xpass reason."""
    if record.status in ("fail", "error"):
        return replace(record, status="xfail", reason=f"known issue {known}: {record.reason}")
    if strict and record.status == "pass" and record.check in JUDGED:
        return replace(record, status="xpass",
                       reason=f"known issue {known} did not reproduce: it may be fixed; "
                              f"update its entry in {source or 'the known-issues file'}")
    return record


def _clean(value: Any) -> Any:
    """Make metrics strict-JSON: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# ----------------------------------------------------------------------------- parent side


class WorkerDied(Exception):
    pass


def import_source(spec: str) -> str:
    """What loading the backend ``spec`` imports, for messages: its file or module."""
    if "@" in spec:
        return spec.partition("@")[2]
    path, sep, _ = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return path
    family = FAMILIES.get(spec)
    return family.default_module if family is not None else f"the module of {spec}"


#: The pids of this process's live workers (spared when orphans are ended).
_LIVE_WORKERS: set[int] = set()


class Worker:
    """A worker process and its pipe."""

    def __init__(self, device_index: int | None = None, env: dict[str, str] | None = None, *,
                 idle: bool = False) -> None:
        self.device_index, self.env = device_index, env
        # Orphans of the worker's kernels come back here when the worker dies (harness.run.reaper).
        reaper.become_subreaper()
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main,
                                   args=(child, device_index, env or {}, idle), daemon=True)
        self.process.start()
        child.close()
        _LIVE_WORKERS.add(self.process.pid)
        started = reaper.read_proc(self.process.pid)
        #: when the worker started (clock ticks since boot): its orphans started no earlier
        self.started = started.start if started else 0
        self.target: dict[str, Any] = {}
        self.backend: dict[str, str] = {}

    def resolve(self, specs: list[str], timeout_s: float = STARTUP_TIMEOUT_S) -> dict[str, Any]:
        """Ask the worker to load backends (user code is imported there, not here).

        Each may take ``timeout_s`` (the run's ``--timeout``). An import that hangs or ends the
        worker process (``os._exit``, a fault) is a UsageError naming the backend and what it
        imports; the worker is then dead or killed.
        """
        self.send(("resolve", list(specs)))
        loading = None
        while True:
            try:
                message = self.receive(timeout_s)
            except WorkerDied as exc:
                if loading is None:
                    raise
                raise UsageError(f"--backend {loading}: while importing "
                                 f"{import_source(loading)}, {exc}") from None
            if message is None:
                self.kill()
                if loading is None:
                    raise WorkerDied("the worker did not answer while loading backends")
                raise UsageError(f"--backend {loading}: importing {import_source(loading)} did "
                                 f"not finish within {timeout_s:g} s (--timeout); the worker "
                                 "was killed")
            kind, payload = message
            if kind == "loading":
                loading = payload
            elif kind == "resolved":
                return payload

    def start(self) -> dict[str, Any]:
        kind, payload = self.receive(STARTUP_TIMEOUT_S)
        if kind != "ready":
            raise WorkerDied(f"the worker could not start: {payload}")
        self.target = payload
        return payload

    def send(self, task: Task | None) -> None:
        self.conn.send(task)

    def receive(self, timeout_s: float):
        """The next message; None on timeout; WorkerDied when the process is gone.

        The process's own exit counts, not only the pipe's end: a kernel's child process that
        inherited the pipe (and the process sentinel) keeps both open after the worker died,
        which must read as a crash, not as a timeout; so the process is also asked
        (``waitpid``) every :data:`LIVENESS_POLL_S`.
        """
        deadline = time.monotonic() + timeout_s if math.isfinite(timeout_s) else math.inf
        while True:
            left = deadline - time.monotonic()
            try:
                if self.conn.poll(max(0.0, min(left, LIVENESS_POLL_S))):
                    return self.conn.recv()
            except (EOFError, OSError, ConnectionResetError) as exc:
                raise WorkerDied(self.death()) from exc
            if not self.process.is_alive():
                with contextlib.suppress(EOFError, OSError):
                    if self.conn.poll(0):  # its last words, sent before it died
                        return self.conn.recv()
                raise WorkerDied(self.death())
            if time.monotonic() >= deadline:
                return None

    def death(self) -> str:
        self.process.join(5)
        code = self.process.exitcode
        if code is None:
            return "the worker stopped answering"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"the worker process died with {name}"
        return f"the worker process exited with status {code}"

    def kill_group(self) -> None:
        """SIGKILL the worker's process group: the worker and every process a kernel started
        (they outlive the worker otherwise, holding the pipe and the device)."""
        pid = self.process.pid
        if pid is None or not hasattr(os, "killpg"):  # pragma: no cover - not started; Windows
            return
        with contextlib.suppress(OSError):  # ESRCH: the group is gone (or never was)
            os.killpg(pid, signal.SIGKILL)

    def kill(self) -> None:
        if self.process.is_alive():  # its tree first: sessions of their own included
            reaper.end_descendants(self.process.pid)
        self.kill_group()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()
        self._end_orphans()

    def stop(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.send(None)
        self.process.join(10)
        self.kill_group()  # what the kernels left behind
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()
        self._end_orphans()

    def _end_orphans(self) -> None:
        """End what the worker's kernels left that came back to this process (a subreaper)
        when the worker died."""
        _LIVE_WORKERS.discard(self.process.pid)
        if self.started:  # the worker itself is multiprocessing's to reap
            reaper.end_orphans(self.started, spare=_LIVE_WORKERS | {self.process.pid})


#: The warmers of the runs in flight (:class:`Warmers`), stopped during timed checks.
_QUIET: list[Warmers] = []
#: Checks that time the kernel: the warmers are stopped while they run.
TIMED = ("throughput",)


def _quiet(paused: bool) -> None:
    for warmers in list(_QUIET):
        warmers.pause(paused)


def _reached(task: Task) -> None:
    for warmers in list(_QUIET):
        warmers.reached(task)


class Warmers:
    """The warmer processes of a run (:mod:`harness.run.warmup`): started with :meth:`start`,
    ended with :meth:`stop` (a context manager does both)."""

    def __init__(self, plans_: Sequence[Plan]) -> None:
        self.plans = list(plans_)
        self.workers: list[Worker] = []
        #: per plan: its progress file (Plan.progress_path) and each case id's index
        self._progress: list[tuple[Plan, Path, dict[str, int]]] = []
        self._folder: tempfile.TemporaryDirectory | None = None

    def start(self) -> Warmers:
        if self.plans:
            self._folder = tempfile.TemporaryDirectory(prefix="attn-harness-warmers-")
        for number, plan in enumerate(self.plans):
            path = Path(self._folder.name) / f"progress-{number}"
            plan = replace(plan, progress_path=str(path))
            try:  # not waiting for it to start: the run goes on meanwhile
                worker = Worker(idle=True)
                worker.send(("warm", plan))
            except Exception:  # noqa: BLE001 - compiling ahead is a convenience, never a failure
                continue
            self.workers.append(worker)
            self._progress.append((plan, path, {c.case_id: i for i, c in
                                                reversed(list(enumerate(plan.cases)))}))
        if self.workers:
            _QUIET.append(self)
        return self

    def reached(self, task: Task) -> None:
        """The run starts ``task``: its warmer compiles no case from here on (it goes through
        the suite backwards, to meet the run)."""
        for plan, path, index in self._progress:
            if plan.backend == task.backend and task.case.case_id in index:
                with contextlib.suppress(OSError):  # replaced whole: never read half-written
                    fresh = path.with_suffix(".new")
                    fresh.write_text(str(index[task.case.case_id]), encoding="utf-8")
                    os.replace(fresh, path)

    def pause(self, paused: bool) -> None:
        """Stop (``SIGSTOP``) or continue every warmer's process group: a timed check runs
        with the warmers stopped. Idle priority alone did not keep them out of its way: with
        a warmer compiling, SDPA's median call on this 2-core machine took up to twice as
        long."""
        if not hasattr(signal, "SIGSTOP"):  # pragma: no cover - Windows
            return
        for worker in self.workers:
            with contextlib.suppress(OSError):
                os.killpg(worker.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> list[dict[str, Any]]:
        """End every warmer (done or not); returns the reports of those that had finished."""
        if self in _QUIET:
            _QUIET.remove(self)
        self.pause(False)
        reports = []
        for worker in self.workers:
            with contextlib.suppress(Exception):
                while (message := worker.receive(0.0)) is not None:
                    if message[0] == "warmed":
                        reports.append(message[1])
            worker.kill()
        self.workers = []
        self._progress = []
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None
        return reports

    def __enter__(self) -> Warmers:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_tasks(tasks: Iterable[Task], sink: Callable[[Record], None], *, timeout_s: float,
              progress: Callable[[Task, list[Record]], None] | None = None,
              device_index: int | None = None, env: dict[str, str] | None = None,
              first_worker: Worker | None = None, keep_worker: bool = False) -> Outcome:
    """Run tasks in worker processes, calling ``sink`` with each record as it arrives.

    ``first_worker`` (already started) is used until it is lost; fresh workers follow. With
    ``keep_worker`` the last live worker is not stopped but handed back as ``Outcome.worker``
    (the exploration goes on in it: no second start, and the kernels' compiled code is kept).
    """
    outcome = Outcome()
    worker: Worker | None = first_worker
    if worker is not None:
        outcome.target = worker.target
    try:
        for task in tasks:
            if worker is None:
                worker = Worker(device_index, env)
                outcome.target = worker.start()
            records, worker = _run_one(worker, task, timeout_s, sink, outcome)
            if progress:
                progress(task, records)
    except BaseException:
        # Interrupted (Ctrl-C reaches only this process: the worker has its own session): do
        # not wait for a kernel in flight, kill the worker's group.
        if worker is not None:
            worker.kill()
            worker = None
        raise
    if keep_worker:
        outcome.worker = worker
    elif worker is not None:
        worker.stop()
    return outcome


def _run_one(worker: Worker, task: Task, timeout_s: float, sink, outcome: Outcome):
    """Run one task; returns its records and the worker to use next (None if it was lost).

    Each record gets its wall time (``seconds``): from the task's start, or the record before
    it, to its arrival here, so a crash or a timeout counts the time it cost too."""
    records: list[Record] = []
    pending = [c for c in CHECK_NAMES if c in task.checks]
    current = pending[0] if pending else None
    mark = time.monotonic()

    def emit(record: Record) -> None:
        nonlocal mark
        arrived = time.monotonic()
        record = replace(record, seconds=round(arrived - mark, 4))
        mark = arrived
        sink(record)
        outcome.add(record)
        records.append(record)
        if record.check in pending:
            pending.remove(record.check)

    worker.backend = {"name": task.backend, "family": "", "flavor": "", "version": ""}
    _reached(task)
    try:
        worker.send(task)
    except (BrokenPipeError, ConnectionResetError, OSError):
        # The worker died between tasks (after its last record): nothing of this task ran yet,
        # so a fresh worker takes it.
        worker.kill()
        worker = Worker(worker.device_index, worker.env)
        outcome.target = worker.start()
        worker.backend = {"name": task.backend, "family": "", "flavor": "", "version": ""}
        worker.send(task)
    try:
        return _receive_task(worker, task, timeout_s, records, pending, current, emit)
    finally:
        _quiet(False)  # however the task ended


def _receive_task(worker, task, timeout_s, records, pending, current, emit):
    """The messages of a task in flight, up to its end (see :func:`_run_one`)."""
    while True:
        try:
            message = worker.receive(timeout_s)
        except WorkerDied as exc:
            _abandon(task, worker, current, pending, "crash",
                     f"{exc} during {current}; the run continued with a fresh worker", emit)
            worker.kill()
            return records, None
        if message is None:
            worker.kill()
            _abandon(task, worker, current, pending, "timeout",
                     f"{current} did not finish within {timeout_s:g} s; the worker was killed and "
                     "the run continued with a fresh worker", emit)
            return records, None
        kind, payload = message
        if kind == "backend":
            worker.backend = payload
        elif kind == "begin":
            current = payload
            if payload in TIMED:  # continued on its record, or however the task ends
                _quiet(True)
        elif kind == "record":
            if payload.check in TIMED:
                _quiet(False)
            emit(payload)
        elif kind == "ended":  # the kernel raised what ends a process (KeyboardInterrupt ...)
            _abandon(task, worker, current, pending, "crash",
                     f"the kernel raised {payload} during {current}, which ends a process; the "
                     "run continued with a fresh worker", emit)
            worker.kill()
            return records, None
        elif kind == "done":
            return records, worker


def _abandon(task: Task, worker: Worker, current, pending, status, reason, emit) -> None:
    for check in list(pending):
        if check == current:
            rec_status, rec_reason = status, reason
        else:
            rec_status, rec_reason = "skip", f"not run: {current} of this case ended in {status}"
        emit(Record(case_id=task.case.case_id, case=task.case.to_dict(), backend=worker.backend,
                    target=worker.target, check=check, status=rec_status, reason=rec_reason,
                    suite=task.suite, seed=task.seed, profile=task.profile, time=now(),
                    **_identity(task)))


def run_tasks_on_devices(tasks: Iterable[Task], sink: Callable[[Record], None], *,
                         devices: list[int], timeout_s: float,
                         progress: Callable[[Task, list[Record]], None] | None = None,
                         env: dict[str, str] | None = None,
                         first_worker: Worker | None = None) -> Outcome:
    """Run tasks on several devices at once: one worker process (and one thread feeding it) per
    device index, all drawing from one queue. ``sink`` and ``progress`` are called under one
    lock, so records reach the writer one at a time, in order of arrival.

    ``first_worker`` (started without a device index, so on device 0) serves device 0 when
    ``devices`` starts with 0 and is stopped otherwise. A lost worker is replaced on its device.
    """
    if not devices:
        raise ValueError("run_tasks_on_devices needs at least one device index")
    pending: queue.SimpleQueue[Task] = queue.SimpleQueue()
    for task in tasks:
        pending.put(task)
    lock = threading.Lock()
    outcomes = [Outcome() for _ in devices]
    errors: list[BaseException] = []
    stop = threading.Event()

    def locked_sink(record: Record) -> None:
        with lock:
            sink(record)

    def feed(slot: int, device: int, worker: Worker | None) -> None:
        outcome = outcomes[slot]
        try:
            while not stop.is_set():
                try:
                    task = pending.get_nowait()
                except queue.Empty:
                    return
                if worker is None:
                    worker = Worker(device, env)
                    outcome.target = worker.start()
                records, worker = _run_one(worker, task, timeout_s, locked_sink, outcome)
                if progress:
                    with lock:
                        progress(task, records)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
            stop.set()
            if worker is not None:
                worker.kill()
                worker = None
        finally:
            if worker is not None:
                worker.stop()

    reuse = first_worker if first_worker is not None and devices[0] == 0 else None
    if first_worker is not None and reuse is None:
        first_worker.stop()
    if reuse is not None:
        outcomes[0].target = reuse.target
    threads = [threading.Thread(target=feed, args=(slot, device, reuse if slot == 0 else None),
                                name=f"attn-harness-device-{device}", daemon=True)
               for slot, device in enumerate(devices)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    except BaseException:
        stop.set()
        raise
    if errors:
        raise errors[0]
    merged = Outcome(target=next((o.target for o in outcomes if o.target), {}))
    for outcome in outcomes:
        for record in outcome.records:
            merged.add(record)
    return merged


class ExplorationWorker:
    """Runs one case at a time for exploration, replacing the worker when a case kills it.

    ``run`` skips checks already recorded (``done``: ``(backend, case_id, check)`` keys of a
    resumed run, mapped to their records) or already run in this session (hypothesis replays the
    minimal example), and returns the case's records, those kept from before included: a
    failure recorded before an interruption is a failure of the resumed exploration too.
    """

    def __init__(self, timeout_s: float, env: dict[str, str] | None = None, *,
                 worker: Worker | None = None) -> None:
        """``worker``: a started worker to go on in (it is stopped with this one)."""
        self.timeout_s = timeout_s
        self.env = env
        self.worker: Worker | None = worker
        self.outcome = Outcome(target=worker.target if worker is not None else {})
        self.kept: dict[tuple[str, str, str], Record] = {}

    def _ensure(self) -> Worker:
        if self.worker is None:
            self.worker = Worker(None, self.env)
            self.outcome.target = self.worker.start()
        return self.worker

    def resolve(self, specs: list[str], timeout_s: float | None = None) -> dict[str, Any]:
        """Load backends in the worker, each within ``timeout_s`` (default: the run's)."""
        return self._ensure().resolve(specs, self.timeout_s if timeout_s is None else timeout_s)

    def run(self, task: Task, sink: Callable[[Record], None],
            done: Mapping[tuple[str, str, str], Record] | None = None) -> list[Record]:
        done = done or {}
        keys = {c: (task.backend, task.case.case_id, c) for c in task.checks}
        remaining = tuple(c for c in task.checks
                          if keys[c] not in done and keys[c] not in self.kept)
        old = [self.kept[keys[c]] if keys[c] in self.kept else done[keys[c]]
               for c in task.checks if keys[c] in self.kept or keys[c] in done]
        if not remaining:
            return old
        records, self.worker = _run_one(self._ensure(), replace(task, checks=remaining),
                                        self.timeout_s, sink, self.outcome)
        for record in records:
            self.kept[(task.backend, record.case_id, record.check)] = record
        return old + records

    def __enter__(self) -> ExplorationWorker:
        return self

    def __exit__(self, *exc) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None


def run_in_process(tasks: Iterable[Task], sink: Callable[[Record], None]) -> Outcome:
    """Run tasks here, without isolation (for debugging and notebooks)."""
    target = detect()
    outcome = Outcome(target=target.to_dict())
    backends: dict[str, Any] = {}
    for task in tasks:
        for kind, payload in execute(task, target, backends):
            if kind == "record":
                sink(payload)
                outcome.add(payload)
    return outcome
