"""The exact reference: against a naive implementation, across entry points, memory-bounded."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch

from harness.case import Case
from harness.exact.inputs import make_inputs
from harness.exact.reference import (
    Params,
    attention_backward,
    attention_forward,
    baseline,
    reference,
)


def naive(q, k, v, scale, left, right, softcap, slopes):
    """Full-matrix attention with flash-attn semantics, differentiable by autograd."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, 2)
    v = v.repeat_interleave(hq // hkv, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    rel = torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]
    if slopes is not None:
        s = s - slopes.view(1, hq, 1, 1) * rel.abs()
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        visible &= rel <= left
    if right >= 0:
        visible &= -rel <= right
    p = torch.softmax(s.masked_fill(~visible, -math.inf), -1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def random_problem(rng):
    hkv = rng.choice([1, 2, 3])
    hq = hkv * rng.choice([1, 2, 4])
    d = rng.choice([1, 5, 16, 33])
    sq, sk = rng.randint(1, 48), rng.randint(1, 48)
    p = Params(scale=rng.choice([1 / math.sqrt(d), 0.7]), left=rng.choice([-1, 0, 3, 20]),
               right=rng.choice([-1, 0, 5]), softcap=rng.choice([0.0, 0.0, 1.3]))
    slopes = torch.rand(hq, dtype=torch.float64) if rng.random() < 0.3 else None
    b = rng.randint(1, 2)
    q = torch.randn(b, sq, hq, d, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, d, dtype=torch.float64)
    return q, k, v, p, slopes


@pytest.mark.parametrize("block_elems", [7, 300, 1 << 22])
def test_forward_and_gradients_match_naive_on_random_problems(block_elems):
    rng = random.Random(block_elems)
    for _ in range(60):
        q, k, v, p, slopes = random_problem(rng)
        out, lse = attention_forward(q, k, v, p, slopes, block_elems=block_elems)
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        expected = naive(qq, kk, vv, p.scale, p.left, p.right, p.softcap, slopes)
        dout = torch.randn_like(expected)
        gq, gk, gv = torch.autograd.grad(expected, (qq, kk, vv), dout)
        dq, dk, dv = attention_backward(q, k, v, out, lse, dout, p, slopes, block_elems=block_elems)
        for got, want in ((out, expected), (dq, gq), (dk, gk), (dv, gv)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_rows_that_see_no_key_are_zero_with_minus_inf_lse():
    q = torch.randn(1, 6, 1, 4, dtype=torch.float64)
    k = torch.randn(1, 3, 1, 4, dtype=torch.float64)
    out, lse = attention_forward(q, k, k, Params(0.5, -1, 0))  # causal, seqlen_q > seqlen_k
    assert torch.equal(out[0, :3], torch.zeros(3, 1, 4, dtype=torch.float64))
    assert torch.isinf(lse[0, 0, :3]).all() and torch.isfinite(lse[0, 0, 3:]).all()


def test_row_sampling_computes_exactly_the_chosen_rows():
    q, k, v, p, slopes = random_problem(random.Random(5))
    p = Params(p.scale, 7, 0, 0.0)
    full, full_lse = attention_forward(q, k, v, p, slopes)
    rows = torch.tensor([0, q.shape[1] // 2, q.shape[1] - 1]).unique()
    part, part_lse = attention_forward(q[:, rows], k, v, p, slopes, rows=rows,
                                       seqlen_q=q.shape[1], block_elems=11)
    torch.testing.assert_close(part, full[:, rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(part_lse, full_lse[:, :, rows], rtol=0, atol=1e-12)


def _dense_equivalent(case: Case, inputs, b: int):
    """Reference of one sequence of a varlen/kvcache case computed as its own dense case."""
    sq, sk = case.sequence_lengths()[b]
    if case.entry == "varlen":
        cq, ck = inputs.cu_seqlens_q.tolist(), inputs.cu_seqlens_k.tolist()
        q = inputs.q[cq[b]:cq[b + 1]][None]
        k, v = inputs.k[ck[b]:ck[b + 1]][None], inputs.v[ck[b]:ck[b + 1]][None]
    else:
        q, k, v = inputs.q[b:b + 1], inputs.k[b:b + 1, :sk], inputs.v[b:b + 1, :sk]
    slopes = inputs.alibi_slopes.double() if case.alibi else None
    return naive(q.double(), k.double(), v.double(), Params.of(case).scale, *case.mask_window,
                 case.softcap, slopes)


@pytest.mark.parametrize("case", [
    Case(entry="varlen", batch=3, seqlens_q=[17, 0, 9], seqlens_k=[5, 12, 30], heads_q=4,
         heads_kv=2, head_dim=16, causal=True, alibi=True),
    Case(entry="varlen", batch=2, seqlens_q=[4, 6], seqlens_k=[0, 8], head_dim=8,
         window=(2, 1), layout="strided"),
    Case(entry="kvcache", batch=2, seqlen_q=3, seqlen_k=40, seqlens_k=[40, 11], heads_q=2,
         head_dim=8, causal=True, paged_block_size=16, softcap=2.0),
])
def test_varlen_and_kvcache_are_per_sequence_dense_attention(case):
    inputs = make_inputs(case, "cpu", seed=3)
    ref = reference(inputs, grads=case.entry == "varlen")
    for b, (_, sk) in enumerate(case.sequence_lengths()):
        expected = _dense_equivalent(case, inputs, b)
        if case.entry == "varlen":
            cq = inputs.cu_seqlens_q.tolist()
            got = ref.out[cq[b]:cq[b + 1]]
            expected = expected[0]
        else:
            got = ref.out[b:b + 1]
        if sk == 0:
            expected = torch.zeros_like(expected)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_baseline_is_the_same_math_in_low_precision():
    case = Case(batch=2, seqlen_q=40, seqlen_k=70, heads_q=4, heads_kv=2, head_dim=32,
                causal=True, softcap=3.0, alibi=True, dtype="bfloat16")
    inputs = make_inputs(case, "cpu", seed=1)
    ref, base = reference(inputs, grads=True), baseline(inputs, grads=True)
    assert base.out.dtype == torch.bfloat16
    for name in ("out", "dq", "dk", "dv"):
        err = (getattr(base, name).double() - getattr(ref, name)).abs().max()
        assert 0 < err < 0.1, name  # low precision: close, but not exact


MEMORY_SCRIPT = """
import json, resource, sys, torch
from harness.case import Case
from harness.exact.inputs import make_inputs
from harness.exact.reference import reference, baseline
case = Case(batch=1, seqlen_q={n}, heads_q=2, head_dim=64, dtype="float32")
inputs = make_inputs(case, "cpu", seed=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ref = reference(inputs)
base = baseline(inputs)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"before_kib": before, "after_kib": after,
                   "finite": bool(torch.isfinite(ref.out).all())}}))
"""


def test_reference_memory_is_bounded_by_the_chunk_not_the_problem():
    """8k x 8k x 2 heads: one float64 score matrix alone would be 1 GiB."""
    n = 8192
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.format(n=n)], capture_output=True,
                         text=True, check=True, timeout=300)
    result = json.loads(out.stdout)
    grown_mib = (result["after_kib"] - result["before_kib"]) / 1024
    full_matrix_mib = n * n * 2 * 8 / 2**20
    assert result["finite"]
    assert grown_mib < 400, f"reference+baseline grew the process by {grown_mib:.0f} MiB"
    assert grown_mib < full_matrix_mib / 2.5


def test_reference_and_baseline_run_without_tf32_and_restore_the_setting(monkeypatch):
    # TF32 would make a float32 reference as inexact as the 16-bit kernels it judges.
    import torch

    from harness.exact import reference as ref_module

    seen = []
    probe = ref_module.ieee_float32(lambda: seen.append(torch.backends.cuda.matmul.allow_tf32))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    probe()
    assert seen == [False]
    assert torch.backends.cuda.matmul.allow_tf32 is True
    for fn in (ref_module.reference, ref_module.baseline, ref_module.dropout_variance):
        assert getattr(fn, "__wrapped__", None) is not None, fn.__name__


def test_the_reference_leaves_a_fresh_process_s_matmul_setting_as_it_found_it():
    # torch 2.9+ has fp32_precision: restoring allow_tf32 = False there left "ieee" where a
    # fresh process has "none", and torch.compile keys its cached graphs on that setting.
    code = ("import torch\n"
            "from harness.exact.reference import ieee_float32\n"
            "matmul = torch.backends.cuda.matmul\n"
            "before = getattr(matmul, 'fp32_precision', matmul.allow_tf32)\n"
            "inside = ieee_float32(lambda: matmul.allow_tf32)()\n"
            "after = getattr(matmul, 'fp32_precision', matmul.allow_tf32)\n"
            "print(before, inside, after)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    before, inside, after = out
    assert inside == "False"
    assert after == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_cpu_baseline_multiplies_as_a_16_bit_matmul_does(dtype):
    """On a CPU the baseline's 16-bit products are taken in float32 and rounded once (what a
    16-bit matmul computes, and 4-7x faster there than PyTorch's scalar 16-bit loop): results
    and gradients stay at the dtype and within one ulp of PyTorch's own 16-bit einsum."""
    from harness.exact.scores import matmul as _einsum

    torch.manual_seed(0)
    a = torch.randn(3, 40, 2, 64).to(dtype).requires_grad_(True)
    b = torch.randn(3, 50, 2, 64).to(dtype).requires_grad_(True)
    eq = "bihd,bjhd->bhij"
    ours, native = _einsum(eq, a, b), torch.einsum(eq, a, b)
    assert ours.dtype == dtype
    ulp = torch.finfo(dtype).eps * native.float().abs().clamp_min(1)
    diff = (ours.float() - native.float()).abs()
    assert (diff <= ulp).all() and (diff > 0).float().mean() < 0.01
    g = torch.randn_like(native)
    for mine, theirs in zip(torch.autograd.grad(ours, (a, b), g),
                            torch.autograd.grad(native, (a, b), g), strict=True):
        assert mine.dtype == dtype
        ulp = torch.finfo(dtype).eps * theirs.float().abs().clamp_min(1)
        assert ((mine.float() - theirs.float()).abs() <= ulp).all()
