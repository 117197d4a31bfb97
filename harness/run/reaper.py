"""Ending the processes kernels leave behind (Linux; elsewhere only the process group is killed).

A kernel may start processes: a compiler, a helper, a server in its own session
(``subprocess.Popen(..., start_new_session=True)``) that the worker's process group does not
reach and that keeps the harness's stdout open after the run. So every process of the harness
that starts workers, and every worker, is a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``,
Linux 3.4, ``man 2 prctl``): an orphan below it is re-parented to it rather than to init, so
the tree below a worker stays below it and is found by walking ``/proc``:

* at the end of each case, the worker ends its descendants outside its process group (those it
  keeps, such as a compiler's pool of workers, are in its group and live to the next case);
* when a worker stops, it ends every descendant;
* before a worker is killed (timeout, interrupt), the parent ends the worker's descendants;
* when a worker dies, its orphans come to the parent, which ends those that left its group and
  started after the worker did (see :func:`end_orphans`).

Processes are ended with SIGKILL and, where they are this process's children, reaped.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: ``prctl`` option: orphans below the caller are re-parented to it (linux/prctl.h).
PR_SET_CHILD_SUBREAPER = 36
#: Rounds of finding and killing descendants (a process may fork while its tree is killed).
ROUNDS = 4
#: Seconds to wait for a killed child to be reaped (one in uninterruptible sleep may never be).
REAP_S = 2.0


@dataclass(frozen=True)
class Proc:
    """One process as ``/proc/PID/stat`` describes it.

    Attributes:
        pid, ppid: the process and its parent.
        pgid, sid: its process group and session.
        start: when it started, in clock ticks since boot (field 22).
        state: ``R``, ``S``, ``Z`` (a zombie) ...
    """

    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int
    state: str


def become_subreaper() -> bool:
    """Make this process a child subreaper; whether it is one (False off Linux)."""
    if not Path("/proc/self").is_dir():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return False


def read_proc(pid: int) -> Proc | None:
    """The process ``pid``, or None when it is gone (or there is no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses
    fields = text[text.rfind(")") + 2:].split()
    try:
        return Proc(pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]),
                    fields[0])
    except (IndexError, ValueError):  # pragma: no cover - a kernel with another stat format
        return None


def processes() -> list[Proc]:
    """Every process this user can see (empty without /proc)."""
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    return [p for p in map(read_proc, pids) if p is not None]


def descendants(root: int, table: Iterable[Proc] | None = None) -> list[Proc]:
    """The processes below ``root`` (children first), zombies included."""
    children: dict[int, list[Proc]] = {}
    for proc in processes() if table is None else table:
        children.setdefault(proc.ppid, []).append(proc)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child.pid)
    return found


def end_descendants(root: int | None = None, *, outside_group: int | None = None) -> list[int]:
    """SIGKILL every live descendant of ``root`` (default: this process), or only those whose
    process group is not ``outside_group``; reap the ones that are this process's children.
    Returns the pids ended."""
    root = os.getpid() if root is None else root
    ended: list[int] = []
    for _ in range(ROUNDS):
        victims = [p for p in descendants(root)
                   if p.state not in ("Z", "X") and p.pid not in ended
                   and (outside_group is None or p.pgid != outside_group)]
        if not victims:
            break
        for proc in victims:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)
            ended.append(proc.pid)
    if ended:
        reap(p.pid for p in descendants(root) if p.ppid == os.getpid() and p.pid in ended)
    return ended


def end_orphans(since: int, spare: Iterable[int] = ()) -> list[int]:
    """End and reap the orphans a dead worker left to this (subreaper) process: its children
    outside its own process group that started at or after ``since`` (clock ticks since boot:
    the worker's start), other than ``spare`` (the live workers). Returns the pids ended."""
    if not Path("/proc/self").is_dir():
        return []
    me, group, keep = os.getpid(), os.getpgrp(), set(spare)
    adopted = [p for p in processes() if p.ppid == me and p.pgid != group
               and p.start >= since and p.pid not in keep]
    ended = []
    for proc in adopted:
        if proc.state not in ("Z", "X"):
            for below in descendants(proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(below.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)
        ended.append(proc.pid)
    reap(ended)
    return ended


def reap(pids: Iterable[int]) -> None:
    """Collect the exit status of these children of this process (zombies otherwise), waiting
    up to :data:`REAP_S` in all."""
    deadline = time.monotonic() + REAP_S
    for pid in pids:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours, or already reaped
                break
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.01)
