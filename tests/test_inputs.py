"""Inputs: seeded, identical everywhere, strided views with poisoned gaps, correct paging."""

from __future__ import annotations

import math

import torch

from harness.case import Case
from harness.exact.inputs import alibi_slopes, derive_seed, make_inputs


def test_same_seed_same_values_other_seed_other_values():
    case = Case(batch=2, seqlen_q=5, seqlen_k=7, heads_q=4, heads_kv=2, head_dim=8)
    a, b = make_inputs(case, seed=0), make_inputs(case, seed=0)
    c = make_inputs(case, seed=1)
    for name in ("q", "k", "v", "dout"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))
    assert derive_seed(0, case.case_id) == derive_seed(0, case.case_id)


def test_strided_layout_is_a_view_with_nan_gaps():
    case = Case(batch=2, seqlen_q=5, heads_q=3, head_dim=8, layout="strided")
    x = make_inputs(case, seed=0)
    assert not x.q.is_contiguous() and x.q.stride(-1) == 1
    assert torch.isfinite(x.q).all()
    storage = torch.tensor([], dtype=x.q.dtype).set_(x.q.untyped_storage())
    assert torch.isnan(storage).sum() > 0  # a kernel that ignores strides reads NaN
    g = x.with_grad()
    assert g.q.stride() == x.q.stride() and g.q.requires_grad and torch.equal(g.q.detach(), x.q)


def test_paged_cache_holds_the_logical_cache_in_shuffled_pages():
    case = Case(entry="kvcache", batch=3, seqlen_q=2, seqlen_k=40, seqlens_k=[40, 17, 0],
                heads_q=2, head_dim=4, paged_block_size=16)
    x = make_inputs(case, seed=0)
    block = case.paged_block_size
    assert x.block_table.shape == (3, 3)
    assert sorted(x.block_table.flatten().tolist()) != list(range(9))  # shuffled
    for b in range(3):
        gathered = x.k_pages[x.block_table[b].long()].reshape(-1, 2, 4)[: case.seqlen_k]
        n = case.seqlens_k[b]
        assert torch.equal(gathered[:n], x.k[b, :n])
        assert gathered[n:].isnan().all() and x.k[b, n:].isnan().all()
    assert x.cache_seqlens.tolist() == [40, 17, 0]
    # past each length: NaN, which reaches the output of a kernel that reads it
    assert x.k[1, 17:].isnan().all()
    assert x.k_pages.shape == (3 * math.ceil(40 / block) + 2, block, 2, 4)


def test_varlen_packs_sequences_with_cu_seqlens():
    case = Case(entry="varlen", batch=3, seqlens_q=[2, 0, 5], seqlens_k=[1, 4, 3], head_dim=8)
    x = make_inputs(case, seed=0)
    assert x.q.shape == (7, 1, 8) and x.k.shape == (8, 1, 8)
    assert x.cu_seqlens_q.tolist() == [0, 2, 2, 7] and x.cu_seqlens_q.dtype == torch.int32
    assert [p.q_like(x.q).shape[1] for p in x.sequences()] == [2, 0, 5]


def test_alibi_slopes_are_the_standard_ones():
    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    assert alibi_slopes(4) == [2.0 ** (-2 * (i + 1)) for i in range(4)]
    six = alibi_slopes(6)
    assert six[:4] == alibi_slopes(4) and six[4:] == alibi_slopes(8)[0::2][:2]
