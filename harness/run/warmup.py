"""Compiling ahead: a second process compiles the graphs a backend will need, on a core the run
leaves idle, into torch's on-disk caches.

A backend that compiles per structure (:attr:`harness.backends.base.Backend.
compiles_per_structure`: torch's FlexAttention compiles a graph for each heads, head dims, dtype,
mask and layout) makes a first run wait for every compile in turn: about 5 s each on a CPU,
15 for the default job's smoke cases (the quick profile does not explore such a backend on a
CPU: :attr:`harness.options.Profile.explore_compilers_on_cpu`), while a core idles. Compiled
graphs go to torch's caches on disk (``TORCHINDUCTOR_CACHE_DIR``), where any process of the same
torch finds them. So while the run works, a warmer process calls the backend's forward on the
cases the run will judge, with the same inputs (:class:`harness.checks.context.CheckContext`),
and the run then loads what the warmer compiled instead of compiling it.

- The warmer runs at idle priority (``SCHED_IDLE``, else ``nice 19``) from its start, and the
  run stops it (``SIGSTOP`` on its process group) while a timed check runs: idle priority
  alone did not keep it out of the timed kernel's way (a median SDPA call up to twice as long
  on a 2-core machine). It dies with the run, stopped or not (``PR_SET_PDEATHSIG``).
- It judges and records nothing. Whatever a forward raises, or a crash of the whole warmer,
  costs only the compiling ahead.
- Its order: first the exploration's draws, which the run needs last, while the run judges
  the suite (the same seed, profile and shard draw the same cases in any process:
  :func:`harness.run.explore.seed_only_draws`). Then the suite's cases that the run calls the
  backend on, from the last backwards, until it reaches the case the run has started
  (:attr:`Plan.progress_path`). A cached case does not say the run has come that far: cases
  that differ only in sizes or values share a graph. It stops after :data:`CACHED_STREAK`
  cached draws, or suite cases, in a row: the cache is warm, and a warm run is not slowed by
  a warmer re-tracing its graphs.
- Only where the target is a CPU: on a GPU the warmer's kernel launches would share the
  device with the kernels being judged.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.backends import load_backend
from harness.case import Case
from harness.options import get_profile

#: Cached exploration draws, or suite cases, in a row after which the warmer stops (the cache
#: is warm).
CACHED_STREAK = 3


@dataclass(frozen=True)
class Exploration:
    """What the run's exploration of a backend will draw from (:func:`harness.run.explore.
    explore`'s arguments)."""

    profile: str
    examples: int
    seed: int
    backward: bool
    shard: Any = None


@dataclass
class Plan:
    """What a warmer compiles ahead for one backend."""

    backend: str
    #: the suite's cases on this backend, in the run's order
    cases: list[Case] = field(default_factory=list)
    #: how the run plans their checks (:func:`harness.checks.plan.plan`): a case the run does
    #: not call the backend on (unclaimed, over the work limit) is not compiled
    checks: tuple[str, ...] = ("fwd",)
    audit: bool = False
    max_gflop: float | None = None
    #: a file where the run writes the index (in :attr:`cases`) of the case it has started on
    #: this backend (:meth:`harness.run.worker.Warmers.reached`); '' where none is kept
    progress_path: str = ""
    #: the exploration to predict the draws of, if the run explores this backend
    exploration: Exploration | None = None
    seed: int = 0
    profile: str = "quick"


def plans(tasks: Sequence[Any], resolved: dict[str, dict[str, Any]], target: dict[str, Any],
          exploration: Exploration | None) -> list[Plan]:
    """A plan for each backend of the run that compiles per structure, where the target is a
    CPU (see the module docstring); none otherwise."""
    if target.get("vendor") != "cpu":
        return []
    out = []
    for spec, info in resolved.items():
        if not info.get("compiles_per_structure") or info.get("error") or info.get(
                "availability"):
            continue
        mine = [t for t in tasks if t.backend == spec]
        if not mine and exploration is None:
            continue
        first = mine[0] if mine else None
        out.append(Plan(backend=spec, cases=[t.case for t in mine], exploration=exploration,
                        seed=first.seed if first else exploration.seed,
                        profile=first.profile if first else exploration.profile,
                        checks=first.checks if first else ("fwd",),
                        audit=first.audit if first else False,
                        max_gflop=first.max_gflop if first else None))
    return out


# ------------------------------------------------------------------------------ warmer side


def lower_priority() -> str:
    """Put every thread of this process (and what it starts later) at idle priority; returns
    how (``SCHED_IDLE``, ``nice``, or '' where neither could be set)."""
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is not None:
        try:
            for tid in os.listdir("/proc/self/task"):
                os.sched_setscheduler(int(tid), idle, os.sched_param(0))
            return "SCHED_IDLE"
        except (OSError, ValueError):
            pass
    with contextlib.suppress(OSError):
        os.nice(19)
        return "nice"
    return ""


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux ``PR_SET_PDEATHSIG``):
    a warmer stopped during a timed check cannot notice it by itself."""
    if not sys.platform.startswith("linux"):  # pragma: no cover - elsewhere the watch suffices
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def no_shared_locks() -> None:
    """Give tqdm (torch.fx shows progress with it) a thread lock before it makes its
    multiprocessing one: the run kills its warmer, and a killed process's semaphore made
    Python warn at the run's end of "1 leaked semaphore objects"."""
    try:
        from tqdm import tqdm
    except ImportError:  # torch does not need tqdm
        return
    tqdm.set_lock(threading.RLock())


def _cache_misses() -> int | None:
    """Graphs compiled so far in this process (torch's FX graph cache misses), or None where
    this torch does not count them."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - a torch without dynamo
        return None
    return int(counters["inductor"]["fxgraph_cache_miss"])


def run_reached(plan: Plan) -> int:
    """The index in ``plan.cases`` of the case the run has started on this backend; -1 where
    not known (no progress file, or not written yet)."""
    if not plan.progress_path:
        return -1
    try:
        return int(Path(plan.progress_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not written yet
        return -1


def predicted_draws(backend: Any, spec: str, exploration: Exploration) -> list[Case]:
    """The cases the run's exploration of ``backend`` will draw, in order, as long as no case
    fails (a failure is shrunk instead)."""
    from hypothesis.configuration import set_hypothesis_home_dir

    from harness.run.explore import explore

    drawn: list[Case] = []

    def run_case(case: Case) -> list:
        drawn.append(case)
        return []

    with tempfile.TemporaryDirectory(prefix="attn-harness-warmup-") as home:
        set_hypothesis_home_dir(home)  # nothing of hypothesis's in the user's folder
        explore(spec, backend.capabilities, run_case, profile=exploration.profile,
                examples=exploration.examples, seed=exploration.seed,
                backward=exploration.backward, shard=exploration.shard, database_dir=home)
    return drawn


def warm(plan: Plan, target: Any, backends: dict[str, Any]) -> dict[str, Any]:
    """Compile ``plan``'s graphs ahead in this process; returns what it did (for tests and
    messages): ``priority``, ``compiled`` and ``cached`` case ids, ``failed`` (case id ->
    why) and ``stopped`` (why it ended early, '' when it went through)."""
    from harness.checks.context import CheckContext
    from harness.checks.plan import plan as plan_checks

    done: dict[str, Any] = {"priority": lower_priority(), "compiled": [], "cached": [],
                            "failed": {}, "stopped": ""}
    no_shared_locks()
    backend = backends.get(plan.backend) or load_backend(plan.backend)
    backends[plan.backend] = backend
    if backend.availability() is not None:
        done["stopped"] = f"unavailable: {backend.availability()}"
        return done
    profile = get_profile(plan.profile)

    def compile_one(case: Case) -> bool | None:
        """True: it was cached; False: compiled now; None: the forward raised."""
        before = _cache_misses()
        try:
            CheckContext(case, backend, target, seed=plan.seed, profile=profile).call()
        except Exception as exc:  # noqa: BLE001 - the run judges it; here it is only not warmed
            done["failed"][case.case_id] = f"{type(exc).__name__}: {exc}"[:200]
            return None
        after = _cache_misses()
        cached = before is not None and after == before
        done["cached" if cached else "compiled"].append(case.case_id)
        return cached

    def tried(case: Case) -> bool:
        """Whether the case was called already (a case may be both drawn and in the suite)."""
        return case.case_id in done["cached"] or case.case_id in done["compiled"]

    def called(case: Case) -> bool:
        """Whether the run calls the backend on a suite case (a skipped one needs no graph)."""
        return bool(plan_checks(case, backend, target, plan.checks, audit=plan.audit,
                                max_gflop=plan.max_gflop).run)

    if plan.exploration is not None:
        streak = 0
        for case in predicted_draws(backend, plan.backend, plan.exploration):
            if tried(case):
                continue
            streak = streak + 1 if compile_one(case) else 0
            if streak >= CACHED_STREAK:
                done["stopped"] = (f"{CACHED_STREAK} draws in a row were cached: the cache is "
                                   "warm")
                return done
    streak = 0
    for index in reversed(range(len(plan.cases))):
        if index <= run_reached(plan):
            done["stopped"] = "the run has come this far"
            break
        case = plan.cases[index]
        if tried(case) or not called(case):
            continue
        streak = streak + 1 if compile_one(case) else 0
        if streak >= CACHED_STREAK:
            done["stopped"] = f"{CACHED_STREAK} suite cases in a row were cached: the cache is warm"
            break
    return done
