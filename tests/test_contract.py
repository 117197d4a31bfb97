"""The forward contract and the inputs' integrity: a misbehaving kernel never turns into a pass
(tests/fixtures/kernels/misbehaving.py). Each kernel here passed, or was misreported, before
the checks snapshot inputs and hold outputs to the contract."""

from __future__ import annotations

import pytest
import torch

from harness.case import Case
from harness.checks.contract import clone_inputs, modified_inputs
from harness.exact.inputs import make_inputs
from harness.run.worker import Task, execute
from harness.target import detect

KERNELS = "tests/fixtures/kernels/misbehaving.py"
CASE = Case(batch=1, seqlen_q=16, seqlen_k=16, heads_q=2, head_dim=64, dtype="float16",
            causal=True)


@pytest.fixture(scope="module")
def target():
    return detect()


def records(kernel: str, target, checks=("fwd", "determinism"), case: Case = CASE):
    task = Task("test", case, f"{KERNELS}:{kernel}", checks, seed=0)
    return {r.check: r for kind, r in execute(task, target, {}) if kind == "record"}


def test_a_kernel_that_computes_on_mutated_inputs_fails_fwd_and_determinism(target):
    out = records("computes_on_mutated_inputs", target)
    for check in ("fwd", "determinism"):
        assert out[check].status == "fail", out[check].reason
        assert "inputs modified in place" in out[check].reason
        assert "q:" in out[check].reason and "v:" in out[check].reason


def test_a_correct_kernel_that_scribbles_afterwards_fails_with_its_own_reason(target):
    out = records("scribbles_after", target, ("fwd",))
    assert out["fwd"].status == "fail"
    assert out["fwd"].reason.startswith("inputs modified in place: k:"), out["fwd"].reason


def test_out_of_memory_within_the_estimate_is_an_error_not_a_skip(target):
    out = records("says_out_of_memory", target, ("fwd",))
    assert out["fwd"].status == "error", out["fwd"].reason
    assert "out of memory on a case estimated at" in out["fwd"].reason
    assert out["fwd"].metrics["oom"] is True


@pytest.mark.parametrize("kernel, words", [
    ("returns_float32", "output dtype float32, expected float16"),
    ("promises_lse", "returned tuple (Tensor[float16, (1, 16, 2, 64)],); expected (out, "
                     "softmax_lse, ...)"),
    ("wrong_shape", "output shape (1, 2, 16, 64), expected (1, 16, 2, 64)"),
    ("meta_device", "output on device meta"),
])
def test_contract_violations_fail_and_say_so(target, kernel, words):
    out = records(kernel, target, ("fwd",))
    assert out["fwd"].status == "fail", out["fwd"].reason
    assert "forward contract" in out["fwd"].reason and words in out["fwd"].reason
    assert "the harness failed" not in out["fwd"].reason


def test_not_implemented_is_a_refusal(target):
    out = records("refuses", target, ("fwd", "determinism"))
    for record in out.values():
        assert record.status == "skip"
        assert record.reason.startswith("the kernel refused the case: NotImplementedError")
        assert record.metrics["rejected"] is True


def test_the_correct_kernel_still_passes(target):
    out = records("correct", target, ("fwd", "bwd", "determinism"))
    assert {r.status for r in out.values()} == {"pass"}, [r.reason for r in out.values()]


def test_clone_keeps_geometry_and_shared_buffers():
    case = Case(batch=2, seqlen_q=5, seqlen_k=7, heads_q=2, head_dim=8, layout="strided")
    inputs = make_inputs(case)
    copy = clone_inputs(inputs)
    for name in ("q", "k", "v"):
        a, b = getattr(inputs, name), getattr(copy, name)
        assert a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
        assert a.data_ptr() != b.data_ptr()
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert modified_inputs(inputs, copy) == []
    # a write into the NaN gaps of the strided buffer only (the elements stay) is caught too
    buffer = torch.empty(0, dtype=copy.q.dtype).set_(copy.q.untyped_storage())
    elements = copy.q.clone()
    buffer.fill_(0.0)
    copy.q.copy_(elements)
    assert "outside the tensor's elements" in modified_inputs(inputs, copy)[0]


@pytest.mark.parametrize("backend", ["sdpa-math", "sdpa-flash"])
def test_a_strided_tensor_that_torch_calls_contiguous_keeps_its_gaps_in_the_backward(backend,
                                                                                     target):
    """One token and one kv head: k is (1, 1, 1, 64) with strides (512, 64, 256, 1), which torch
    calls contiguous because every other dimension has size 1. The differentiable copy used to
    compact it (``clone``), and the bytes check then read the shorter buffer as a kernel writing
    into the gaps: a false "inputs modified in place" on bwd and determinism, found by
    exploring sdpa-flash."""
    case = Case(batch=1, seqlen_q=1, seqlen_k=1, heads_q=2, heads_kv=1, head_dim=64,
                dtype="float16", layout="strided")
    k = make_inputs(case).k
    assert k.is_contiguous() and k.untyped_storage().nbytes() > k.numel() * k.element_size()
    task = Task("test", case, backend, ("fwd", "bwd", "determinism"), seed=0)
    out = {r.check: r for kind, r in execute(task, target, {}) if kind == "record"}
    assert {r.status for r in out.values()} == {"pass"}, [r.reason for r in out.values()]


def test_sdpa_takes_per_batch_alibi_slopes(target):
    """ALiBi slopes of shape (batch, heads) (flash-attn's other accepted shape) reached the SDPA
    adapter's bias as a (1, batch*heads) view and raised a broadcast error on every check; found
    by the 2,000-case false-positive sweep of sdpa-math."""
    case = Case(batch=2, seqlen_q=1, seqlen_k=2, heads_q=1, head_dim=64, dtype="float16",
                alibi=True, alibi_slopes="random-per-batch")
    task = Task("test", case, "sdpa-math", ("fwd", "bwd", "determinism"), seed=0)
    out = {r.check: r for kind, r in execute(task, target, {}) if kind == "record"}
    assert {r.status for r in out.values()} == {"pass"}, [r.reason for r in out.values()]
