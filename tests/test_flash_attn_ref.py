"""The pure-PyTorch flash-attn 2 fixture (tests/fixtures/flash_attn_ref.py) and its bug zoo.

Everything is checked against a dense float64 computation written here, independently of the
harness's reference, so the fixture can be trusted before the reference models these paths.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent
REF_PATH = ROOT / "fixtures" / "flash_attn_ref.py"
ZOO_DIR = ROOT / "zoo" / "fa2"


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fa = load(REF_PATH, "flash_attn_ref_under_test")
if os.environ.get("FA2_REF_BUG"):  # mutation check: run these tests against a zoo variant
    fa = fa.variant(os.environ["FA2_REF_BUG"])
ZOO = load(ZOO_DIR / "ZOO.py", "fa2_zoo_table_under_test").ZOO


# ------------------------------------------------------------------ the float64 reference


def kernel_window(window, causal, sq, sk, has_alibi):
    """(is_causal, left, right) as flash_api.cpp leaves them (written again, independently)."""
    left, right = window
    if sq == 1 and not has_alibi:
        causal = False
    if causal:
        right = 0
    left = -1 if left >= sk else left
    right = -1 if right >= sk else right
    is_causal = left < 0 and right == 0
    if left < 0 and right >= 0:
        left = sk
    if right < 0 and left >= 0:
        right = sk
    return is_causal, left, right


def ref_seq(q, k, v, *, scale=None, causal=False, window=(-1, -1), softcap=0.0, slopes=None,
            keep=None, dropout_p=0.0, norm_sq=None, norm_sk=None):
    """One sequence in float64, differentiable: q (sq, hq, d), k/v (sk, hkv, d).

    Returns out (sq, hq, d) and lse (hq, sq) with +inf for rows without keys."""
    sq, hq, d = q.shape
    sk, hkv = k.shape[:2]
    scale = d ** -0.5 if scale is None else scale
    is_causal, left, right = kernel_window(window, causal, norm_sq or sq, norm_sk or sk,
                                           slopes is not None)
    g = hq // hkv
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = torch.einsum("ihd,jhd->hij", q.double(), kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    diag = i + sk - sq
    if slopes is not None:
        sl = slopes.double()[:, None, None]
        s = s + (sl * j if is_causal else -sl * (diag - j).abs())
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if is_causal:
        vis &= j <= diag
    else:
        if right >= 0:
            vis &= j <= diag + right
        if left >= 0:
            vis &= j >= diag - left
    s = s.masked_fill(~vis, -math.inf)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    p = e / total.clamp_min(1e-300)
    with torch.no_grad():
        lse = torch.where(total > 0, torch.log(total) + m, torch.full_like(m, math.inf))
    if keep is not None:
        p = p * keep.double() / (1 - dropout_p)
    out = torch.einsum("hij,jhd->ihd", p, vv)
    return out, lse.squeeze(-1)


def ref_dense(q, k, v, alibi=None, **kw):
    outs, lses = [], []
    for b in range(q.shape[0]):
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        o, lse = ref_seq(q[b], k[b], v[b], slopes=slopes, **kw)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape).to(dtype).requires_grad_(grad)


def close(a, b, tol):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), "the infinite entries differ"
    assert torch.equal(a[~finite], b[~finite])
    err = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= tol, f"max |diff| {err:.3g} > {tol:.3g}"


TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


# ------------------------------------------------------------------ window normalisation


def test_window_normalisation_follows_flash_api_cpp():
    # issue 13: q3 k1 window (-1, 1): right >= seqlen_k becomes -1, so nothing is masked.
    m = fa.normalize_window((-1, 1), False, 3, 1, False)
    assert (m.is_causal, m.is_local, m.left, m.right) == (False, False, -1, -1)
    # q300 k100 window (31, -1): the unbounded right side becomes seqlen_k (bounded).
    m = fa.normalize_window((31, -1), False, 300, 100, False)
    assert (m.is_local, m.left, m.right) == (True, 31, 100)
    # window (-1, 0) is the kernel's causal; a causal left side >= seqlen_k is dropped.
    assert fa.normalize_window((-1, 0), False, 4, 8, False).is_causal
    assert fa.normalize_window((9, -1), True, 4, 8, False).is_causal
    # seqlen_q == 1 without ALiBi turns causal off; with ALiBi it stays.
    assert not fa.normalize_window((-1, -1), True, 1, 8, False).is_causal
    assert fa.normalize_window((-1, -1), True, 1, 8, True).is_causal


def test_q300_k100_window_differs_from_the_docstring_rule():
    q, k, v = rand(1, 300, 1, 16), rand(1, 100, 1, 16), rand(1, 100, 1, 16)
    out = fa.flash_attn_func(q, k, v, window_size=(31, -1))
    ref, _ = ref_dense(q, k, v, window=(31, -1))
    close(out, ref, TOL[torch.float32])
    doc = fa.variant("window_docstring").flash_attn_func(q, k, v, window_size=(31, -1))
    assert (doc - out).abs().amax() > 0.1


# ------------------------------------------------------------------ dense


DENSE = [
    dict(),
    dict(causal=True),
    dict(causal=True, sq=90, sk=40),
    dict(window=(17, 5)),
    dict(window=(-1, 3), sq=50, sk=130),
    dict(window=(4, -1), sq=120, sk=40),
    dict(softcap=2.0),
    dict(alibi="heads"),
    dict(alibi="batch", causal=True),
    dict(alibi="heads", window=(20, 10)),
    dict(scale=0.3, causal=True, softcap=5.0, alibi="heads"),
    dict(hkv=4),
    dict(sq=1, causal=True),
    dict(sq=1, causal=True, alibi="heads"),
]


def dense_inputs(case, dtype=torch.float32, b=2):
    sq, sk = case.get("sq", 70), case.get("sk", 100)
    hq, hkv, d = 4, case.get("hkv", 2), 32
    q, k, v = (rand(b, s, h, d, dtype=dtype, grad=True)
               for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    alibi = None
    if case.get("alibi") == "heads":
        alibi = torch.rand(hq) * 0.3
    elif case.get("alibi") == "batch":
        alibi = torch.rand(b, hq) * 0.3
    kw = dict(causal=case.get("causal", False), window_size=case.get("window", (-1, -1)),
              softcap=case.get("softcap", 0.0), softmax_scale=case.get("scale"))
    return q, k, v, alibi, kw


def ref_kw(kw):
    return dict(causal=kw["causal"], window=kw["window_size"], softcap=kw["softcap"],
                scale=kw["softmax_scale"])


@pytest.mark.parametrize("case", DENSE, ids=[str(c) for c in DENSE])
def test_dense_forward_backward_and_lse(case):
    torch.manual_seed(0)
    q, k, v, alibi, kw = dense_inputs(case)
    out, lse, s = fa.flash_attn_func(q, k, v, alibi_slopes=alibi, return_attn_probs=True, **kw)
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert s.numel() == 0  # S_dmask only with dropout
    ref, ref_lse = ref_dense(q, k, v, alibi, **ref_kw(kw))
    close(out, ref, TOL[torch.float32])
    close(lse, ref_lse, 1e-4)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for g, r in zip(grads, ref_grads, strict=True):
        close(g, r, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_half_precision(dtype):
    torch.manual_seed(1)
    q, k, v, alibi, kw = dense_inputs(dict(causal=True, hkv=1), dtype=dtype)
    out = fa.flash_attn_func(q, k, v, **kw)
    assert out.dtype == dtype
    ref, _ = ref_dense(q, k, v, **ref_kw(kw))
    close(out, ref, TOL[dtype])


def test_rows_without_keys_give_zero_and_plus_inf_lse():
    torch.manual_seed(2)
    q, k, v = rand(1, 6, 2, 16), rand(1, 3, 2, 16), rand(1, 3, 2, 16)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    assert torch.isinf(lse[0, :, :3]).all() and (lse[0, :, :3] > 0).all()
    assert torch.isfinite(lse[0, :, 3:]).all()
    out, lse = fa.flash_attn_with_kvcache(q, k, v, causal=True, return_softmax_lse=True,
                                          num_splits=3)
    assert torch.isinf(lse[0, :, :3]).all() and (lse[0, :, :3] > 0).all()
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))


def test_causal_alibi_lse_is_shifted_by_slope_times_diagonal():
    # mask.h: causal adds +slope*j; the distance form gives the same softmax, lse shifted by
    # slope * (i + sk - sq).
    torch.manual_seed(3)
    q, k, v = rand(1, 5, 2, 16), rand(1, 9, 2, 16), rand(1, 9, 2, 16)
    slopes = torch.tensor([0.5, 0.25])
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes,
                                     return_attn_probs=True)
    wrong = fa.variant("alibi_causal_distance")
    out2, lse2, _ = wrong.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes,
                                          return_attn_probs=True)
    close(out, out2, 1e-5)
    shift = slopes[:, None] * (torch.arange(5) + 9 - 5)[None, :]
    close(lse[0] - lse2[0], shift, 1e-4)


def test_backward_is_deterministic():
    torch.manual_seed(4)
    q, k, v, alibi, kw = dense_inputs(dict(causal=True, hkv=1, softcap=3.0))
    dout = torch.randn(q.shape)
    first = torch.autograd.grad(fa.flash_attn_func(q, k, v, **kw), (q, k, v), dout)
    second = torch.autograd.grad(fa.flash_attn_func(q, k, v, **kw), (q, k, v), dout)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ dropout


def test_dropout_mask_from_the_global_seed_same_in_forward_and_backward():
    torch.manual_seed(5)
    q, k, v, _, kw = dense_inputs(dict(causal=True, sq=40, sk=60))
    p = 0.3
    torch.manual_seed(123)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, **kw)
    torch.manual_seed(123)
    again = fa.flash_attn_func(q, k, v, dropout_p=p, **kw)
    assert torch.equal(out, again)
    assert s_dmask.shape == (2, 4, 128, 128)
    keep = s_dmask[:, :, :40, :60] >= 0
    assert 0.6 < keep.float().mean().item() < 0.8
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    outs = []
    for b in range(2):
        o, _ = ref_seq(q[b], k[b], v[b], causal=True, keep=keep[b], dropout_p=p)
        outs.append(o)
    ref = torch.stack(outs)
    close(out, ref, 1e-4)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for g, r in zip(grads, ref_grads, strict=True):
        close(g, r, 2e-4)
    torch.manual_seed(124)
    other = fa.flash_attn_func(q, k, v, dropout_p=p, **kw)
    assert not torch.equal(out, other)


def test_varlen_dropout_mask_matches_s_dmask():
    torch.manual_seed(14)
    q, k, v, cu_q, cu_k = varlen_inputs([12, 30], [40, 25])
    torch.manual_seed(7)
    out, _, s_dmask = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 30, 40, dropout_p=0.25,
                                                causal=True, return_attn_probs=True)
    assert s_dmask.shape == (2, 4, 128, 128)
    outs = []
    for b, (rq, rk) in enumerate(((slice(0, 12), slice(0, 40)), (slice(12, 42), slice(40, 65)))):
        sq, sk = rq.stop - rq.start, rk.stop - rk.start
        keep = s_dmask[b, :, :sq, :sk] >= 0
        o, _ = ref_seq(q[rq], k[rk], v[rk], causal=True, keep=keep, dropout_p=0.25,
                       norm_sq=30, norm_sk=40)
        outs.append(o)
    ref = torch.cat(outs)
    close(out, ref, 1e-4)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for g, r in zip(grads, torch.autograd.grad(ref, (q, k, v), dout.double()), strict=True):
        close(g, r, 2e-4)


def test_strided_and_transposed_inputs_give_the_contiguous_answer():
    torch.manual_seed(15)
    q, k, v, _, kw = dense_inputs(dict(causal=True))
    q, k, v = (t.detach() for t in (q, k, v))
    base = fa.flash_attn_func(q, k, v, **kw)
    wide = torch.randn(2, 70, 4, 64)[..., ::2]
    wide.copy_(q)
    vt = v.permute(0, 2, 3, 1).contiguous().view(2, -1, 100).transpose(1, 2).view(2, 100, 2, 32)
    assert vt.stride(-1) != 1 and torch.equal(vt, v)
    assert torch.equal(fa.flash_attn_func(wide, k, vt, **kw), base)


def test_softcap_with_dropout_is_refused_like_the_original():
    q = rand(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="Softcapping does not support dropout"):
        fa.flash_attn_func(q, q, q, dropout_p=0.1, softcap=1.0)


# ------------------------------------------------------------------ varlen


def varlen_inputs(lens_q, lens_k, hq=4, hkv=2, d=32, grad=True):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = rand(sum(lens_q), hq, d, grad=grad)
    k = rand(sum(lens_k), hkv, d, grad=grad)
    v = rand(sum(lens_k), hkv, d, grad=grad)
    return q, k, v, cu_q, cu_k


def ref_varlen(q, k, v, cu_q, cu_k, max_q, max_k, alibi=None, **kw):
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        o, lse = ref_seq(q[rq], k[rk], v[rk], slopes=slopes, norm_sq=max_q, norm_sk=max_k,
                         **kw)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


VARLEN = [dict(), dict(causal=True), dict(window=(9, 2)), dict(softcap=1.5, causal=True),
          dict(alibi="batch", causal=True), dict(window=(3, -1))]


@pytest.mark.parametrize("case", VARLEN, ids=[str(c) for c in VARLEN])
def test_varlen_forward_backward(case):
    torch.manual_seed(6)
    lens_q, lens_k = [30, 1, 75], [70, 20, 40]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k)
    alibi = torch.rand(3, 4) * 0.3 if case.get("alibi") else None
    kw = dict(causal=case.get("causal", False), window_size=case.get("window", (-1, -1)),
              softcap=case.get("softcap", 0.0))
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 75, 70, alibi_slopes=alibi,
                                            return_attn_probs=True, **kw)
    assert lse.shape == (4, sum(lens_q))
    ref, ref_lse = ref_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), 75, 70, alibi,
                              causal=kw["causal"], window=kw["window_size"],
                              softcap=kw["softcap"])
    close(out, ref, TOL[torch.float32])
    close(lse, ref_lse, 1e-4)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for g, r in zip(grads, ref_grads, strict=True):
        close(g, r, 1e-4)


def paged(keys_per_seq, page, hkv=2, d=32, spare=3, seed=0):
    """Pages holding each sequence's keys under a shuffled block table."""
    gen = torch.Generator().manual_seed(seed)
    nblocks = [-(-len(x) // page) for x in keys_per_seq]
    max_blocks = max(nblocks)
    total = sum(nblocks) + spare
    pages = torch.randn(total, page, hkv, d, generator=gen)
    order = torch.randperm(total, generator=gen)
    table = torch.zeros(len(keys_per_seq), max_blocks, dtype=torch.int32)
    used = 0
    for b, x in enumerate(keys_per_seq):
        for j in range(nblocks[b]):
            blk = int(order[used])
            used += 1
            table[b, j] = blk
            rows = x[j * page:(j + 1) * page]
            pages[blk, : len(rows)] = rows
    return pages, table


def test_varlen_paged_forward():
    torch.manual_seed(7)
    lens_q, lens_k = [5, 17, 9], [40, 70, 33]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, grad=False)
    seqs_k = [k[cu_k[b]:cu_k[b + 1]] for b in range(3)]
    seqs_v = [v[cu_k[b]:cu_k[b + 1]] for b in range(3)]
    kp, table = paged(seqs_k, 16, seed=1)
    vp, table_v = paged(seqs_v, 16, seed=1)
    assert torch.equal(table, table_v)
    out = fa.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 17, 70, causal=True,
                                    block_table=table)
    ref = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 70, causal=True)
    assert torch.equal(out, ref)
    ref64, _ = ref_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), 17, 70, causal=True)
    close(out, ref64, TOL[torch.float32])


# ------------------------------------------------------------------ packed


def test_packed_entry_points_agree_with_unpacked():
    torch.manual_seed(8)
    qkv = rand(2, 50, 3, 4, 32, grad=True)
    kw = dict(causal=True, softcap=2.0)
    out = fa.flash_attn_qkvpacked_func(qkv, **kw)
    q, k, v = (qkv.detach()[:, :, i].clone().requires_grad_(True) for i in range(3))
    ref = fa.flash_attn_func(q, k, v, **kw)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert torch.equal(dqkv, torch.stack(grads, dim=2))

    qq = rand(2, 30, 4, 32, grad=True)
    kv = rand(2, 60, 2, 2, 32, grad=True)
    out = fa.flash_attn_kvpacked_func(qq, kv, window_size=(10, 3))
    k2, v2 = (kv.detach()[:, :, i].clone().requires_grad_(True) for i in range(2))
    ref = fa.flash_attn_func(qq, k2, v2, window_size=(10, 3))
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    dq, dkv = torch.autograd.grad(out, (qq, kv), dout)
    rq, rk, rv = torch.autograd.grad(ref, (qq, k2, v2), dout)
    assert torch.equal(dq, rq) and torch.equal(dkv, torch.stack((rk, rv), dim=2))


def test_varlen_packed_entry_points_agree_with_unpacked():
    torch.manual_seed(9)
    lens = [20, 45]
    cu = torch.tensor([0, 20, 65], dtype=torch.int32)
    qkv = rand(65, 3, 2, 16, grad=True)
    out, lse, _ = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 45, causal=True,
                                                      return_attn_probs=True)
    assert lse.shape == (2, sum(lens))
    q, k, v = (qkv.detach()[:, i].clone().requires_grad_(True) for i in range(3))
    ref = fa.flash_attn_varlen_func(q, k, v, cu, cu, 45, 45, causal=True)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    assert torch.equal(dqkv, torch.stack(torch.autograd.grad(ref, (q, k, v), dout), dim=1))

    cu_k = torch.tensor([0, 30, 50], dtype=torch.int32)
    qq = rand(65, 2, 16, grad=True)
    kv = rand(50, 2, 1, 16, grad=True)
    out = fa.flash_attn_varlen_kvpacked_func(qq, kv, cu, cu_k, 45, 30, softcap=3.0)
    k2, v2 = (kv.detach()[:, i].clone().requires_grad_(True) for i in range(2))
    ref = fa.flash_attn_varlen_func(qq, k2, v2, cu, cu_k, 45, 30, softcap=3.0)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    _, dkv = torch.autograd.grad(out, (qq, kv), dout)
    _, rk, rv = torch.autograd.grad(ref, (qq, k2, v2), dout)
    assert torch.equal(dkv, torch.stack((rk, rv), dim=1))


# ------------------------------------------------------------------ kv-cache


def rotary_ref(x, cos, sin, pos, interleaved):
    """Rotary in float64 through complex numbers (interleaved) or rotate-half (NeoX)."""
    rd = cos.shape[1] * 2
    c = cos.double()[pos][:, :, None]
    s = sin.double()[pos][:, :, None]
    xd = x.double()
    head, tail = xd[..., :rd], xd[..., rd:]
    if interleaved:
        z = torch.view_as_complex(head.reshape(*head.shape[:-1], rd // 2, 2).contiguous())
        rot = torch.view_as_real(z * torch.complex(c, s)).flatten(-2)
    else:
        half = torch.cat((-head[..., rd // 2:], head[..., : rd // 2]), -1)
        rot = head * torch.cat((c, c), -1) + half * torch.cat((s, s), -1)
    return torch.cat((rot, tail), -1).to(x.dtype)


def kvcache_expected(q, k_cache, v_cache, k, v, *, seqlens, batch_idx=None, leftpad=None,
                     cos=None, sin=None, interleaved=True, causal=False, window=(-1, -1),
                     softcap=0.0, alibi=None):
    """(out, lse, k_cache_after, v_cache_after) for a contiguous cache, in float64."""
    b, sq = q.shape[:2]
    cap = k_cache.shape[1]
    rows = list(range(b)) if batch_idx is None else batch_idx.tolist()
    lp = [0] * b if leftpad is None else leftpad.tolist()
    kc, vc = k_cache.clone(), v_cache.clone()
    snew = 0 if k is None else k.shape[1]
    is_causal, left, right = kernel_window(window, causal, sq, cap, alibi is not None)
    local = not is_causal and (left >= 0 or right >= 0)
    if cos is not None:
        qpos = seqlens[:, None].long() + (torch.arange(sq)[None] if is_causal or local
                                          else torch.zeros(1, sq, dtype=torch.long))
        q = rotary_ref(q, cos, sin, qpos, interleaved)
        k = rotary_ref(k, cos, sin, seqlens[:, None].long() + torch.arange(snew)[None],
                       interleaved)
    for i in range(b):
        if k is not None:
            s0 = int(seqlens[i])
            kc[rows[i], s0:s0 + snew] = k[i]
            vc[rows[i], s0:s0 + snew] = v[i]
    outs, lses = [], []
    for i in range(b):
        stop = int(seqlens[i]) + snew
        slopes = None if alibi is None else (alibi[i] if alibi.dim() == 2 else alibi)
        o, lse = ref_seq(q[i], kc[rows[i], lp[i]:stop], vc[rows[i], lp[i]:stop], causal=causal,
                         window=window, softcap=softcap, slopes=slopes, norm_sq=sq, norm_sk=cap)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses), kc, vc


KVCACHE = [
    dict(),
    dict(new=3, causal=True),
    dict(new=1, rotary=True, interleaved=True, causal=True),
    dict(new=4, rotary=True, interleaved=False, causal=True),
    dict(new=2, rotary=True, interleaved=False),
    dict(new=3, batch_idx=True, causal=True),
    dict(new=2, leftpad=True, causal=True, rotary=True, interleaved=False),
    dict(new=1, splits=3, hq=8, hkv=2, sq=1),
    dict(new=2, splits=3, window=(40, 0), alibi=True),
    dict(new=1, softcap=2.0, causal=True, splits=2),
    dict(new=0, alibi=True, causal=True, sq=1),
    dict(new=3, causal=True, dtype=torch.float16, rotary=True, interleaved=True),
]


def kvcache_inputs(case, cache_rows=None):
    b, sq, cap, hq, hkv, d = 3, case.get("sq", 4), 192, case.get("hq", 4), case.get("hkv", 2), 32
    dtype = case.get("dtype", torch.float32)
    rows = cache_rows or (5 if case.get("batch_idx") else b)
    k_cache, v_cache = rand(rows, cap, hkv, d, dtype=dtype), rand(rows, cap, hkv, d, dtype=dtype)
    new = case.get("new", 0)
    k = rand(b, new, hkv, d, dtype=dtype) if new else None
    v = rand(b, new, hkv, d, dtype=dtype) if new else None
    seqlens = torch.tensor([150, 7, 100], dtype=torch.int32)
    extra = dict(seqlens=seqlens)
    if case.get("batch_idx"):
        extra["batch_idx"] = torch.tensor([4, 0, 2], dtype=torch.int32)
    if case.get("leftpad"):
        extra["leftpad"] = torch.tensor([30, 0, 99], dtype=torch.int32)
    if case.get("rotary"):
        angle = torch.rand(cap, 8) * 2 * math.pi
        extra.update(cos=torch.cos(angle).to(dtype), sin=torch.sin(angle).to(dtype),
                     interleaved=case["interleaved"])
    if case.get("alibi"):
        extra["alibi"] = torch.rand(b, hq) * 0.3
    q = rand(b, sq, hq, d, dtype=dtype)
    extra.update(causal=case.get("causal", False), window=case.get("window", (-1, -1)),
                 softcap=case.get("softcap", 0.0))
    return q, k_cache, v_cache, k, v, extra


def call_kvcache(module, q, k_cache, v_cache, k, v, extra, **more):
    return module.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=extra.get("cos"), rotary_sin=extra.get("sin"),
        cache_seqlens=extra["seqlens"], cache_batch_idx=extra.get("batch_idx"),
        cache_leftpad=extra.get("leftpad"), causal=extra["causal"],
        window_size=extra["window"], softcap=extra["softcap"],
        rotary_interleaved=extra.get("interleaved", True), alibi_slopes=extra.get("alibi"),
        return_softmax_lse=True, **more)


@pytest.mark.parametrize("case", KVCACHE, ids=[str(c) for c in KVCACHE])
def test_kvcache_output_lse_and_in_place_append(case):
    torch.manual_seed(10)
    q, k_cache, v_cache, k, v, extra = kvcache_inputs(case)
    exp_out, exp_lse, exp_k, exp_v = kvcache_expected(q, k_cache, v_cache, k, v, **extra)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = call_kvcache(fa, q, kc, vc, k, v, extra, num_splits=case.get("splits", 0))
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    tol = TOL[q.dtype]
    close(out, exp_out, tol)
    close(lse, exp_lse, 1e-4 if q.dtype == torch.float32 else 1e-2)
    # the cache: the new rows (rotated keys rounded to the dtype), nothing else changed
    assert torch.equal(vc, exp_v)
    changed = kc != k_cache
    assert not (changed & (exp_k == k_cache)).any()
    # rotary: float32 in the fixture, float64 here, both rounded to the dtype (one ulp apart)
    close(kc, exp_k, 2 * torch.finfo(q.dtype).eps * 8 if "cos" in extra else 0.0)


def test_kvcache_int_cache_seqlens_and_no_append():
    torch.manual_seed(11)
    q, kc, vc = rand(2, 3, 2, 16), rand(2, 64, 2, 16), rand(2, 64, 2, 16)
    out = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=40, causal=True)
    ref = fa.flash_attn_func(q, kc[:, :40], vc[:, :40], causal=True)
    close(out, ref, 1e-6)
    full = fa.flash_attn_with_kvcache(q, kc, vc)
    close(full, fa.flash_attn_func(q, kc, vc), 1e-6)


def test_kvcache_splits_agree_with_one_split():
    torch.manual_seed(12)
    for case in (dict(new=1, hq=8, hkv=2, sq=1), dict(new=3, causal=True, window=(50, 0)),
                 dict(new=2, alibi=True, causal=True)):
        q, k_cache, v_cache, k, v, extra = kvcache_inputs(case)
        one = call_kvcache(fa, q, k_cache.clone(), v_cache.clone(), k, v, extra, num_splits=1)
        three = call_kvcache(fa, q, k_cache.clone(), v_cache.clone(), k, v, extra, num_splits=3)
        close(one[0], three[0], 1e-5)
        close(one[1], three[1], 1e-5)


def test_num_splits_heuristic_matches_flash_api():
    # 1 split when batch*heads*m_blocks fills 80% of the SMs; more for a small decode batch.
    assert fa.num_splits_heuristic(200, 216, 8, 128) == 1
    assert fa.num_splits_heuristic(16, 216, 8, 128) > 1
    assert fa._heuristic_splits(1, 2, 64, 4096, 1) > 1


def to_pages(cache, page, seed):
    """A contiguous (b, cap, h, d) cache as shuffled pages and a block table."""
    b, cap = cache.shape[:2]
    nb = cap // page
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(b * nb + 2, generator=gen)
    pages = torch.randn(b * nb + 2, page, *cache.shape[2:], generator=gen).to(cache.dtype)
    table = order[: b * nb].view(b, nb).to(torch.int32)
    for i in range(b):
        for j in range(nb):
            pages[table[i, j]] = cache[i, j * page:(j + 1) * page]
    return pages, table


def from_pages(pages, table):
    return pages[table.long()].reshape(table.shape[0], -1, *pages.shape[2:])


@pytest.mark.parametrize("splits", [1, 3])
def test_paged_kvcache_append_and_output(splits):
    torch.manual_seed(13)
    case = dict(new=3, causal=True, rotary=True, interleaved=True)
    q, k_cache, v_cache, k, v, extra = kvcache_inputs(case)
    exp_out, exp_lse, exp_k, exp_v = kvcache_expected(q, k_cache, v_cache, k, v, **extra)
    kp, table = to_pages(k_cache, 32, 0)
    vp, _ = to_pages(v_cache, 32, 0)
    spare_k, spare_v = kp[table.flatten().long().max() + 1:].clone(), vp.clone()
    out, lse = fa.flash_attn_with_kvcache(
        q, kp, vp, k, v, rotary_cos=extra["cos"], rotary_sin=extra["sin"],
        cache_seqlens=extra["seqlens"], block_table=table, causal=True, num_splits=splits,
        return_softmax_lse=True)
    close(out, exp_out, TOL[torch.float32])
    close(lse, exp_lse, 1e-4)
    close(from_pages(kp, table), exp_k, 1e-6)
    assert torch.equal(from_pages(vp, table), exp_v)
    unused = sorted(set(range(kp.shape[0])) - set(table.flatten().tolist()))
    assert torch.equal(vp[unused], spare_v[unused])
    del spare_k


# ------------------------------------------------------------------ capabilities


def test_capabilities_claim_every_feature_and_entry():
    caps = fa.ATTN_HARNESS_CAPABILITIES
    assert set(caps["entries"]) == {"dense", "varlen", "kvcache"}
    from harness.backends import base

    assert set(base.FEATURES) - {"lastdim-strided"} <= set(caps["features"])
    contract = {"packed", "v-transposed", "dout-strided", "append", "rotary", "leftpad",
                "batch-idx", "splits", "alibi-per-batch"}
    assert contract <= set(caps["features"])
    known = {n for n in caps["features"] if n in base.FEATURES}
    base.Capabilities.from_mapping({**caps, "features": sorted(known)}, "fixture")


# ------------------------------------------------------------------ the zoo


def zoo_module(bug):
    return load(ZOO_DIR / f"{bug}.py", f"fa2_zoo_{bug}_under_test")


def test_zoo_has_one_file_per_bug():
    files = {p.stem for p in ZOO_DIR.glob("*.py")} - {"ZOO"}
    assert files == set(ZOO) == set(fa.BUGS)
    for bug in ZOO:
        assert set(ZOO[bug]) <= {"fwd", "bwd", "determinism"}


def _differs(a, b):
    a, b = a.double(), b.double()
    return bool(((a - b).abs() > 1e-3).any() or (torch.isnan(a) != torch.isnan(b)).any())


def _kv(module, case, **more):
    torch.manual_seed(20)
    q, k_cache, v_cache, k, v, extra = kvcache_inputs(case)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = call_kvcache(module, q, kc, vc, k, v, extra, **more)
    return out, lse, kc


def _paged_kv(module, **more):
    torch.manual_seed(21)
    q, k_cache, v_cache, k, v, extra = kvcache_inputs(dict(new=2, causal=True))
    kp, table = to_pages(k_cache, 32, 0)
    vp, _ = to_pages(v_cache, 32, 0)
    out = module.flash_attn_with_kvcache(q, kp, vp, k, v, cache_seqlens=extra["seqlens"],
                                         block_table=table, causal=True, **more)
    return out, kp


def _paged_varlen(module):
    torch.manual_seed(22)
    q, k, v, cu_q, cu_k = varlen_inputs([5, 9], [40, 70], grad=False)
    kp, table = paged([k[:40], k[40:]], 16, seed=2)
    vp, _ = paged([v[:40], v[40:]], 16, seed=2)
    return module.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 9, 70, block_table=table)


def _varlen_softcap_grads(module):
    torch.manual_seed(23)
    q, k, v, cu_q, cu_k = varlen_inputs([20, 30], [25, 30])
    out = module.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 30, 30, softcap=1.0)
    return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


def _qkvpacked_grads(module):
    torch.manual_seed(24)
    qkv = rand(2, 20, 3, 2, 16, grad=True)
    out = module.flash_attn_qkvpacked_func(qkv, causal=True)
    return torch.autograd.grad(out, qkv, torch.randn_like(out))


PROBES = {
    "append_one_late": lambda m: _kv(m, dict(new=3, causal=True)),
    "rotary_swapped": lambda m: _kv(m, dict(new=2, causal=True, rotary=True, interleaved=True)),
    "batch_idx_ignored": lambda m: _kv(m, dict(new=1, batch_idx=True)),
    "leftpad_ignored": lambda m: _kv(m, dict(new=1, leftpad=True)),
    "splits_lse_gqa": lambda m: _kv(m, dict(new=1, hq=8, hkv=2, sq=1), num_splits=3)[1:2],
    "splits_drop_later": lambda m: _kv(m, dict(new=1, hq=8, hkv=2, sq=1), num_splits=3),
    "paged_varlen_later": lambda m: (_paged_varlen(m),),
    "paged_kvcache_page0": lambda m: _paged_kv(m),
    "softcap_varlen_bwd": _varlen_softcap_grads,
    "qkvpacked_grad_strides": _qkvpacked_grads,
    "window_docstring": lambda m: (m.flash_attn_func(*(rand(1, s, 1, 16) for s in (3, 1, 1)),
                                                     window_size=(-1, 1)),),
    "alibi_causal_distance": lambda m: _kv(m, dict(new=2, causal=True, alibi=True))[1:2],
}


@pytest.mark.parametrize("bug", sorted(fa.BUGS))
def test_each_zoo_variant_is_a_real_bug(bug):
    """Correct and buggy module differ on the probe (the correct one is pinned above)."""
    torch.manual_seed(30)
    good = PROBES[bug](fa)
    torch.manual_seed(30)
    bad = PROBES[bug](zoo_module(bug))
    differs = [_differs(a, b) for a, b in zip(good, bad, strict=True)]
    assert any(differs), f"{bug} behaves like the original on its probe"


def test_zoo_variant_is_otherwise_correct():
    """A variant only misbehaves on its path: append_one_late is right without an append."""
    module = zoo_module("append_one_late")
    torch.manual_seed(31)
    q, k, v, alibi, kw = dense_inputs(dict(causal=True))
    assert torch.equal(module.flash_attn_func(q, k, v, **kw), fa.flash_attn_func(q, k, v, **kw))
