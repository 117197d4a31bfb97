"""Every output the harness obtains is held to the judged one (tests/fixtures/kernels/
later_calls.py): a kernel right on its first call and wrong on later ones fails a check that
says so, and correct kernels still pass. Before, the determinism runs were compared only with
each other and the timed calls not at all, so each of these kernels passed every check."""

from __future__ import annotations

import pytest

from harness.backends.user import load_function
from harness.case import Case
from harness.run.worker import Task, execute
from harness.target import detect

KERNELS = "tests/fixtures/kernels/later_calls.py"
CASE = Case(batch=1, seqlen_q=16, seqlen_k=24, heads_q=2, head_dim=32, dtype="float16",
            causal=True)
ALL = ("fwd", "bwd", "determinism", "throughput")


@pytest.fixture(scope="module")
def target():
    return detect()


def records(backend: str, target, checks=ALL, case: Case = CASE) -> dict:
    if backend.startswith(KERNELS):
        load_function(backend).__globals__["reset"]()  # a fresh kernel: no calls seen yet
    task = Task("test", case, backend, checks, seed=0)
    return {r.check: r for kind, r in execute(task, target, {}) if kind == "record"}


@pytest.mark.parametrize("kernel, failing, words", [
    ("shifts_after_first_call", "determinism", "out"),
    ("noisy_after_first_call", "determinism", "out"),
    ("wrong_backward_after_first", "determinism", "dq"),
    ("wrong_after_second_call_of_a_shape", "determinism", "out"),
    ("jitters", "determinism", "differ between two identical runs"),
    ("returns_its_workspace", "determinism", "out is not the fwd check's"),
])
def test_a_kernel_wrong_after_its_first_calls_fails_determinism(target, kernel, failing, words):
    out = records(f"{KERNELS}:{kernel}", target, ("fwd", "bwd", "determinism"))
    assert out["fwd"].status == "pass", out["fwd"].reason  # the judged call is right
    assert out[failing].status == "fail", out[failing].reason
    assert words in out[failing].reason


@pytest.mark.parametrize("kernel, words", [
    ("right_for_six_calls", "timed fwd call: out"),
    ("backward_right_for_four_calls", "timed bwd call: dq"),
])
def test_a_kernel_wrong_only_on_its_timed_calls_fails_throughput(target, kernel, words):
    out = records(f"{KERNELS}:{kernel}", target)
    assert {out[c].status for c in ("fwd", "bwd", "determinism")} == {"pass"}, \
        [r.reason for r in out.values()]
    timed = out["throughput"]
    assert timed.status == "fail", timed.reason
    assert words in timed.reason
    assert timed.metrics["time_ms"] > 0  # the timing is kept with the failure


@pytest.mark.parametrize("backend", ["sdpa-math", "sdpa-flash",
                                     "flash-attn@tests/fixtures/flash_attn_ref.py",
                                     "tests/zoo/kernels.py:correct"])
def test_correct_kernels_still_pass_every_check(target, backend):
    out = records(backend, target)
    assert {r.status for r in out.values()} == {"pass"}, {c: r.reason for c, r in out.items()}


def test_a_dropout_case_is_still_reseeded_and_repeats(target):
    case = Case(batch=1, seqlen_q=8, seqlen_k=8, heads_q=2, head_dim=32, dtype="float32",
                dropout_p=0.25)
    out = records("sdpa-math", target, ("determinism",), case)
    assert out["determinism"].status == "pass", out["determinism"].reason
