"""Progress a user can follow: a line per judged case, and what is left.

``attn-harness run`` prints one line per suite task as it finishes (backend, case, each check's
outcome, a failure's reason on the lines below it) and one per explored case as it is judged,
shrinking steps included; each line starts with how far the phase is (``[ 3/24]``) and, for the
suite, an estimate of what is left from the mean task time of each backend. In a terminal (stderr
a TTY and ``CI`` unset) a live line at the bottom (tqdm) shows the same count and estimate while
a task runs; in CI and pipes there are only the plain lines. Text only: the runner calls
:meth:`Console.task` and :meth:`Console.explored`.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, TextIO

from harness.results.units import rate
from harness.vocab import FAILING, TIMED

SYMBOLS = {"pass": "ok", "fail": "FAIL", "skip": "skip", "xfail": "xfail", "xpass": "XPASS",
           "crash": "CRASH", "timeout": "TIMEOUT", "error": "ERROR"}
#: Characters of a failure's reason printed under its line (the report has all of it).
REASON_CHARS = 300


def live_wanted(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """A live progress line only in a terminal, and never in CI (``CI`` set)."""
    environ = os.environ if environ is None else environ
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not environ.get("CI")


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def outcome_text(records: Sequence[Any]) -> str:
    """``fwd ok | throughput 1.4 GFLOP/s``: each check's outcome, a timed check's rate."""
    parts = []
    for r in records:
        text = f"{r.check} {SYMBOLS.get(r.status, r.status)}"
        if r.check in TIMED and r.status == "pass" and r.metrics.get("tflops"):
            text = f"{r.check} {rate(r.metrics['tflops'])}"
        parts.append(text)
    return " | ".join(parts)


def reason_lines(records: Sequence[Any]) -> list[str]:
    """One indented line per failing record: its check and the start of its reason."""
    out = []
    for r in records:
        if r.status in FAILING:
            reason = " ".join((r.reason or "no reason recorded").split())
            if len(reason) > REASON_CHARS:
                reason = reason[:REASON_CHARS - 3] + "..."
            out.append(f"      {r.check} {r.status}: {reason}")
    return out


class Estimate:
    """What is left of a phase: tasks done and total per backend, and the time the rest will take
    at each backend's mean task time so far (the overall mean for a backend not yet timed)."""

    def __init__(self, totals: dict[str, int]) -> None:
        self.totals = dict(totals)
        self.done: dict[str, int] = defaultdict(int)
        self.spent: dict[str, float] = defaultdict(float)

    def add(self, backend: str, seconds: float) -> None:
        self.done[backend] += 1
        self.spent[backend] += seconds

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    @property
    def finished(self) -> int:
        return sum(self.done.values())

    def left_s(self) -> float | None:
        """Seconds the remaining tasks will take, None before any task finished."""
        finished = self.finished
        if not finished:
            return None
        overall = sum(self.spent.values()) / finished
        left = 0.0
        for backend, total in self.totals.items():
            n = self.done.get(backend, 0)
            mean = self.spent[backend] / n if n else overall
            left += max(0, total - n) * mean
        return left

    def text(self) -> str:
        left = self.left_s()
        return f"{self.finished}/{self.total}" + (f", ETA {duration(left)}" if left is not None
                                                  and self.finished < self.total else "")


class Console:
    """Progress lines on ``stream`` (stderr), with a live line in a terminal (see the module
    docstring). ``live=None`` decides by :func:`live_wanted`."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None,
                 start: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.start = time.perf_counter() if start is None else start
        self.live = live_wanted(self.stream) if live is None else live
        self._bar: Any = None
        self._estimate: Estimate | None = None
        self._task_start = time.perf_counter()
        self._width = 1

    # ------------------------------------------------------------------------------ output

    def line(self, text: str) -> None:
        """One line, above the live line when there is one."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self.start:6.1f}s"

    def _open_bar(self, total: int, what: str) -> None:
        self.close()
        if not self.live:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # plain lines only
            self.live = False
            return
        self._bar = tqdm(total=total, desc=what, file=self.stream, leave=False, unit="case",
                         dynamic_ncols=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------------------- suite

    def suite(self, tasks: Sequence[Any]) -> None:
        """The suite phase begins: ``tasks`` have a ``backend``."""
        totals: dict[str, int] = defaultdict(int)
        for task in tasks:
            totals[task.backend] += 1
        self._estimate = Estimate(totals)
        self._width = len(str(len(tasks)))
        self._task_start = time.perf_counter()
        self._open_bar(len(tasks), "suite")

    def task(self, task: Any, records: Sequence[Any]) -> None:
        """A suite task finished with ``records``."""
        now = time.perf_counter()
        estimate = self._estimate or Estimate({task.backend: 1})
        estimate.add(task.backend, now - self._task_start)
        self._task_start = now
        where = f"[{estimate.finished:>{self._width}}/{estimate.total}]"
        left = estimate.left_s()
        eta = f" ETA {duration(left)}" if left is not None and estimate.finished < \
            estimate.total else ""
        self.line(f"{where} {self._elapsed()}{eta} {task.backend:<14} {task.case.label:<40} "
                  f"{outcome_text(records)}")
        for text in reason_lines(records):
            self.line(text)
        if self._bar is not None:
            self._bar.set_postfix_str(self._per_backend(estimate), refresh=False)
            self._bar.update(1)

    @staticmethod
    def _per_backend(estimate: Estimate) -> str:
        left = estimate.left_s()
        parts = [f"{b} {estimate.done.get(b, 0)}/{n}" for b, n in estimate.totals.items()]
        return ", ".join(parts) + (f"; ETA {duration(left)}" if left is not None else "")

    # ------------------------------------------------------------------------- exploration

    def exploring(self, backend: str, examples: int) -> None:
        """A backend's exploration begins: up to ``examples`` generated cases."""
        self._estimate = Estimate({backend: examples})
        self._width = len(str(examples))
        self._task_start = time.perf_counter()
        self._open_bar(examples, f"explore {backend}")

    def explored(self, backend: str, phase: str, case: Any, records: Sequence[Any],
                 step: int) -> None:
        """One explored case was judged: ``phase`` is ``generate`` (``step`` = its number) or
        ``shrink`` (``step`` = the shrinking step)."""
        now = time.perf_counter()
        estimate = self._estimate or Estimate({backend: step})
        eta = ""
        if phase == "generate":
            estimate.add(backend, now - self._task_start)
            where = f"[{step:>{self._width}}/{estimate.total}]"
            left = estimate.left_s()
            if left is not None and step < estimate.total:  # what is left of this backend's
                eta = f" ETA {duration(left)}"
            if self._bar is not None:
                self._bar.update(1)
        else:  # shrinking: how many steps it takes is not known in advance
            where = f"shrink {step}:"
        self._task_start = now
        self.line(f"explore {backend} {where} {self._elapsed()}{eta} {case.label:<40} "
                  f"{outcome_text(records)}")
        if phase == "generate":
            for text in reason_lines(records):
                self.line(text)
        elif self._bar is not None:
            self._bar.set_postfix_str(f"shrinking, step {step}", refresh=True)
