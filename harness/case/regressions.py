"""Promoting a regression on purpose: exploration writes each minimal failing case into its run's
folder (``reports/<target-id>/NNNN-.../regressions/``); :func:`promote` copies the ones a user
chooses into the project's ``cases/regressions/``, which ``--suite regressions`` runs."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from harness.case.suites import load_file, project_dir
from harness.errors import UsageError


def default_dir() -> Path:
    """The project's regressions folder: ``./cases/regressions`` (``--cases-dir``'s when set)."""
    return project_dir() / "regressions"


def promote(files: Iterable[Path], into: Path | None = None) -> list[tuple[Path, str]]:
    """Copy regression files into ``into`` (default :func:`default_dir`).

    Each file must be a valid case file (read as a suite: a usage error naming the file, the
    table and the field otherwise). A file of the same name already there is left alone when
    it is the same and refused when it differs.

    Returns:
        ``(destination, what happened)`` per file: ``promoted`` or ``already there``.
    """
    into = into or default_dir()
    files = list(files)
    if not files:
        raise UsageError("promote: no regression files given (they are in a run's "
                         "regressions/ folder)")
    for path in files:
        if not path.is_file():
            raise UsageError(f"promote {path}: no such file")
        load_file(path)  # InvalidCase: file, table and field
    try:
        into.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"promote --to {into}: cannot create it ({exc.strerror})") from None
    done = []
    for path in files:
        target = into / path.name
        if target.exists():
            if target.read_bytes() == path.read_bytes():
                done.append((target, "already there"))
                continue
            raise UsageError(f"promote {path}: {target} exists and differs; remove it or give "
                             "--to DIR")
        shutil.copyfile(path, target)
        done.append((target, "promoted"))
    return done
