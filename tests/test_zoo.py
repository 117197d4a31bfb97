"""The bug zoo (tests/zoo/kernels.py): every classic porting bug is caught on the smoke suite,
and the correct kernel passes. Runs in-process for speed; the CLI path is tested elsewhere."""

from __future__ import annotations

from collections import defaultdict

import pytest

from harness.case.suites import load_suite
from harness.run.worker import Task, execute
from harness.target import detect
from tests.zoo.kernels import ZOO

CHECKS = ("fwd", "bwd", "determinism")


@pytest.fixture(scope="module")
def target():
    return detect()


def run_smoke(kernel: str, target, checks=CHECKS, until=()) -> dict[str, list]:
    """Records of the smoke suite for a zoo kernel, grouped by status; with ``until``, the
    cases stop once each of those checks has failed on one of them (a catch needs no more)."""
    (suite,) = load_suite("smoke")
    by_status: dict[str, list] = defaultdict(list)
    backends: dict = {}
    for case in suite.cases:
        task = Task("smoke", case, f"tests/zoo/kernels.py:{kernel}", checks, seed=0)
        for kind, record in execute(task, target, backends):
            if kind == "record":
                by_status[record.status].append(record)
        if until and set(until) <= {r.check for r in by_status.get("fail", [])}:
            break
    return by_status


def test_the_correct_kernel_passes_everything_it_is_asked(target):
    result = run_smoke("correct", target)
    assert set(result) == {"pass", "skip"}, [r.reason for r in result.get("fail", [])]
    # the only skips are the entry points a flash_attn_func-shaped kernel cannot be called through
    assert {r.case["entry"] for r in result["skip"]} == {"varlen", "kvcache"}


@pytest.mark.parametrize("kernel", sorted(ZOO))
def test_every_zoo_kernel_is_caught_by_the_expected_checks(kernel, target):
    # Only the checks expected to catch it, and only until each has: the suite's other cases
    # and checks judge the same kernel again for nothing (this test took 4 minutes of the
    # suite's 12 when every kernel ran every check of every case).
    expected = tuple(ZOO[kernel])
    result = run_smoke(kernel, target, checks=expected, until=expected)
    assert not result.get("error") and not result.get("crash"), result
    caught = {r.check for r in result.get("fail", [])}
    assert set(expected) <= caught, f"{kernel} caught by {sorted(caught)}"
    for record in result["fail"]:
        assert record.reason  # every failure says what and where


def test_a_kernel_is_not_caught_by_a_check_that_does_not_see_its_bug(target):
    """The early stop cannot pass a kernel by itself: a check that misses the bug leaves the
    whole suite run and the kernel uncaught (the determinism check passes a kernel whose only
    bug is in the forward's scale)."""
    result = run_smoke("wrong_scale", target, checks=("determinism",), until=("determinism",))
    assert not result.get("fail")
    assert len(result["pass"]) + len(result.get("skip", [])) == len(load_suite("smoke")[0].cases)


def test_an_exploration_that_ended_on_a_timeout_is_not_a_catch():
    """tests.zoo.catch_rate counts a kernel as caught only by a ``fail`` of an expected check:
    the slow fixture kernel timing out on a huge case ends the exploration too."""
    from types import SimpleNamespace

    from harness.case import Case
    from harness.run.explore import Exploration
    from tests.zoo.catch_rate import is_caught

    def ended_on(check, status):
        record = SimpleNamespace(check=check, status=status)
        return Exploration("k", minimal=Case(batch=1, seqlen_q=1, seqlen_k=1), failing=[record])

    assert is_caught(ended_on("bwd", "fail"), ("fwd", "bwd"))
    assert is_caught(ended_on("fwd", "fail"), "fwd")
    assert not is_caught(ended_on("determinism", "timeout"), ("fwd", "bwd"))
    assert not is_caught(ended_on("bwd", "timeout"), ("fwd", "bwd"))
    assert not is_caught(ended_on("determinism", "fail"), ("bwd",))
    assert not is_caught(Exploration("k"), ("fwd",))
