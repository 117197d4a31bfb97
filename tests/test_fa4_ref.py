"""The pure-PyTorch FlashAttention-4 fixture (tests/fixtures/fa4_ref.py) and its bug zoo.

The fixture is checked against a dense float64 computation written here (FA4's own reference,
``flash_attn/cute/testing.py attention_ref``, is what it follows: the sink a column of the scaled
scores dropped before ``P V``), and run through the harness on every entry point it serves; each
zoo variant must be caught by its case in tests/zoo/fa4/cases.toml while the fixture passes.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from harness.backends import load_backend
from harness.case.suites import load_suite
from harness.checks.context import CaseRun
from harness.options import get_profile
from harness.target import from_facts

ROOT = Path(__file__).resolve().parent
REF = ROOT / "fixtures" / "fa4_ref.py"
ZOO_DIR = ROOT / "zoo" / "fa4"
CPU = from_facts({"machine": "x86_64", "device_count": 0})


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fa4 = load(REF, "fa4_ref_under_test")
ZOO = load(ZOO_DIR / "ZOO.py", "fa4_zoo_table_under_test").ZOO


def exact(q, k, v, *, scale, causal=False, window=(None, None), sink=None, qv=None):
    """One sequence in float64: q (sq, hq, d), k (sk, hkv, d), v (sk, hkv, dv); FA4's window
    (None unbounded); ``sink`` (hq,) a column of the scaled scores, dropped before P V."""
    sq, hq = (q if q is not None else qv).shape[:2]
    sk, hkv = v.shape[:2]
    g = hq // hkv
    s = torch.zeros(hq, sq, sk, dtype=torch.float64)
    if q is not None:
        s += torch.einsum("ihd,jhd->hij", q.double(), k.double().repeat_interleave(g, 1))
    if qv is not None:
        s += torch.einsum("ihd,jhd->hij", qv.double(), v.double().repeat_interleave(g, 1))
    s *= scale
    diag = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    seen = torch.ones(sq, sk, dtype=torch.bool)
    left, right = window
    if causal:
        right = 0
    if right is not None:
        seen &= j <= diag + right
    if left is not None:
        seen &= j >= diag - left
    s = s.masked_fill(~seen, -math.inf)
    if sink is not None:
        s = torch.cat([s, sink.double()[:, None, None].expand(hq, sq, 1)], -1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)[..., :sk]
    out = torch.einsum("hij,jhd->ihd", p, v.double().repeat_interleave(g, 1))
    return out, lse


def rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


def test_dense_sink_window_and_return_lse():
    torch.manual_seed(1)
    q, k, v = rand(2, 30, 4, 32), rand(2, 50, 2, 32), rand(2, 50, 2, 16)
    sink = torch.randn(4) + 3.0
    out, lse = fa4.flash_attn_func(q, k, v, causal=True, window_size=(9, None),
                                   learnable_sink=sink, return_lse=True)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 30, 4, 16)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 30)
    for b in range(2):
        want, want_lse = exact(q[b], k[b], v[b], scale=32 ** -0.5, causal=True,
                               window=(9, None), sink=sink)
        assert (out[b].double() - want).abs().max() < 2e-2
        assert (lse[b].double() - want_lse).abs().max() < 1e-4
    assert fa4.flash_attn_func(q, k, v)[1] is None, "lse only with return_lse=True"


def test_rows_without_keys_give_zero_and_the_sink_or_minus_inf():
    torch.manual_seed(2)
    q, k, v = rand(1, 8, 2, 16), rand(1, 3, 2, 16), rand(1, 3, 2, 16)
    # (2, -2): literal integers, only key diag - 2 (left + right = 0 is not unbounded)
    out, lse = fa4.flash_attn_func(q, k, v, window_size=(2, -2), return_lse=True)
    assert torch.equal(out[0, :7], torch.zeros_like(out[0, :7]))
    assert torch.isinf(lse[0, :, :7]).all() and torch.isfinite(lse[0, :, 7]).all()
    sink = torch.tensor([0.5, -1.0])
    out, lse = fa4.flash_attn_func(q, k, v, causal=True, learnable_sink=sink, return_lse=True)
    assert torch.equal(out[0, :5].float(), torch.zeros(5, 2, 16))  # rows before the keys
    assert torch.equal(lse[0, :, :5], sink[:, None].expand(2, 5))


def test_varlen_padded_paged_and_dense_q_with_seqused_k():
    torch.manual_seed(3)
    # padded slots of 8: lengths 5 and 3 queries, 6 and 0 keys
    q, k, v = rand(16, 2, 16), rand(16, 1, 16), rand(16, 1, 16)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    used_q = torch.tensor([5, 3], dtype=torch.int32)
    used_k = torch.tensor([6, 0], dtype=torch.int32)
    out, lse = fa4.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                          seqused_q=used_q, seqused_k=used_k, return_lse=True)
    want, _ = exact(q[:5], k[:6], v[:6], scale=0.25)
    assert (out[:5].double() - want).abs().max() < 2e-2
    assert torch.isnan(out[5:8]).all(), "rows past seqused_q are not computed"
    assert torch.equal(out[8:11].float(), torch.zeros(3, 2, 16)) and lse.shape == (2, 16)
    # paged: pages of 4, the table naming pages out of order; a dense q
    pages_k, pages_v = rand(6, 4, 1, 16), rand(6, 4, 1, 16)
    table = torch.tensor([[5, 1, 3], [0, 2, 4]], dtype=torch.int32)
    qd = rand(2, 2, 2, 16)
    with pytest.raises(AssertionError, match="page_table is not supported with cu_seqlens_k"):
        fa4.flash_attn_varlen_func(qd, pages_k, pages_v, cu_seqlens_k=cu, page_table=table)
    out, _ = fa4.flash_attn_varlen_func(qd, pages_k, pages_v, page_table=table,
                                        seqused_k=torch.tensor([10, 4], dtype=torch.int32),
                                        causal=True)
    keys = pages_k[table[0].long()].flatten(0, 1)[:10]
    values = pages_v[table[0].long()].flatten(0, 1)[:10]
    want, _ = exact(qd[0], keys, values, scale=0.25, causal=True)
    assert (out[0].double() - want).abs().max() < 2e-2


def test_absorbed_mla_with_qv_and_the_shared_latent():
    torch.manual_seed(4)
    q, qv = rand(1, 2, 8, 64), rand(1, 2, 8, 512)
    k, v = rand(1, 40, 1, 64), rand(1, 40, 1, 512)
    out, lse = fa4.flash_attn_func(q, k, v, qv=qv, softmax_scale=0.05, return_lse=True)
    assert lse.shape == (1, 2, 8), "heads last with qv"
    want, want_lse = exact(q[0], k[0], v[0], qv=qv[0], scale=0.05)
    assert (out[0].double() - want).abs().max() < 2e-2
    assert (lse[0].t().double() - want_lse).abs().max() < 1e-4
    with pytest.raises(AssertionError, match="local not yet supported with qv"):
        fa4.flash_attn_func(q, k, v, qv=qv, window_size=(4, 0))
    latent = rand(1, 40, 1, 512)  # k is v: q becomes qv
    out, _ = fa4.flash_attn_func(qv, latent, latent, softmax_scale=0.05)
    want, _ = exact(None, None, latent[0], qv=qv[0], scale=0.05)
    assert (out[0].double() - want).abs().max() < 2e-2


def test_split_kv_owns_the_sink_once_and_matches_one_split():
    torch.manual_seed(5)
    q, k, v = rand(1, 1, 4, 32), rand(1, 600, 2, 32), rand(1, 600, 2, 32)
    sink = torch.randn(4)
    one = fa4.flash_attn_func(q, k, v, learnable_sink=sink, return_lse=True)
    three = fa4.flash_attn_func(q, k, v, learnable_sink=sink, num_splits=3, return_lse=True)
    assert (one[0].float() - three[0].float()).abs().max() < 1e-2
    assert (one[1] - three[1]).abs().max() < 1e-5


def test_the_originals_assertions():
    torch.manual_seed(6)
    q = rand(1, 4, 2, 16, dtype=torch.float32)
    with pytest.raises(AssertionError, match="inputs must be float16, bfloat16, fp8 e4m3fn"):
        fa4.flash_attn_func(q, q, q)
    half = rand(1, 4, 2, 16, dtype=torch.float16)
    with pytest.raises(AssertionError, match="q, k, v, and qv must have the same dtype"):
        fa4.flash_attn_func(half, rand(1, 4, 2, 16), rand(1, 4, 2, 16))
    fp8 = half.to(torch.float8_e4m3fn)
    out, lse = fa4._flash_attn_fwd(fp8, fp8, fp8, q_descale=torch.ones(1, 2),
                                   k_descale=torch.ones(1, 2), v_descale=torch.ones(1, 2),
                                   return_lse=True)[:2]
    assert out.dtype == torch.bfloat16 and lse.shape == (1, 2, 4)


def test_backward_through_autograd_is_close_to_float64():
    torch.manual_seed(7)
    q, k, v = (rand(1, n, 2, 16, dtype=torch.float16).requires_grad_() for n in (12, 20, 20))
    out, lse = fa4.flash_attn_func(q, k, v, causal=True)
    assert lse is not None, "an input that requires grad brings the lse (l.725)"
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out, _ = exact(q64[0], k64[0], v64[0], scale=0.25, causal=True)
    want = torch.autograd.grad(want_out[None], (q64, k64, v64), dout.double())
    for g, w in zip(got, want, strict=True):
        assert (g.double() - w).abs().max() < 2e-2


# ------------------------------------------------------------------ through the harness


def _fwd(spec: str, case):
    backend = load_backend(spec)
    assert backend.unsupported_reasons(case, CPU) == [], case.label
    return CaseRun(case, backend, CPU, seed=0, profile=get_profile("quick"),
                   device="cpu").run("fwd")


ZOO_CASES = load_suite(str(ZOO_DIR / "cases.toml"))[0].cases


@pytest.mark.parametrize("case", ZOO_CASES, ids=lambda c: c.name)
def test_the_fixture_passes_every_zoo_case(case):
    verdict = _fwd(f"flash-attn4@{REF}", case)
    assert verdict.status == "pass", verdict.reason


#: The zoo case that catches each variant (by name in tests/zoo/fa4/cases.toml).
CATCHES = {
    "paged_dv_stale_v": ("paged 192/128, page 16, one key tile (Dao-AILab/flash-attention "
                         "#2367)", "paged 192/128, page 64, several key tiles"),
    "sink_in_numerator": ("learnable sink, causal GQA",),
    "sink_every_split": ("learnable sink under split-KV: split 0 owns the sink (SM100)",),
}


def test_zoo_has_one_file_per_bug():
    files = {p.stem for p in ZOO_DIR.glob("*.py")} - {"ZOO"}
    assert files == set(ZOO) == set(fa4.BUGS) == set(CATCHES)


@pytest.mark.parametrize("bug, name", [(b, n) for b, names in CATCHES.items() for n in names])
def test_each_zoo_variant_is_caught_by_its_case(bug, name):
    (case,) = [c for c in ZOO_CASES if c.name == name]
    verdict = _fwd(f"flash-attn4@{ZOO_DIR / bug}.py", case)
    assert verdict.status == "fail", f"{bug} passed {case.label}"
    assert verdict.check in ZOO[bug]
