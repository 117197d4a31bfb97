"""The return contract is strict (tests/fixtures/kernels/return_shapes.py): what a kernel
returns must be its family's convention, not merely something whose first item is the right
output. Before, `(out, None)`, `[out]` and `(out, anything)` passed for a family that returns a
bare tensor, and every family adapter took the first item of any tuple or list."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

from harness.backends import load_backend
from harness.backends.base import BadReturn
from harness.backends.module import describe_value, take_return
from harness.case import Case
from harness.checks.context import CaseRun
from harness.options import get_profile
from harness.target import from_facts

FIXTURES = Path(__file__).parent / "fixtures"
KERNELS = FIXTURES / "kernels" / "return_shapes.py"
CPU = from_facts({"machine": "x86_64", "device_count": 0})
DENSE = Case(batch=1, seqlen_q=16, seqlen_k=24, heads_q=2, head_dim=32, dtype="float16",
             causal=True)
VARLEN = Case(entry="varlen", batch=2, seqlens_q=(5, 9), seqlens_k=(7, 9), heads_q=2,
              head_dim=32, dtype="float16", causal=True)
_spec = importlib.util.spec_from_file_location("attn_harness_return_shapes", KERNELS)
shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shapes)


def fwd(case: Case, backend):
    return CaseRun(case, backend, CPU, seed=0, profile=get_profile("quick"),
                   device="cpu").run("fwd")


@pytest.mark.parametrize("kernel, returned", [
    ("pair_with_none", "tuple (Tensor[float16, (1, 16, 2, 32)], None)"),
    ("in_a_list", "list [Tensor[float16, (1, 16, 2, 32)]]"),
    ("one_tuple", "tuple (Tensor[float16, (1, 16, 2, 32)],)"),
    ("right_first_item", "tuple (Tensor[float16, (1, 16, 2, 32)], Tensor[float32, (3,)])"),
])
def test_a_user_kernel_that_wraps_its_output_fails_the_contract(kernel, returned):
    verdict = fwd(DENSE, load_backend(f"{KERNELS}:{kernel}"))
    assert verdict.status == "fail" and verdict.metrics.get("contract"), verdict.reason
    assert f"returned {returned}; expected out (a bare tensor)" in verdict.reason


def _wrapped(family: str, fake: str, function: str, misreturn, monkeypatch):
    """The fake module of ``family`` with ``function``'s result passed through ``misreturn``."""
    backend = load_backend(f"{family}@{FIXTURES / 'fakes' / fake}.py")
    original = getattr(backend.module, function)

    @functools.wraps(original)
    def call(*args, **kwargs):
        return misreturn(original(*args, **kwargs))

    monkeypatch.setattr(backend.module, function, call)
    return backend


@pytest.mark.parametrize("family, fake, function, case, misreturn, expected", [
    ("flash-attn", "fake_flash_attn2", "flash_attn_func", DENSE, "as_list",
     "(out, softmax_lse, S_dmask)"),
    ("flash-attn", "fake_flash_attn2", "flash_attn_func", DENSE, "lse_as_none",
     "(out, softmax_lse, S_dmask)"),
    ("flash-attn", "fake_flash_attn2", "flash_attn_varlen_func", VARLEN, "bare",
     "(out, softmax_lse, S_dmask)"),
    ("flash-attn3", "fake_flash_attn3", "flash_attn_func", DENSE, "lse_as_none",
     "(out, softmax_lse, ...)"),
    ("flash-attn3", "fake_flash_attn3", "flash_attn_func", DENSE, "as_list",
     "(out, softmax_lse, ...)"),
    ("aiter", "fake_aiter", "flash_attn_func", DENSE, "as_list", "(out, softmax_lse)"),
    ("aiter", "fake_aiter", "flash_attn_func", DENSE, "bare", "(out, softmax_lse)"),
    ("vllm-flash-attn", "fake_vllm", "flash_attn_varlen_func", VARLEN, "lse_as_none",
     "(out, softmax_lse)"),
    ("xformers", "fake_xformers", "memory_efficient_attention", DENSE, "paired_with_none",
     "out (a bare tensor)"),
    ("xformers", "fake_xformers", "memory_efficient_attention", DENSE, "as_list",
     "out (a bare tensor)"),
    ("flex-attention", "fake_flex", "flex_attention", DENSE, "as_list", "(out, lse)"),
])
def test_every_family_holds_its_return_convention(family, fake, function, case, misreturn,
                                                  expected, monkeypatch):
    backend = _wrapped(family, fake, function, getattr(shapes, misreturn), monkeypatch)
    verdict = fwd(case, backend)
    assert verdict.status == "fail" and verdict.metrics.get("contract"), verdict.reason
    assert f"{function} returned " in verdict.reason
    assert verdict.reason.endswith(f"expected {expected}"), verdict.reason


def test_take_return_reads_each_documented_convention():
    import torch

    out, lse, s = torch.zeros(2), torch.ones(2), None
    assert take_return(out, "f", "out") == (out, None)
    assert take_return((out, lse, s), "f", "(out, softmax_lse, S_dmask)") == (out, lse)
    assert take_return((out, lse), "f", "out", "(out, softmax_lse, ...)") == (out, lse)
    assert take_return((out, lse, s, s), "f", "(out, softmax_lse, ...)") == (out, lse)
    assert take_return((out,), "f", "out", "(out,)") == (out, None)
    for bad, conventions in [((out, None), ("out",)), ([out], ("out",)), ((out,), ("out",)),
                             ((out, lse), ("(out, softmax_lse, S_dmask)",)),
                             ([out, lse], ("(out, softmax_lse)",)),
                             ((lse, out)[:1] + (None,), ("(out, softmax_lse)",))]:
        with pytest.raises(BadReturn, match="^f returned "):
            take_return(bad, "f", *conventions)
    assert describe_value({"out": out}) == "dict"
    assert describe_value(tuple(range(6))) == "tuple (int, int, int, int, ...)"
