"""The pure-PyTorch FlashInfer fixture (tests/fixtures/flashinfer_ref.py), checked against a
dense float64 computation written here from FlashInfer's documented semantics (base-2 lse,
bottom-right causal, window_left, ALiBi with the raw query index), and its refusals."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

REF = Path(__file__).resolve().parent / "fixtures" / "flashinfer_ref.py"
_spec = importlib.util.spec_from_file_location("flashinfer_ref_under_test", REF)
fi = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fi
_spec.loader.exec_module(fi)


def exact(q, k, v, *, scale, causal=False, window_left=-1, alibi=None, sinks=None):
    """q [qo, Hq, D], k/v [kv, Hkv, D] -> out [qo, Hq, Dv], lse base 2 [qo, Hq]."""
    qo, hq = q.shape[:2]
    kv, hkv = k.shape[:2]
    g = hq // hkv
    s = torch.einsum("ihd,jhd->hij", q.double(), k.double().repeat_interleave(g, 1)) * scale
    i = torch.arange(qo)[:, None]
    j = torch.arange(kv)[None, :]
    if alibi is not None:
        s = s + alibi.double()[:, None, None] * (j - i)
    seen = torch.ones(qo, kv, dtype=torch.bool)
    if causal:
        seen &= j + qo <= kv + i
    if window_left >= 0:
        seen &= j + qo + window_left >= kv + i
    s = s.masked_fill(~seen, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.double()[:, None, None].expand(hq, qo, 1)], -1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)[..., :kv]
    out = torch.einsum("hij,jhd->ihd", p, v.double().repeat_interleave(g, 1))
    return out, (lse / math.log(2.0)).t()


def rand(*shape):
    return torch.randn(*shape).to(torch.float16)


def test_single_prefill_base2_lse_tokens_by_heads_and_hnd():
    torch.manual_seed(0)
    q, k, v = rand(20, 4, 64), rand(50, 2, 64), rand(50, 2, 64)
    out, lse = fi.single_prefill_with_kv_cache(q, k, v, causal=True, window_left=9,
                                               return_lse=True)
    want, want_lse = exact(q, k, v, scale=0.125, causal=True, window_left=9)
    assert lse.shape == (20, 4) and (lse.double() - want_lse).abs().max() < 1e-4
    assert (out.double() - want).abs().max() < 3e-3
    hnd = fi.single_prefill_with_kv_cache(q, k.transpose(0, 1), v.transpose(0, 1), causal=True,
                                          window_left=9, kv_layout="HND")
    assert torch.equal(hnd, out)
    with pytest.raises(RuntimeError, match="kv_len must be greater than or equal to qo_len"):
        fi.single_prefill_with_kv_cache(q, k[:10], v[:10], causal=True)


def test_alibi_uses_fixed_slopes_and_the_raw_query_index():
    torch.manual_seed(1)
    q, k, v = rand(6, 8, 64), rand(30, 8, 64), rand(30, 8, 64)
    slopes = fi.get_alibi_slopes(8)
    assert slopes[0] == pytest.approx(2 ** -1) and slopes[-1] == pytest.approx(2 ** -8)
    out, lse = fi.single_prefill_with_kv_cache(q, k, v, pos_encoding_mode="ALIBI",
                                               return_lse=True)
    want, want_lse = exact(q, k, v, scale=0.125, alibi=slopes)
    assert (lse.double() - want_lse).abs().max() < 1e-4


def test_paged_batch_prefill_and_decode_with_sinks_and_fp8_scales():
    torch.manual_seed(2)
    pages = torch.randn(6, 2, 4, 2, 64).to(torch.float16)  # [pages, 2, page, H, D] one tensor
    indptr = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    indices = torch.tensor([5, 1, 3, 0, 2], dtype=torch.int32)
    last = torch.tensor([2, 0, 4], dtype=torch.int32)  # lengths 10, 0, 8
    q = rand(3, 4, 64)
    sinks = torch.tensor([0.5, 1.0, -2.0, 3.0])
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(torch.empty(8), kv_layout="NHD")
    wrapper.plan(indptr, indices, last, 4, 2, 64, 4, q_data_type=torch.float16)
    out, lse = wrapper.run(q, pages, return_lse=True, sinks=sinks)
    first = indices[:3].long()  # request 0: three pages, 10 keys
    keys, values = (pages[first, i].flatten(0, 1)[:10] for i in (0, 1))
    want, want_lse = exact(q[:1], keys, values, scale=0.125, sinks=sinks)
    assert (lse[0].double() - want_lse[0]).abs().max() < 1e-4
    assert (out[0].double() - want[0]).abs().max() < 3e-3
    assert torch.equal(out[1].float(), torch.zeros(4, 64)) and (lse[1] * math.log(2) == sinks).all()
    fp8 = pages.to(torch.float8_e4m3fn)
    prefill = fi.BatchPrefillWithPagedKVCacheWrapper(torch.empty(8))
    prefill.plan(torch.tensor([0, 1, 2, 3], dtype=torch.int32), indptr, indices, last, 4, 2, 64,
                 4, q_data_type=torch.float16, kv_data_type=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="does not match"):
        prefill.run(q, pages, k_scale=2.0)
    out8 = prefill.run(q, fp8, k_scale=2.0, v_scale=0.5)
    keys8, values8 = (fp8[first, i].flatten(0, 1)[:10].float() for i in (0, 1))
    want8, _ = exact(q[:1], keys8, values8, scale=0.25)
    assert (out8[0].double() - 0.5 * want8[0]).abs().max() < 3e-3


def test_cuda_core_decode_refuses_gqa_ratios_it_was_not_built_for():
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(torch.empty(8))
    args = (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
            torch.tensor([3], dtype=torch.int32), 16, 1, 64, 4)
    with pytest.raises(RuntimeError, match="Unsupported group_size: 16"):
        wrapper.plan(*args)
    fi.BatchDecodeWithPagedKVCacheWrapper(torch.empty(8), use_tensor_cores=True).plan(*args)
    with pytest.raises(RuntimeError, match="Unsupported group_size: 5"):
        fi.single_decode_with_kv_cache(rand(5, 64), rand(9, 1, 64), rand(9, 1, 64))
