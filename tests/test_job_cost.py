"""What keeps the default job short: only the cases there to be timed are timed; and what bounds
an exploration when asked: ``--explore-budget S`` stops judging new free draws once S seconds
are spent, while every corner is still visited (issue 24, point 5).

The exploration tests run :func:`harness.run.explore.explore` with a stand-in ``run_case`` and a
fake clock that each judged case advances, so they take no real time and depend on no load.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys

import pytest

from harness.backends.base import Capabilities
from harness.case.suites import iter_cases
from harness.options import RunOptions, parse_timeout
from harness.results.records import Record
from harness.run import explore as explore_module
from harness.run.explore import explore, summary
from harness.run.session import validate_options


class FakeClock:
    """``time.perf_counter`` for the explore module: moves only when a case is judged."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(explore_module.time, "perf_counter", fake)
    return fake


def judged_cases(clock: FakeClock, seconds_per_case: float, fail_when=None):
    """A ``run_case`` that costs ``seconds_per_case`` of the fake clock and records each case;
    ``fail_when(case)`` makes a case fail its fwd check."""
    seen = []

    def run_case(case):
        clock.now += seconds_per_case
        seen.append(case.case_id)
        status = "fail" if fail_when is not None and fail_when(case) else "pass"
        return [Record(case_id=case.case_id, case=case.to_dict(), backend={"name": "fake"},
                       target={}, check="fwd", status=status, reason="")]

    return run_case, seen


def test_the_budget_stops_the_free_draws_and_every_corner_is_still_visited(clock):
    run_case, seen = judged_cases(clock, 4.0)
    result = explore("fake", Capabilities(), run_case, examples=20, budget_s=10.0)
    free = result.phases[0][1]
    corners = [(c, n) for c, n in result.phases if c is not None]
    assert result.phases[0][0] is None and free > 3 and corners
    # free draws begin at 0, 4 and 8 s; the fourth would begin at 12 s, past the budget; then
    # each corner's cases, whatever the time
    assert result.free_judged == 3 and result.free_planned == free
    assert result.examples == len(seen) == 3 + sum(n for c, n in corners
                                                    if c not in result.unreachable)
    assert result.budget_spent and result.planned == 20
    text = summary(result)
    assert f"the 10 s budget of free draws (--explore-budget) was spent after 3 of {free}" in text


def test_a_budget_only_cuts_the_same_sequence_short(clock):
    run_case, unbounded = judged_cases(clock, 1.0)
    full = explore("fake", Capabilities(), run_case, examples=12, seed=3)
    run_case, bounded = judged_cases(clock, 1.0)
    cut = explore("fake", Capabilities(), run_case, examples=12, seed=3, budget_s=5.0)
    assert not full.budget_spent and "budget" not in summary(full)
    assert cut.budget_spent and 0 < cut.free_judged < full.free_judged
    # the same free draws, cut short; then the same corners' cases
    assert bounded[:cut.free_judged] == unbounded[:cut.free_judged]
    assert bounded[cut.free_judged:] == unbounded[full.free_judged:]


def test_a_budget_that_is_not_spent_changes_nothing(clock):
    run_case, seen = judged_cases(clock, 0.1)
    result = explore("fake", Capabilities(), run_case, examples=8, budget_s=60.0)
    assert result.examples == 8 and not result.budget_spent
    assert "budget" not in summary(result)


def test_a_failure_found_in_time_is_shrunk_whatever_the_time(clock):
    # every case fails: the first is found at once, and shrinking it (hypothesis runs smaller
    # cases) goes on long past the budget
    run_case, seen = judged_cases(clock, 5.0, fail_when=lambda case: True)
    result = explore("fake", Capabilities(), run_case, examples=20, budget_s=6.0)
    assert result.minimal is not None and result.shrink_steps > 1
    assert not result.budget_spent


def test_no_budget_unless_asked_and_bad_values_are_usage_errors():
    # none by default: a budget cut the zoo's slow kernels' explorations on a loaded machine
    assert RunOptions().explore_budget_s is None
    assert RunOptions(explore_budget=math.inf).explore_budget_s is None
    assert validate_options({"explore-budget": parse_timeout("15")}).explore_budget_s == 15.0
    for bad in ("0", "-3", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_timeout(bad)


def test_the_cli_takes_the_budget_and_says_what_it_cut(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--backend", "sdpa-math", "--checks", "fwd",
         "--explore", "20", "--explore-budget", "0.001", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "free draws for 0.001 s at most" in result.stderr
    assert re.search(r"budget of free draws \(--explore-budget\) was spent after 0 of \d+ "
                     r"\(the corners were all visited\)", result.stderr), result.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--explore-budget", "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "explore-budget" in bad.stderr


def test_the_smoke_suite_judges_every_case_and_times_a_few():
    smoke = [case for _, case in iter_cases(["smoke"])]
    timed = [case.name for case in smoke if "throughput" in case.checks]
    assert timed == ["plain", "causal-gqa-q<k"]
    assert all({"fwd", "bwd", "determinism"} <= set(case.checks) for case in smoke)


def test_the_suites_workers_share_the_cores_out():
    """Each pytest-xdist worker's torch takes its share of the cores (tests/conftest.py), and the
    harness processes a test starts inherit it: two workers of two threads each on CI's two
    cores made the suite take twice as long."""
    import os

    import torch

    from tests.conftest import cpu_threads_per_worker

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("not a pytest-xdist worker: one process has the cores to itself")
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    assert torch.get_num_threads() == cpu_threads_per_worker()
    assert torch.get_num_threads() * workers <= max(workers, os.cpu_count() or 1)
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, check=True)
    assert int(child.stdout) == torch.get_num_threads()
