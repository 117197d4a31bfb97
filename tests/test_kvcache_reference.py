"""The kv-cache data model and reference (issue 13): appends, rotary, leftpad, batch-idx, paged
caches (kvcache and varlen), per-batch ALiBi slopes, the window normalisation of flash-attn's
C++ layer, and the causal-ALiBi lse convention.

The reference is checked against ``dense_kvcache`` below, an independent float64 computation
written the way flash-attn's ``test_flash_attn_kvcache`` builds its expectation (``k_cache_ref``
with ``update_mask``, ``key_padding_mask``, ``key_leftpad`` column shifts, the local mask of
``construct_local_mask``, ``apply_rotary_emb_torch``'s ``rotate_half``), with the window put
through the normalisation of csrc/flash_attn/flash_api.cpp as written there (both fills).
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.case import Case
from harness.errors import InvalidCase
from harness.exact.inputs import make_inputs
from harness.exact.kvcache import convert_lse, lse_alibi_shift, resolve_cache
from harness.exact.reference import Params, baseline, cache_after, reference

# ----------------------------------------------------------------- independent computation


def flash_api_window(left: int, right: int, causal: bool, seqlen_k: int) -> tuple[int, int]:
    """flash_api.cpp, literally: causal sets right = 0; a side >= seqlen_k becomes -1; then
    set_params_fprop gives a -1 side with a bounded partner the value seqlen_k."""
    if causal:
        right = 0
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if left < 0 and right >= 0:
        left = seqlen_k
    if left >= 0 and right < 0:
        right = seqlen_k
    return left, right


def rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotary_torch(x, cos, sin, offsets, interleaved: bool, same_position: bool = False):
    """apply_rotary_emb_torch's formula (x * cos + rotate_half(x) * sin) at rows
    ``offsets[b] + i`` (or ``offsets[b]`` for every i), in float64, rounded to x's dtype."""
    b, s = x.shape[:2]
    ro = cos.shape[-1] * 2
    out = x.to(torch.float64).clone()
    for bi in range(b):
        idx = torch.full((s,), int(offsets[bi])) if same_position else int(offsets[bi]) + \
            torch.arange(s)
        c, sn = cos[idx].double(), sin[idx].double()
        if interleaved:
            c = c.repeat_interleave(2, dim=-1)
            sn = sn.repeat_interleave(2, dim=-1)
        else:
            c, sn = torch.cat((c, c), dim=-1), torch.cat((sn, sn), dim=-1)
        xr = out[bi, :, :, :ro]
        out[bi, :, :, :ro] = xr * c[:, None] + rotate_half(xr, interleaved) * sn[:, None]
    return out.to(x.dtype)


def logical_from_pages(pages, table, capacity):
    rows = [torch.cat([pages[int(p)] for p in row]) for row in table]
    return torch.stack(rows)[:, :capacity]


def dense_kvcache(inputs):
    """out, lse (float64, harness convention) of a kv-cache case, computed densely."""
    case = inputs.case
    b_, sq, hq, d = inputs.q.shape
    hkv = case.heads_kv
    cap = case.seqlen_k
    lens = inputs.cache_seqlens.long()
    idx = (inputs.cache_batch_idx.long() if inputs.cache_batch_idx is not None
           else torch.arange(b_))
    if case.paged_block_size:
        k_cache = logical_from_pages(inputs.k_pages, inputs.block_table, cap)
        v_cache = logical_from_pages(inputs.v_pages, inputs.block_table, cap)
    else:
        k_cache, v_cache = inputs.k, inputs.v
    k_ref, v_ref = k_cache[idx].clone(), v_cache[idx].clone()
    q = inputs.q
    local = case.window != (-1, -1) and not (case.causal and case.window[0] == -1)
    if case.rotary_dim:
        moving = case.has_mask  # the kernel's Is_causal || Is_local
        q = rotary_torch(q, inputs.rotary_cos, inputs.rotary_sin, lens,
                         case.rotary_interleaved, same_position=not moving)
        k_new = rotary_torch(inputs.k_new, inputs.rotary_cos, inputs.rotary_sin, lens,
                             case.rotary_interleaved)
    else:
        k_new = inputs.k_new
    arange = torch.arange(cap)[None, :]
    n_new = case.seqlen_new
    if n_new:
        update = (lens[:, None] <= arange) & (arange < lens[:, None] + n_new)
        k_ref[update] = k_new.reshape(-1, hkv, d)
        v_ref[update] = inputs.v_new.reshape(-1, hkv, d)
    key_valid = arange < lens[:, None] + n_new
    leftpad = (inputs.cache_leftpad.long() if inputs.cache_leftpad is not None
               else torch.zeros(b_, dtype=torch.long))
    key_valid &= arange >= leftpad[:, None]
    group = hq // hkv
    # The padding a kernel must not read is NaN (harness.exact.padding): keep it out of the
    # products here too, as a kernel that reads only valid keys does.
    k_ref = k_ref.masked_fill(~key_valid[:, :, None, None], 0.0)
    v_ref = v_ref.masked_fill(~key_valid[:, :, None, None], 0.0)
    kr = k_ref.double().repeat_interleave(group, dim=2)
    vr = v_ref.double().repeat_interleave(group, dim=2)
    scale = case.scale or 1 / math.sqrt(d)
    scores = torch.einsum("bthd,bshd->bhts", q.double() * scale, kr)
    if case.softcap:
        scores = torch.tanh(scores / case.softcap) * case.softcap
    col = torch.where(arange >= leftpad[:, None], arange - leftpad[:, None], 2 ** 32)
    col = col[:, None, None, :]  # (b, 1, 1, s)
    row = torch.arange(sq)[None, None, :, None]
    sk = key_valid.sum(-1)[:, None, None, None]
    if case.alibi:
        slopes = inputs.alibi_slopes.double()
        slopes = slopes[None, :] if slopes.dim() == 1 else slopes
        scores = scores - slopes[:, :, None, None] * (row + sk - sq - col).abs()
    scores = scores.masked_fill(~key_valid[:, None, None, :], -math.inf)
    if case.causal or local:
        left, right = flash_api_window(*case.window, case.causal, case.window_seqlen_k)
        hide = torch.zeros_like(scores, dtype=torch.bool)
        if right >= 0:
            hide |= col > row + sk - sq + right
        if left >= 0:
            hide |= col < row + sk - sq - left
        scores = scores.masked_fill(hide, -math.inf)
    lse = torch.logsumexp(scores, -1)
    prob = torch.softmax(scores, -1).nan_to_num(0.0)
    out = torch.einsum("bhts,bshd->bthd", prob, vr)
    return out, lse


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN included (the padding a kernel must not read is NaN)."""
    return (a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def assert_matches(ref, out, lse):
    assert torch.allclose(ref.out, out, atol=1e-10, rtol=0), (ref.out - out).abs().max()
    finite = torch.isfinite(lse)
    assert torch.equal(torch.isfinite(ref.lse), finite)
    assert torch.allclose(ref.lse[finite], lse[finite], atol=1e-10, rtol=0)


KV = dict(entry="kvcache", batch=3, heads_q=4, heads_kv=2, head_dim=32, seqlen_k=96,
          seqlens_k=(10, 0, 41), dtype="float16")
CASES = {
    "append": dict(seqlen_q=5, seqlen_new=5),
    "append-causal": dict(seqlen_q=5, seqlen_new=3, causal=True),
    "rotary-neox-causal": dict(seqlen_q=4, seqlen_new=4, rotary_dim=16, causal=True),
    "rotary-interleaved": dict(seqlen_q=4, seqlen_new=4, rotary_dim=32, rotary_interleaved=True),
    "rotary-local": dict(seqlen_q=3, seqlen_new=2, rotary_dim=16, window=(7, 2)),
    "leftpad": dict(seqlen_q=3, seqlen_new=2, cache_leftpad=(4, 0, 40), causal=True),
    "leftpad-rotary-alibi": dict(seqlen_q=3, seqlen_new=3, cache_leftpad=(9, 0, 17),
                                 rotary_dim=16, alibi=True, alibi_slopes="random-per-batch"),
    "batch-idx": dict(seqlen_q=2, seqlen_new=2, cache_batch_idx=True, causal=True),
    "batch-idx-leftpad-window": dict(seqlen_q=6, seqlen_new=1, cache_batch_idx=True,
                                     cache_leftpad=(1, 0, 5), window=(3, 0)),
    "paged-append-rotary": dict(seqlen_q=4, seqlen_new=4, rotary_dim=16, causal=True,
                                paged_block_size=16),
    "paged-batch-idx": dict(seqlen_q=1, seqlen_new=1, cache_batch_idx=True,
                            paged_block_size=32, alibi=True, alibi_slopes="random"),
    "gqa-decode-splits": dict(seqlen_q=1, seqlen_new=1, num_splits=4, softcap=5.0),
    "no-append-leftpad": dict(seqlen_q=2, cache_leftpad=(10, 0, 3)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_dense_kvcache(name):
    case = Case(**KV, **CASES[name])
    inputs = make_inputs(case, seed=3)
    out, lse = dense_kvcache(inputs)
    assert_matches(reference(inputs), out, lse)


def test_baseline_takes_every_cache_feature():
    case = Case(**KV, **CASES["leftpad-rotary-alibi"])
    inputs = make_inputs(case)
    ref, base = reference(inputs), baseline(inputs)
    assert base.out.dtype == torch.float16
    err = (base.out.double() - ref.out).abs().max().item()
    assert 0 < err < 1e-2


def test_rotary_style_and_positions_matter():
    """Swapping the rotary convention, or rotating q at one position when causal, changes the
    result: a port that gets either wrong cannot pass."""
    case = Case(**KV, **CASES["rotary-neox-causal"])
    inputs = make_inputs(case)
    right = reference(inputs).out
    swapped = inputs.clone()
    swapped.case = case.replace(rotary_interleaved=True)
    assert (reference(swapped).out - right).abs().max() > 1e-2
    non_causal = inputs.clone()
    non_causal.case = case.replace(causal=False)
    out, _ = dense_kvcache(non_causal)
    assert_matches(reference(non_causal), out, dense_kvcache(non_causal)[1])


@pytest.mark.parametrize("name", ["append", "rotary-interleaved", "batch-idx",
                                  "paged-append-rotary", "paged-batch-idx"])
def test_cache_after_is_old_cache_plus_new_rows(name):
    case = Case(**KV, **CASES[name])
    inputs = make_inputs(case, seed=1)
    before = inputs.clone()
    k_after, v_after = cache_after(inputs)
    # cache_after never writes into the inputs
    assert same(inputs.k, before.k)
    if case.paged_block_size:
        assert same(inputs.k_pages, before.k_pages)
        k_log = logical_from_pages(k_after, inputs.block_table, case.seqlen_k)
        v_log = logical_from_pages(v_after, inputs.block_table, case.seqlen_k)
        k_old = logical_from_pages(inputs.k_pages, inputs.block_table, case.seqlen_k)
        v_old = logical_from_pages(inputs.v_pages, inputs.block_table, case.seqlen_k)
        assert k_after.shape == inputs.k_pages.shape
    else:
        k_log, v_log, k_old, v_old = k_after, v_after, inputs.k, inputs.v
    rows = (inputs.cache_batch_idx.tolist() if inputs.cache_batch_idx is not None
            else list(range(case.batch)))
    written = torch.zeros(k_old.shape[:2], dtype=torch.bool)
    lens = inputs.cache_seqlens.tolist()
    k_new = inputs.k_new
    if case.rotary_dim:
        k_new = rotary_torch(inputs.k_new, inputs.rotary_cos, inputs.rotary_sin, lens,
                             case.rotary_interleaved)
    for b, row in enumerate(rows):
        sl = slice(lens[b], lens[b] + case.seqlen_new)
        written[row, sl] = True
        assert same(k_log[row, sl], k_new[b])
        assert same(v_log[row, sl], inputs.v_new[b])
    assert same(k_log[~written], k_old[~written])
    assert same(v_log[~written], v_old[~written])
    if case.paged_block_size:  # pages outside the table (spares) unchanged too
        used = set(inputs.block_table.flatten().tolist())
        spare = [p for p in range(k_after.shape[0]) if p not in used]
        assert spare and same(k_after[spare], inputs.k_pages[spare])


def test_rotated_keys_are_stored_rotated():
    case = Case(**KV, **CASES["rotary-interleaved"])
    inputs = make_inputs(case)
    k_after, _ = cache_after(inputs)
    row, start = 0, int(inputs.cache_seqlens[0])
    assert not torch.equal(k_after[row, start:start + case.seqlen_new], inputs.k_new[0])


def test_nan_sits_in_every_slot_a_kernel_must_not_read():
    case = Case(**KV, seqlen_q=2, seqlen_new=2, cache_batch_idx=True, cache_leftpad=(4, 0, 9))
    inputs = make_inputs(case)
    rows = inputs.cache_batch_idx.tolist()
    assert inputs.k.shape[0] == 2 * case.batch and len(set(rows)) == case.batch
    unused = [r for r in range(inputs.k.shape[0]) if r not in rows]
    for t in (inputs.k, inputs.v):
        assert t[unused].isnan().all()  # rows no sequence uses
        assert t[rows[0], :4].isnan().all()  # before the leftpad
        assert t[rows[2], 41:].isnan().all()  # past the cache length
        assert not t[rows[2], 9:41].isnan().any()  # the keys themselves
    assert set(inputs.padding) == {"cache-tail", "leftpad", "cache-rows"}


def test_inputs_clone_is_deep_and_keeps_geometry():
    case = Case(**KV, seqlen_q=2, seqlen_new=2, layout="strided")
    inputs = make_inputs(case)
    copy = inputs.clone()
    for name in ("q", "k", "v", "k_new", "cache_seqlens"):
        a, b = getattr(inputs, name), getattr(copy, name)
        assert a.stride() == b.stride() and same(a, b)
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    copy.k.fill_(0)
    assert inputs.k.nan_to_num(0.0).abs().sum() > 0


def test_paged_varlen_pages_hold_each_sequence():
    case = Case(entry="varlen", batch=3, seqlens_q=(3, 0, 5), seqlens_k=(7, 2, 40), heads_q=2,
                paged_block_size=16)
    inputs = make_inputs(case)
    cu = inputs.cu_seqlens_k.tolist()
    assert inputs.block_table.shape == (3, 3)
    for b in range(case.batch):
        logical = torch.cat([inputs.k_pages[int(p)] for p in inputs.block_table[b]])
        assert torch.equal(logical[: cu[b + 1] - cu[b]], inputs.k[cu[b]:cu[b + 1]])
        assert logical[cu[b + 1] - cu[b]:].isnan().all()  # the tail of its pages
    assert "paged" in case.features
    spare = set(range(inputs.k_pages.shape[0])) - set(inputs.block_table.flatten().tolist())
    assert len(spare) == 2 and all(inputs.k_pages[p].isnan().all() for p in spare)


def test_per_batch_alibi_slopes_follow_each_sequence():
    case = Case(batch=2, seqlen_q=5, seqlen_k=9, heads_q=2, alibi=True,
                alibi_slopes="random-per-batch", causal=True, dtype="float32")
    inputs = make_inputs(case)
    assert inputs.alibi_slopes.shape == (2, 2)
    assert inputs.alibi_slopes.min() >= 0 and inputs.alibi_slopes.max() <= 0.3
    ref = reference(inputs)
    for b in range(2):
        one = make_inputs(case.replace(batch=1, alibi_slopes="standard"))
        one.q, one.k, one.v = inputs.q[b:b + 1], inputs.k[b:b + 1], inputs.v[b:b + 1]
        one.alibi_slopes = inputs.alibi_slopes[b]
        assert torch.allclose(reference(one).out[0], ref.out[b], atol=1e-12)


# ------------------------------------------------------------------- window normalisation


def test_q3_k1_window_minus1_1_runs_unmasked():
    case = Case(seqlen_q=3, seqlen_k=1, window=(-1, 1), dtype="float32")
    assert case.kernel_window == (-1, -1) and case.mask_window == (-1, -1)
    assert case.docstring_differs
    assert not case.rows_without_keys  # the docstring rule would leave row 0 without keys
    inputs = make_inputs(case)
    masked = reference(inputs)
    assert torch.allclose(masked.out, reference(inputs, params=Params.of(
        case.replace(window=(-1, -1)))).out)
    literal = reference(inputs, params=Params(scale=Params.of(case).scale, left=-1, right=1))
    assert torch.all(literal.out[0, 0] == 0) and torch.any(masked.out[0, 0] != 0)


def test_q300_k100_window_31_minus1_differs_from_the_docstring():
    case = Case(seqlen_q=300, seqlen_k=100, heads_q=8, head_dim=64, window=(31, -1),
                dtype="float32")
    assert case.kernel_window == (31, 100) and case.mask_window == (31, 100)
    assert case.docstring_differs and case.rows_without_keys
    inputs = make_inputs(case)
    kernel = reference(inputs).out
    literal = reference(inputs, params=Params(scale=Params.of(case).scale, left=31, right=-1)).out
    differ = int((kernel != literal).sum())
    assert differ > 0.5 * kernel.numel()
    out, lse = dense_like(inputs)
    assert torch.allclose(kernel, out, atol=1e-10)


def dense_like(inputs):
    """A dense case through dense_kvcache (a full cache, no appends)."""
    kv = inputs.case.replace(entry="kvcache")
    other = make_inputs(kv)
    other.q, other.k, other.v = inputs.q, inputs.k, inputs.v
    other.cache_seqlens = torch.full((kv.batch,), kv.seqlen_k, dtype=torch.int32)
    return dense_kvcache(other)


@pytest.mark.parametrize("window,causal,sq,sk,differs", [
    ((-1, 1), False, 3, 1, True),      # right >= sk -> unmasked
    ((-1, 0), False, 3, 1, False),     # right < sk: kept
    ((1, 0), False, 3, 1, False),      # left >= sk -> -1, then filled: the same mask
    ((5, -1), False, 8, 6, True),      # right -1 -> sk=6 hides keys for q8 > k6 + 1
    ((5, -1), False, 7, 6, False),     # q7 = k6 + 1: the fill hides nothing
    ((6, 0), True, 4, 6, False),       # causal, left >= sk: plain causal
    ((2, -1), False, 4, 6, False),     # q <= k: the fill hides nothing
    ((10, 10), False, 20, 10, True),   # both >= sk -> unmasked, docstring hid rows
])
def test_normalisation_both_sides(window, causal, sq, sk, differs):
    case = Case(seqlen_q=sq, seqlen_k=sk, window=window, causal=causal, dtype="float32")
    kernel = flash_api_window(*window, causal, sk)
    # mask_window is the kernel's window up to sides that hide nothing
    inputs = make_inputs(case)
    scale = Params.of(case).scale
    ours = reference(inputs).out
    theirs = reference(inputs, params=Params(scale=scale, left=kernel[0], right=kernel[1])).out
    assert torch.equal(ours, theirs)
    assert case.docstring_differs is differs
    literal = reference(inputs, params=Params(scale=scale, left=case.docstring_window[0],
                                              right=case.docstring_window[1])).out
    assert (not torch.equal(literal, ours)) is differs


def test_normalisation_uses_the_original_seqlen_k():
    # varlen: max_seqlen_k; kvcache: the capacity, paged: max_num_blocks_per_seq * block
    varlen = Case(entry="varlen", batch=2, seqlens_q=(3, 3), seqlens_k=(1, 4), window=(-1, 3))
    assert varlen.window_seqlen_k == 4 and varlen.mask_window == (-1, 3)
    kv = Case(entry="kvcache", seqlen_q=1, seqlen_k=100, seqlens_k=(5,), window=(50, 0))
    assert kv.mask_window == (50, 0)  # 50 < capacity 100, though >= the 5 cached keys
    paged = kv.replace(seqlen_k=90, paged_block_size=64, window=(100, 0))
    assert paged.window_seqlen_k == 128 and paged.mask_window == (100, 0)
    assert kv.replace(window=(100, 0)).mask_window == (-1, 0)


# ------------------------------------------------------------------------ lse conventions


@pytest.mark.parametrize("fields", [
    dict(causal=True),
    dict(window=(-1, 0)),
    dict(causal=True, window=(40, 0)),      # left >= seqlen_k: the kernel's causal mode
    dict(entry="varlen", batch=2, seqlens_q=(5, 3), seqlens_k=(9, 2), causal=True,
         alibi_slopes="random-per-batch"),
])
def test_flash_attn_lse_convention_is_the_plus_slope_col_bias(fields):
    base = dict(seqlen_q=5, seqlen_k=9, heads_q=2, alibi=True, dtype="float32",
                alibi_slopes="random")
    case = Case(**{**base, **fields})
    assert case.alibi_causal_mode
    inputs = make_inputs(case)
    ours = reference(inputs)
    theirs = reference(inputs, lse_convention="flash-attn")
    assert torch.equal(ours.out, theirs.out)
    shift = lse_alibi_shift(inputs)
    finite = torch.isfinite(ours.lse)
    assert torch.allclose((theirs.lse - ours.lse)[finite], shift[finite], atol=1e-12)
    assert torch.all(theirs.lse[~finite] == math.inf)
    back = convert_lse(theirs.lse, inputs, "flash-attn", "harness")
    assert torch.allclose(back[finite], ours.lse[finite], atol=1e-12)
    assert torch.all(back[~finite] == -math.inf)
    if case.entry == "dense":  # independently: softmax with +slope * col has this lse
        q, k = inputs.q.double(), inputs.k.double()
        s = torch.einsum("bihd,bjhd->bhij", q, k) * Params.of(case).scale
        col = torch.arange(case.seqlen_k).double()
        s = s + inputs.alibi_slopes.double()[None, :, None, None] * col
        row = torch.arange(case.seqlen_q)[:, None]
        s = s.masked_fill(torch.arange(case.seqlen_k)[None, :] > row + 4, -math.inf)
        assert torch.allclose(torch.logsumexp(s, -1), theirs.lse, atol=1e-12)


def test_no_shift_outside_the_causal_mode():
    case = Case(seqlen_q=5, seqlen_k=9, heads_q=2, alibi=True, window=(3, 0), dtype="float32")
    assert not case.alibi_causal_mode
    assert lse_alibi_shift(make_inputs(case)) is None


def test_rows_without_keys_are_plus_inf_in_flash_attn_convention():
    case = Case(seqlen_q=6, seqlen_k=2, causal=True, dtype="float32")
    lse = reference(make_inputs(case), lse_convention="flash-attn").lse
    assert torch.all(lse[0, 0, :4] == math.inf) and torch.isfinite(lse[0, 0, 4:]).all()


# ------------------------------------------------------------------------ the data model


def test_new_fields_leave_existing_ids_alone_and_show_in_labels():
    plain = Case(entry="kvcache", seqlen_q=1, seqlen_k=64)
    assert "seqlen_new" not in plain.identity() and "alibi_slopes" not in plain.identity()
    case = plain.replace(seqlen_new=1, rotary_dim=16, rotary_interleaved=True,
                         cache_leftpad=(3,), cache_batch_idx=True, num_splits=2)
    assert case.case_id != plain.case_id
    assert case.label.endswith("new1 rope16i leftpad3 batch-idx splits2")
    assert {"append", "rotary", "leftpad", "batch-idx", "splits"} <= case.features
    assert "alibi-per-batch" in plain.replace(alibi=True, alibi_slopes="random-per-batch").features
    assert Case.__dataclass_fields__  # noqa: B018 - the dataclass stays a dataclass
    from harness.case import case_from_dict
    assert case_from_dict(case.to_dict()) == case


def test_window_feature_follows_the_call_not_the_kernel():
    assert "window" in Case(seqlen_q=3, seqlen_k=1, window=(-1, 1)).features
    assert "window" not in Case(seqlen_q=3, seqlen_k=9, causal=True).features


@pytest.mark.parametrize("fields,message", [
    (dict(seqlen_new=1), "seqlen_new=1 needs entry='kvcache'"),
    (dict(entry="kvcache", rotary_dim=16), "rotary_dim=16 needs seqlen_new > 0"),
    (dict(entry="kvcache", seqlen_new=1, rotary_dim=15), "rotary_dim=15 must be even"),
    (dict(entry="kvcache", seqlen_new=1, rotary_dim=128), "rotary_dim=128 must be even and "
                                                          "<= head_dim=64"),
    (dict(entry="kvcache", seqlens_k=(60,), seqlen_new=5), "cache_seqlens + seqlen_new = 65 > "
                                                           "seqlen_k=64"),
    (dict(entry="kvcache", seqlens_k=(6,), cache_leftpad=(7,)), "cache_leftpad[0]=7 must be in "
                                                                "[0, cache length 6]"),
    (dict(entry="kvcache", cache_leftpad=(1, 2)), "cache_leftpad=(1, 2) must be a list of 1"),
    (dict(alibi_slopes="random"), "alibi_slopes='random' needs alibi = true"),
    (dict(alibi=True, alibi_slopes="geometric"), "alibi_slopes='geometric' must be one of"),
    (dict(entry="kvcache", rotary_interleaved=True), "rotary_interleaved = true needs"),
    (dict(entry="kvcache", seqlens_k=(60,), seqlen_q=8, seqlen_new=2, rotary_dim=16,
          causal=True), "rotary positions reach cache_seqlens + seqlen_q = 68 > the 64 rows"),
    (dict(num_splits=-1), "num_splits=-1 must be an integer >= 0"),
    (dict(paged_block_size=16), "paged_block_size=16 needs entry='kvcache' or 'varlen'"),
])
def test_validation_names_the_field_and_the_fix(fields, message):
    base = dict(seqlen_q=1, seqlen_k=64)
    with pytest.raises(InvalidCase, match=None) as info:
        Case(**{**base, **fields})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_resolve_cache_is_identity_without_cache_operations():
    case = Case(entry="kvcache", seqlen_q=2, seqlen_k=32, seqlens_k=(5,), num_splits=3)
    inputs = make_inputs(case)
    assert resolve_cache(inputs) is inputs


def test_dense_case_stays_o1_in_batch():
    case = Case(batch=10 ** 7, seqlen_q=4, seqlen_k=8, window=(1, 20))
    assert case.docstring_differs is False and case.mask_window == (1, -1)


def test_baseline_lse_follows_the_convention_too():
    case = Case(seqlen_q=5, seqlen_k=9, heads_q=2, alibi=True, causal=True, dtype="float16")
    inputs = make_inputs(case)
    plain, flash = baseline(inputs), baseline(inputs, lse_convention="flash-attn")
    shift = lse_alibi_shift(inputs)
    assert flash.lse.dtype == torch.float32
    assert torch.allclose((flash.lse.double() - plain.lse.double()), shift, atol=1e-5)
    ref = reference(inputs, lse_convention="flash-attn")
    assert (flash.lse.double() - ref.lse).abs().max() < 1e-2


def test_sampled_rows_and_toml_round_trip_with_every_cache_field():
    from harness.case.suites import parse_inline_case
    from harness.exact.reference import sample_rows

    case = Case(**{**KV, "seqlen_q": 40}, seqlen_new=3, cache_leftpad=(4, 0, 9), rotary_dim=16,
                rotary_interleaved=True, cache_batch_idx=True, num_splits=2, alibi=True,
                alibi_slopes="random-per-batch", causal=True)
    assert parse_inline_case(case.to_inline_toml()) == case
    inputs = make_inputs(case)
    sampled = reference(inputs, rows=sample_rows(inputs, 8, 0))
    full = reference(inputs)
    assert sampled.rows.sum() == 24
    assert torch.equal(sampled.out[sampled.rows], full.out[sampled.rows])
