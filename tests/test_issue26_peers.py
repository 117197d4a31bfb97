"""The harness's semantics of issue 26's problems against the peers' own references.

Written here again, independently of ``harness.exact``, from the sources each cites:

* FA4's test reference, ``flash_attn/cute/testing.py attention_ref`` (Dao-AILab/flash-attention
  @ 0251105a): learnable sink (``logits_or_sinks_max``, ``normalizer + exp(sink - max)``, lse
  ``log(normalizer) + max``), a value head dim of its own, descales, ``sink_token_length`` in
  ``construct_local_mask`` (sinks spared the left bound only);
* CK's ``IsOutOfSinkBound`` (ROCm/rocm-libraries projects/composablekernel/include/ck_tile/ops/
  fmha/block/block_masking.hpp @ 07c6e390) with the coordinates of
  ``make_generic_attention_mask_coordinates_from_lr_window`` (bottom-right).

The oracle must agree with them to 1e-12 in float64 (the harness's reference is float64 on a
CPU), as it agrees with flash-attn 2's test reference (tests/test_flash_attn_ref.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.case import Case
from harness.exact import fp8
from harness.exact.inputs import make_inputs
from harness.exact.reference import reference
from harness.exact.scores import Params, relative, visible


def fa4_attention_ref(q, k, v, *, causal=False, window=(None, None), sink_token_length=0,
                      learnable_sink=None, softcap=0.0, scale=None, descales=None):
    """flash_attn/cute/testing.py ``attention_ref`` (dense, no padding masks), in float64:
    returns ``(out, lse)`` with lse ``(b, h, sq)``."""
    q, k, v = q.double(), k.double(), v.double()
    if descales is not None:
        qd, kd, vd = (d.double() for d in descales)
        g = q.shape[2] // v.shape[2]
        q = q * qd.repeat_interleave(g, dim=1)[:, None, :, None]
        k = k * kd[:, None, :, None]
        v = v * vd[:, None, :, None]
    if causal:
        window = (window[0], 0)
    sq, sk = q.shape[1], v.shape[1]
    g = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("bthd,bshd->bhts", q * scale, k)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    local = None
    if window[0] is not None or window[1] is not None:
        row = torch.arange(sq)[:, None]
        col = torch.arange(sk)[None, :]
        if window[0] is None:
            local = col > row + sk - sq + window[1]
        else:
            right = (col > sk) if window[1] is None else (
                col > torch.minimum(row + sk - sq + window[1], torch.tensor(sk)))
            local = right | ((col < row + sk - sq - window[0]) & (col >= sink_token_length))
        scores = scores.masked_fill(local, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    if learnable_sink is None:
        attention = torch.softmax(scores, dim=-1)
    else:
        top = torch.amax(scores, dim=-1, keepdim=True)
        sink = learnable_sink.double().reshape(-1, 1, 1)
        both = torch.maximum(sink, top)
        unnormalized = torch.exp(scores - both)
        normalizer = unnormalized.sum(dim=-1, keepdim=True) + torch.exp(sink - both)
        lse = torch.log(normalizer.squeeze(-1)) + both.squeeze(-1)
        attention = unnormalized / normalizer
    if local is not None:
        attention = attention.masked_fill(torch.all(local, dim=-1, keepdim=True), 0.0)
    out = torch.einsum("bhts,bshd->bthd", attention, v)
    return out, lse


def assert_agree(ours, out, lse):
    assert torch.allclose(ours.out, out, rtol=0, atol=1e-12), (ours.out - out).abs().max()
    finite = torch.isfinite(lse)
    assert torch.equal(torch.isfinite(ours.lse), finite)
    assert torch.allclose(ours.lse[finite], lse[finite], rtol=0, atol=1e-12)


CASES = {
    "sink": dict(learnable_sink=True),
    "sink-causal-gqa": dict(learnable_sink=True, causal=True, heads_q=6, heads_kv=2),
    "sink-rows-without-keys": dict(learnable_sink=True, causal=True, seqlen_q=40, seqlen_k=9),
    "sink-softcap": dict(learnable_sink=True, softcap=2.0, scale=0.4),
    "mla-192-128": dict(head_dim=48, head_dim_v=32, causal=True),
    "mla-sink": dict(head_dim=40, head_dim_v=24, learnable_sink=True),
    "sink-tokens-window": dict(causal=True, window=(5, 0), sink_tokens=3),
    "sink-tokens-q>k": dict(window=(4, 2), sink_tokens=2, seqlen_q=30, seqlen_k=20),
    "both-sinks": dict(causal=True, window=(6, 0), sink_tokens=4, learnable_sink=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_agrees_with_fa4_attention_ref(name):
    fields = dict(batch=2, seqlen_q=17, seqlen_k=29, heads_q=4, head_dim=32, dtype="float32")
    fields.update(CASES[name])
    case = Case(**fields)
    inputs = make_inputs(case, seed=5)
    window = (None, None)
    if case.window != (-1, -1):
        window = tuple(None if x < 0 else x for x in case.window)
    out, lse = fa4_attention_ref(inputs.q, inputs.k, inputs.v, causal=case.causal,
                                 window=window, sink_token_length=case.sink_tokens,
                                 learnable_sink=inputs.learnable_sink, softcap=case.softcap,
                                 scale=case.scale)
    assert_agree(reference(inputs), out, lse)


def test_fp8_reference_agrees_with_fa4_descales_and_value_head_dim():
    case = Case(batch=2, seqlen_q=9, seqlen_k=21, heads_q=4, heads_kv=2, head_dim=32,
                head_dim_v=16, dtype="float8_e4m3fn", fp8_recipe="per-head", learnable_sink=True)
    inputs = fp8.make_fp8_inputs(case, seed=2)
    out, lse = fa4_attention_ref(inputs.q.double(), inputs.k.double(), inputs.v.double(),
                                 learnable_sink=inputs.learnable_sink,
                                 descales=(inputs.q_descale, inputs.k_descale, inputs.v_descale))
    assert_agree(fp8.fp8_reference(inputs), out, lse)


def test_fp8_kv_cache_reference_is_exact_on_the_dequantised_cache():
    case = Case(entry="kvcache", batch=2, seqlen_q=3, seqlen_k=40, seqlens_k=(40, 17),
                heads_q=4, heads_kv=2, head_dim=32, dtype="bfloat16", kv_dtype="float8_e4m3fn",
                fp8_recipe="per-head", causal=True)
    inputs = fp8.make_fp8_inputs(case, seed=1)
    assert inputs.q.dtype == torch.bfloat16 and inputs.k.dtype == torch.float8_e4m3fn
    assert inputs.q_descale is None and inputs.k_descale.shape == (2, 2)
    ref = fp8.fp8_reference(inputs)
    for b, n in enumerate(case.seqlens_k):
        k = inputs.k[b:b + 1, :n].double() * inputs.k_descale[b].double()[None, None, :, None]
        v = inputs.v[b:b + 1, :n].double() * inputs.v_descale[b].double()[None, None, :, None]
        out, lse = fa4_attention_ref(inputs.q[b:b + 1].double(), k, v, causal=True)
        assert torch.allclose(ref.out[b:b + 1], out, rtol=0, atol=1e-12)
        assert torch.allclose(ref.lse[b:b + 1], lse, rtol=0, atol=1e-12)


def ck_is_out_of_sink_bound(i_y, i_x, *, left, right, sink, sq, sk):
    """CK's ``GenericAttentionMask<true, true>::IsOutOfSinkBound`` with the bottom-right
    coordinates of ``make_generic_attention_mask_coordinates_from_lr_window``."""
    left = sk - 1 if left < 0 else left
    right = sq - 1 if right < 0 else right
    x = 1 + right + (sk - sq)
    y = 1 + left + (sq - sk)
    x_start = -y + i_y + 1
    x_end = min(i_y + x, sk)
    if i_x < sink and i_x < i_y + x and y < sq and i_y < sk:
        return False
    return i_x < x_start or i_x >= x_end


@pytest.mark.parametrize(("sq", "sk", "left", "right", "sink"), [
    (8, 20, 3, 0, 2), (1, 64, 7, 0, 4), (12, 12, 2, 0, 3), (5, 30, 4, 3, 6), (16, 40, 0, 0, 1),
    (20, 12, 3, 0, 2),
])
def test_sink_token_rule_is_cks_on_every_row_it_defines(sq, sk, left, right, sink):
    """Query rows ``i < seqlen_k``: identical masks. CK also drops the sink for rows ``i >=
    seqlen_k`` (``i_y < x_total``), rows that exist only when seqlen_q > seqlen_k; the harness
    does not model that corner (harness.exact.scores)."""
    p = Params(scale=1.0, left=left, right=right, sink_tokens=sink)
    ours = visible(relative(torch.arange(sq), 0, sk, sk - sq), p)
    for i in range(min(sq, sk)):
        for j in range(sk):
            theirs = not ck_is_out_of_sink_bound(i, j, left=left, right=right, sink=sink,
                                                 sq=sq, sk=sk)
            assert bool(ours[i, j]) == theirs, (i, j)


def test_causal_rows_do_not_see_sink_tokens_after_them():
    """A row sees a sink token only at or before its own bottom-right position (FA4's
    construct_local_mask and CK agree); AITER's test reference would show it earlier."""
    p = Params(scale=1.0, left=1, right=0, sink_tokens=4)
    seen = visible(relative(torch.arange(6), 0, 6, 0), p)
    assert seen[0].tolist() == [True, False, False, False, False, False]
    assert seen[5].tolist() == [True, True, True, True, True, True]
    assert seen[4, :4].tolist() == [True, True, True, True]
