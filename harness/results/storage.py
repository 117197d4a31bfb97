"""Runs kept side by side, as pytest-benchmark keeps ``.benchmarks/<machine>/0001_<rev>_<date>``.

Each ``attn-harness run`` (and each pytest session of the parity suites) without ``--out`` writes
to a folder of its own under its machine's::

    reports/<target-id>/
        0001-<revision>-<YYYYMMDD-HHMMSS>/    results.jsonl, report.md, run.json, plots,
                                              regressions/ and .hypothesis/ of its exploration
        0002-<revision>-<YYYYMMDD-HHMMSS>/
        latest                                the newest run: a symlink to its folder, or where
                                              the file system has no symlinks a text file
                                              holding the folder's name

The number counts up per machine folder; the revision is the harness checkout's (12 hex digits,
``-dirty`` with uncommitted changes; the version where there is no checkout); the time is UTC,
when the run started. ``run.json`` says how the run was asked for (command line, backends,
suites, checks, profile, seed), so that ``compare`` can find the run before it that asked for the
same. Nothing here is ever replaced: a replay (``--case``) or a ``--suite regressions`` run is a
new run like any other. An explicit ``--out DIR`` writes exactly there instead.

``report`` and ``compare`` name runs by number (``7``), ``latest``, ``TARGET/7`` for another
machine's folder, or by path (a results file, or a folder holding ``results*.jsonl``):
:func:`resolve`. Plain functions of paths, no torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UsageError

#: Where runs are kept, relative to the current directory.
ROOT = Path("reports")
#: The pointer to a machine folder's newest run.
LATEST = "latest"
#: What a run folder is called: number, revision, start time (UTC).
RUN_NAME = re.compile(r"^(?P<number>\d{4,})-(?P<revision>.+)-(?P<stamp>\d{8}-\d{6})$")
#: Folders under :data:`ROOT` that are not a machine's runs.
NOT_MACHINES = ("samples",)


@dataclass(frozen=True)
class Run:
    """One kept run: its number in its machine folder and its folder."""

    number: int
    path: Path

    @property
    def stamp(self) -> str:
        match = RUN_NAME.match(self.path.name)
        return match.group("stamp") if match else ""

    @property
    def revision(self) -> str:
        match = RUN_NAME.match(self.path.name)
        return match.group("revision") if match else ""

    def meta(self) -> dict[str, Any]:
        """``run.json`` (empty when missing or unreadable)."""
        try:
            return json.loads((self.path / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def results(self) -> list[Path]:
        return results_files(self.path)

    def describe(self) -> str:
        return f"run {self.number} ({self.path})"


def stamp(seconds: float | None = None) -> str:
    """``YYYYMMDD-HHMMSS`` in UTC (now, or at ``seconds`` since the epoch)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(seconds))


def revision_slug(revision: str, version: str = "") -> str:
    """The revision part of a run folder's name: the checkout's revision, else ``v<version>``."""
    text = revision.strip() or (f"v{version}" if version else "norev")
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text)[:24]


def results_files(directory: Path) -> list[Path]:
    """The results files of a run folder: ``results.jsonl``, or the pytest workers'
    ``results-<worker>.jsonl``."""
    return sorted(p for p in directory.glob("results*.jsonl") if p.is_file())


def machine_dir(target_id: str, root: Path = ROOT) -> Path:
    return root / target_id


def runs(directory: Path) -> list[Run]:
    """The numbered runs of a machine folder, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = RUN_NAME.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append(Run(int(match.group("number")), path))
    return sorted(found, key=lambda r: (r.number, r.path.name))


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold ``directory/.lock`` (where ``fcntl`` exists), so two runs starting at once do not
    take one number."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:  # pragma: no cover - not on Linux
        yield
        return
    with open(directory / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def new_run(directory: Path, revision: str, *, started: str | None = None,
            meta: dict[str, Any] | None = None, join: bool = False) -> Run:
    """Make the next numbered run folder in ``directory`` and point ``latest`` at it.

    Args:
        directory: the machine folder (``reports/<target-id>``), made when missing.
        revision: :func:`revision_slug`'s text.
        started: the start time, :func:`stamp` (default: now).
        meta: written to the run's ``run.json`` (with its number and start time).
        join: a run of this revision and start time that exists already is joined instead
            (the pytest-xdist workers of one session share one run).
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{directory}: cannot create it ({exc.strerror}); run from a writable "
                         "folder or give --out DIR") from None
    started = started or stamp()
    with _locked(directory):
        existing = runs(directory)
        if join:
            for run in existing:
                if run.stamp == started and run.revision == revision:
                    return run
        number = (existing[-1].number if existing else 0) + 1
        while True:
            path = directory / f"{number:04d}-{revision}-{started}"
            try:
                path.mkdir()
                break
            except FileExistsError:
                number += 1
        run = Run(number, path)
        info = {"number": number, "started_utc": started, "revision": revision, **(meta or {})}
        (path / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
        set_latest(directory, run)
    return run


def set_latest(directory: Path, run: Run) -> str:
    """Point ``directory/latest`` at ``run``: a relative symlink, replaced atomically; where
    symlinks cannot be made, a text file with the folder's name. Returns which it made."""
    link = directory / LATEST
    temp = directory / f".{LATEST}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    try:
        temp.symlink_to(run.path.name, target_is_directory=True)
        os.replace(temp, link)
        return "symlink"
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()
    if link.is_symlink() or link.is_dir():
        with contextlib.suppress(OSError):
            link.unlink()
    link.write_text(run.path.name + "\n", encoding="utf-8")
    return "file"


def latest(directory: Path) -> Run | None:
    """The run ``latest`` points at, else the highest-numbered one, else None."""
    link = directory / LATEST
    name = ""
    if link.is_symlink():
        name = os.readlink(link)
    elif link.is_file():
        name = link.read_text(encoding="utf-8").strip()
    kept = runs(directory)
    for run in kept:
        if run.path.name == Path(name).name:
            return run
    return kept[-1] if kept else None


def machine_dirs(root: Path = ROOT) -> list[Path]:
    """The machine folders under ``root`` that hold numbered runs."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name not in NOT_MACHINES and runs(p))


def default_machine(root: Path = ROOT) -> tuple[Path, str]:
    """The machine folder that runs named by number belong to, and a note when there was a
    choice: the only one under ``root``, else the one whose latest run started last."""
    dirs = machine_dirs(root)
    if not dirs:
        raise UsageError(f"no runs under {root}/ yet: attn-harness run keeps each run there "
                         "(or give results files)")
    if len(dirs) == 1:
        return dirs[0], ""
    newest = max(dirs, key=lambda d: (latest(d).stamp if latest(d) else "", d.name))
    return newest, (f"runs of {len(dirs)} machines under {root}/: using {newest.name}'s, whose "
                    "latest run is the newest (name another's as TARGET/N)")


def find_run(directory: Path, ref: str) -> Run:
    """Run ``ref`` (a number or ``latest``) of a machine folder; a usage error naming the runs
    there when it has none such."""
    kept = runs(directory)
    if ref == LATEST:
        run = latest(directory)
        if run is None:
            raise UsageError(f"{directory}: no runs yet")
        return run
    number = int(ref)
    for run in kept:
        if run.number == number:
            return run
    have = f"runs {kept[0].number}-{kept[-1].number}" if kept else "no runs"
    raise UsageError(f"run {ref}: no such run in {directory} ({have}; see its folders)")


def _is_run_ref(ref: str) -> bool:
    return ref == LATEST or ref.isdigit()


def resolve_run(ref: str | None, root: Path = ROOT) -> tuple[Run | None, list[Path], str]:
    """What one RUN argument names: ``(run or None, results files, note)``.

    ``None`` or ``latest``: the latest run; ``7``: run 7 of the machine folder
    (:func:`default_machine`); ``TARGET/7`` or ``TARGET/latest``: of ``root/TARGET``; an
    existing folder: its ``results*.jsonl`` (a machine folder: its latest run); anything else
    is a results file, passed on as given (reading it reports what is wrong with it).
    """
    ref = LATEST if ref is None else ref
    path = Path(ref)
    if _is_run_ref(ref) and not path.exists():
        directory, note = default_machine(root)
        run = find_run(directory, ref)
        return run, _require_results(run), note
    parts = ref.split("/")
    if not path.exists() and len(parts) == 2 and _is_run_ref(parts[1]) \
            and (root / parts[0]).is_dir():
        run = find_run(root / parts[0], parts[1])
        return run, _require_results(run), ""
    if path.is_dir():
        files = results_files(path)
        if files:
            match = RUN_NAME.match(path.resolve().name)
            run = Run(int(match.group("number")), path) if match else None
            return run, files, ""
        run = latest(path) if runs(path) else None
        if run is not None:
            return run, _require_results(run), ""
        raise UsageError(f"{ref}: a folder without results*.jsonl or numbered runs")
    return None, [path], ""


def _require_results(run: Run) -> list[Path]:
    files = run.results()
    if not files:
        raise UsageError(f"{run.describe()}: no results file (the run wrote nothing yet, or "
                         "was stopped before its first record)")
    return files


def resolve_many(refs: Sequence[str] | None, root: Path = ROOT) -> tuple[list[Run | None],
                                                                         list[Path], list[str]]:
    """:func:`resolve_run` over several arguments (none: the latest run)."""
    found: list[Run | None] = []
    files: list[Path] = []
    notes: list[str] = []
    for ref in (list(refs) if refs else [None]):
        run, more, note = resolve_run(ref, root)
        found.append(run)
        files.extend(more)
        if note and note not in notes:
            notes.append(note)
    return found, files, notes


def previous(run: Run) -> tuple[Run, str]:
    """The run to compare ``run`` with: the latest earlier run of the same machine folder that
    asked for the same (``run.json``'s ``selection``) and has results, else the one right
    before it that has results; and why it was chosen."""
    directory = run.path.parent
    earlier = [r for r in runs(directory) if r.number < run.number and r.results()]
    if not earlier:
        raise UsageError(f"{run.describe()}: no earlier run with results in {directory} to "
                         "compare with; give --baseline RUN")
    mine = run.meta().get("selection")
    if mine is not None:
        for other in reversed(earlier):
            if other.meta().get("selection") == mine:
                return other, "the latest earlier run of the same selection"
    return earlier[-1], ("the run before it (no earlier run asked for the same backends, "
                         "suites, cases, checks, profile and seed)")
