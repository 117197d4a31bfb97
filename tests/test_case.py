"""Case: validation, canonical identity, derived quantities."""

from __future__ import annotations

import itertools
import random

import pytest

from harness.case import Case, attended_pairs, case_from_dict
from harness.case.suites import parse_inline_case
from harness.errors import InvalidCase

# Pinned ids: the canonical form must not drift between versions, machines or Pythons, or
# results from different machines stop lining up. Changing these is a schema change.
PINNED = [
    (dict(seqlen_q=128, heads_q=4), "1324d2caf4fb"),
    (dict(batch=2, seqlen_q=113, seqlen_k=203, heads_q=8, heads_kv=2, dtype="bfloat16",
          causal=True), "e7983490a239"),
    (dict(entry="varlen", batch=3, seqlens_q=(17, 0, 64), seqlens_k=(33, 12, 64), causal=True,
          softcap=1.5, scale=0.25), "29ce6e1be20e"),
]


@pytest.mark.parametrize(("fields", "case_id"), PINNED)
def test_case_id_is_pinned(fields, case_id):
    assert Case(**fields).case_id == case_id


def test_case_id_ignores_metadata_and_spelling():
    a = Case(seqlen_q=64, heads_q=2, softcap=50, window=[8, 0], causal=True)
    b = Case(seqlen_q=64, seqlen_k=64, heads_q=2, heads_kv=2, softcap=50.0, window=(8, 0),
             causal=True, name="other", source="x", checks=("fwd",))
    assert a.case_id == b.case_id
    assert a == b and hash(a) == hash(b)


def test_case_id_changes_with_every_problem_field():
    base = Case(seqlen_q=64, heads_q=4, heads_kv=2)
    changes = dict(batch=2, seqlen_q=65, seqlen_k=66, heads_q=8, heads_kv=1, head_dim=32,
                   dtype="bfloat16", causal=True, window=(4, 4), softcap=2.0, alibi=True,
                   dropout_p=0.1, scale=0.3, layout="strided")
    ids = {base.case_id}
    for name, value in changes.items():
        ids.add(base.replace(**{name: value}).case_id)
    assert len(ids) == len(changes) + 1


@pytest.mark.parametrize(("fields", "message"), [
    (dict(seqlen_q=8, heads_q=6, heads_kv=4), "heads_q=6 is not a multiple of heads_kv=4"),
    (dict(seqlen_q=8, dtype="float64"), "dtype='float64' must be one of"),
    (dict(seqlen_q=8, head_dim=0), "head_dim=0 must be an integer >= 1"),
    (dict(seqlen_q=8, batch=2.0), "batch=2.0 must be an integer >= 1"),
    (dict(seqlen_q=8, causal=1), "causal=1 must be true or false"),
    (dict(seqlen_q=8, causal=True, window=(4, 3)), "causal=true fixes the right window edge"),
    (dict(seqlen_q=8, window=(-2, 0)), "window=[-2, 0] must be [left, right]"),
    (dict(seqlen_q=8, dropout_p=1.0), "dropout_p=1.0 must be < 1"),
    (dict(seqlen_q=8, softcap=-1.0), "softcap=-1.0 must be a finite number >= 0"),
    (dict(seqlen_q=8, scale=0.0), "scale=0.0 must be a finite number > 0"),
    (dict(seqlen_q=0), "seqlen_q=0 and seqlen_k=0 must both be >= 1"),
    (dict(entry="varlen", batch=2, seqlens_q=(3,)), "needs seqlens_k"),
    (dict(entry="varlen", batch=2, seqlens_q=(3, 1), seqlens_k=(4,)),
     "seqlens_k has 1 lengths but batch=2"),
    (dict(entry="varlen", batch=1, seqlens_q=(0,), seqlens_k=(4,)), "at least one query"),
    (dict(entry="dense", seqlen_q=4, seqlens_k=(4,)),
     "seqlens_k is for entry='varlen' or 'kvcache'"),
    (dict(entry="kvcache", seqlen_q=1, seqlen_k=8, seqlens_k=(9,)),
     "must be integers in [0, seqlen_k=8]"),
    (dict(entry="kvcache", seqlen_q=1, seqlen_k=8, dropout_p=0.1),
     "kvcache entry point has no dropout"),
    (dict(seqlen_q=8, paged_block_size=16), "needs entry='kvcache'"),
    (dict(seqlen_q=8, entry="paged"), "entry='paged' must be one of"),
    (dict(seqlen_q=8, layout="transposed"), "layout='transposed' must be one of"),
    (dict(seqlen_q=8, checks=("fwd", "speed")), "checks="),
])
def test_impossible_cases_are_rejected_with_the_field(fields, message):
    with pytest.raises(InvalidCase, match=message.replace("[", r"\[").replace("(", r"\(")):
        Case(**fields)


def test_unknown_field_suggests_the_right_one():
    with pytest.raises(InvalidCase, match="unknown field 'head_dims'.*did you mean 'head_dim'"):
        case_from_dict({"seqlen_q": 8, "head_dims": 64})


def test_derived_lengths_and_defaults():
    c = Case(entry="varlen", batch=3, seqlens_q=[5, 0, 7], seqlens_k=[6, 2, 9])
    assert (c.seqlen_q, c.seqlen_k, c.total_q, c.total_k) == (7, 9, 12, 17)
    assert c.heads_kv == c.heads_q
    kv = Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=100, seqlens_k=[100, 37])
    assert kv.sequence_lengths() == [(1, 100), (1, 37)]


def _brute_pairs(sq, sk, left, right):
    off = sk - sq
    return sum(1 for i in range(sq) for j in range(sk)
               if (left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right))


def test_attended_pairs_matches_brute_force():
    rng = random.Random(0)
    for _ in range(3000):
        sq, sk = rng.randint(1, 30), rng.randint(1, 30)
        left, right = rng.randint(-1, 33), rng.randint(-1, 33)
        assert attended_pairs(sq, sk, left, right) == _brute_pairs(sq, sk, left, right)


def test_flops_follow_flash_attn_benchmark():
    dense = Case(batch=2, seqlen_q=1024, heads_q=8, head_dim=64)
    assert dense.flops_fwd() == 4 * 2 * 1024 * 1024 * 8 * 64
    causal = dense.replace(causal=True)
    assert causal.flops_fwd() == 4 * 2 * 8 * 64 * (1024 * 1025 // 2)  # about half


def test_features_name_what_the_case_turns_on():
    assert Case(seqlen_q=4).features == frozenset()
    c = Case(seqlen_q=8, seqlen_k=4, heads_q=4, heads_kv=1, causal=True, window=(2, 0),
             softcap=3.0, alibi=True, dropout_p=0.1, scale=0.5, layout="strided")
    assert c.features == {"causal", "window", "softcap", "alibi", "dropout", "gqa", "scale",
                          "strided", "seqlen_q>seqlen_k"}
    assert "window" not in Case(seqlen_q=8, causal=True, window=(-1, 0)).features
    assert "window" in Case(seqlen_q=8, window=(-1, 0)).features  # local, not causal


@pytest.mark.parametrize("fields", [fields for fields, _ in PINNED] + [
    dict(entry="kvcache", batch=2, seqlen_q=4, seqlen_k=512, seqlens_k=(300, 511), heads_q=4,
         heads_kv=2, paged_block_size=256, causal=True, name="paged \"quoted\""),
    dict(seqlen_q=3, softcap=0.1 + 0.2, scale=1e-3, checks=("fwd", "bwd"), source="https://x/y"),
])
def test_toml_round_trip_keeps_the_identity(fields):
    case = Case(**fields)
    again = parse_inline_case(case.to_inline_toml())
    assert again == case and again.case_id == case.case_id
    assert again.name == case.name and again.checks == case.checks


def test_grid_helper():
    from harness.case import grid

    cases = grid(seqlen_q=[1, 2], causal=[False, True])
    assert [(c.seqlen_q, c.causal) for c in cases] == list(itertools.product([1, 2], [False, True]))


def test_rows_without_keys_matches_the_mask_row_by_row():
    # Brute force: build each sequence's bottom-right mask and look for an all-masked row.
    import itertools

    import torch

    from harness.backends.sdpa import attn_mask

    checked = 0
    for sq, sk, causal, window in itertools.product(
            (1, 3, 8), (1, 3, 8), (False, True), ((-1, -1), (2, 0), (-1, 1), (0, 3), (1, -1))):
        if causal and window[1] not in (-1, 0):
            continue  # causal fixes the right edge at 0
        case = Case(seqlen_q=sq, seqlen_k=sk, causal=causal, window=window)
        visible = attn_mask(case, None, torch.float32, "cpu")
        want = bool((~visible.any(-1)).any())
        assert case.rows_without_keys == want, case.label
        checked += 1
    assert checked == 72
    varlen = Case(entry="varlen", batch=2, seqlen_q=4, seqlen_k=4, seqlens_q=(4, 2),
                  seqlens_k=(4, 0))
    assert varlen.rows_without_keys


def test_dense_cases_are_constant_time_in_batch():
    """A billion sequences of a million tokens: constructed, counted and planned (skipped with
    its memory estimate) at once, without walking the batch (issue 11)."""
    import time

    from harness.backends import load_backend
    from harness.checks.plan import plan
    from harness.target import from_facts

    cpu = from_facts({"machine": "x86_64", "device_count": 0, "system_memory_bytes": 16 << 30})
    backend = load_backend("sdpa-flash")
    start = time.perf_counter()
    case = Case(batch=1_000_000_000, seqlen_q=1_000_000, seqlen_k=1_000_000, causal=True)
    assert case.total_q == case.total_k == 10**15
    assert case.attended_pairs() == 10**9 * (10**6 * (10**6 + 1) // 2)
    assert case.features == {"causal"} and not case.rows_without_keys
    the_plan = plan(case, backend, cpu, ("fwd", "bwd"))
    assert the_plan.run == () and "GiB" in the_plan.skips["fwd"]
    assert time.perf_counter() - start < 0.5


def test_length_counts_keep_per_sequence_lengths():
    varlen = Case(entry="varlen", batch=3, seqlens_q=(17, 0, 64), seqlens_k=(33, 12, 60),
                  causal=True)
    assert varlen.sequence_lengths() == [(17, 33), (0, 12), (64, 60)]
    assert varlen.total_q == 81 and varlen.total_k == 105
    assert "seqlen_q>seqlen_k" in varlen.features
    cache = Case(entry="kvcache", batch=2, seqlen_q=4, seqlen_k=64, seqlens_k=(0, 40),
                 causal=True)
    assert cache.sequence_lengths() == [(4, 0), (4, 40)]
    assert cache.rows_without_keys  # the first sequence has no keys
    assert cache.attended_pairs() == attended_pairs(4, 40, -1, 0)
    dense = Case(batch=3, seqlen_q=5, seqlen_k=7)
    assert dense.sequence_lengths() == [(5, 7)] * 3 and dense.total_q == 15
