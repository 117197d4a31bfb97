"""An output folder's guards: one run at a time, and nothing written through a link.

Two runs writing one ``results.jsonl`` interleave their lines and leave a file that ``report``
and ``--resume`` refuse, so a run holds ``<out>/.attn-harness.lock`` while it writes there: an
advisory lock (``fcntl.flock``) on that file, with the holder's pid and command line inside for
the message a second run gets. The operating system releases the lock when the holder's process
ends, however it ends (``kill -9`` included), so a lock file left behind by a dead run blocks
nothing: the next run takes the lock and writes its own pid.

The files the harness writes into ``--out`` (``results.jsonl``, ``report.md``, ``jury.jsonl``)
must be files there, not symlinks: a link made beforehand (by mistake, or by someone who may
write into the folder but not into the file it points at) would have the run overwrite a file
outside ``--out``. Such a link is refused in one line, as the jury refuses a linked ``jury/``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from harness.errors import UsageError

try:  # Unix; elsewhere runs are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".attn-harness.lock"
#: The files a run writes into its output folder (the plugin also ``results-<worker>.jsonl``).
WRITTEN = ("results.jsonl", "report.md", "jury.jsonl")


class OutLock:
    """The lock on an output folder, held until :meth:`release` or the end of the process."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> OutLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock(out_dir: str | Path, what: str = "--out") -> OutLock:
    """Take ``out_dir``'s lock, or say in one line which process holds it.

    Raises:
        UsageError: another live process holds the lock, or the lock file cannot be opened (a
            symlink, a directory, no permission).
    """
    path = Path(out_dir) / LOCK_NAME
    if fcntl is None:  # pragma: no cover - Windows
        return OutLock(path, None)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        why = "it is a symlink" if path.is_symlink() else exc.strerror
        raise UsageError(f"{what} {out_dir}: cannot open its lock file {path} ({why}); remove "
                         "it or give another directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(fd)
        os.close(fd)
        raise UsageError(f"{what} {out_dir} is in use by {holder}; wait for it to finish or "
                         f"give another {what}") from None
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    text = f"{os.getpid()}\n{' '.join(command.split())[:300]}\n".encode("utf-8", "replace")
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
    return OutLock(path, fd)


def _holder(fd: int) -> str:
    """``process PID (COMMAND)`` from the lock file; the holder may not have written it yet."""
    for _ in range(20):
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        except OSError:
            break
        pid, _, command = text.partition("\n")
        if pid.strip().isdigit():
            command = " ".join(command.split())
            return f"process {pid.strip()}" + (f" ({command})" if command else "")
        time.sleep(0.05)
    return "another process"


def refuse_link(path: str | Path, what: str = "--out") -> None:
    """Refuse to write ``path`` when it is a symlink (it would write wherever the link points).

    Raises:
        UsageError: ``path`` is a symlink.
    """
    path = Path(path)
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise UsageError(f"{path} is a symlink (to {target}); attn-harness writes only inside "
                         f"{what}: remove the link or give another {what}")


def refuse_links(out_dir: str | Path, names: tuple[str, ...] = WRITTEN,
                 what: str = "--out") -> None:
    """:func:`refuse_link` for each of the files a run writes into ``out_dir``."""
    for name in names:
        refuse_link(Path(out_dir) / name, what)


def open_for_writing(path: str | Path, mode: str = "w"):
    """``open(path, mode)`` for text that refuses a symlink at the moment of opening as well
    (``O_NOFOLLOW``), so a link made after :func:`refuse_links` is not followed either."""
    flags = {"w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
             "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND}[mode]
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                     0o644)
    except OSError:
        refuse_link(path)
        raise
    return os.fdopen(fd, mode, encoding="utf-8")
