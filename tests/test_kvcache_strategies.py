"""Strategies reach issue 13's kv-cache calls (appends, rotary both styles, leftpad, batch-idx,
forced splits, paged kv-cache and paged varlen, per-batch ALiBi slopes) for backends that claim
them, never for backends that do not, and shrink each of them away."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings

from harness.backends.base import FEATURES, Capabilities
from harness.run.strategies import cases

ALL = Capabilities(entries=frozenset({"dense", "varlen", "kvcache"}),
                   features=frozenset(FEATURES))
SETTINGS = settings(max_examples=600, database=None, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))

REACHED = {
    "append": lambda c: c.seqlen_new > 0,
    "rotary-neox": lambda c: c.rotary_dim > 0 and not c.rotary_interleaved,
    "rotary-interleaved": lambda c: c.rotary_interleaved,
    "leftpad": lambda c: c.cache_leftpad is not None and max(c.cache_leftpad) > 0,
    "batch-idx": lambda c: c.cache_batch_idx,
    "splits-1": lambda c: c.num_splits == 1,
    "splits-several": lambda c: c.num_splits > 1,
    "paged-kvcache-append": lambda c: c.entry == "kvcache" and c.paged_block_size > 0
    and c.seqlen_new > 0,
    "paged-varlen": lambda c: c.entry == "varlen" and c.paged_block_size > 0,
    "gqa-decode": lambda c: c.entry == "kvcache" and c.seqlen_q == 1 and c.heads_q > c.heads_kv
    and c.seqlen_new > 0,
    "random-slopes": lambda c: c.alibi and c.alibi_slopes == "random",
    "per-batch-slopes": lambda c: c.alibi and c.alibi_slopes == "random-per-batch",
}


@pytest.mark.parametrize("name", sorted(REACHED))
def test_strategies_reach_every_kvcache_call(name):
    # find() stops at the first case that reaches the call: rare calls (rotary needs a kv-cache
    # case with an append and a head_dim rotary can take, about 1 draw in 100) are still found
    # well inside the limit, whatever other tests drew before in this process.
    find(cases(ALL), REACHED[name], settings=settings(
        max_examples=3000, database=None, deadline=None, phases=[Phase.generate],
        derandomize=True, suppress_health_check=list(HealthCheck)))


def test_shrinking_turns_the_other_cache_features_off():
    found = find(cases(ALL), REACHED["append"], settings=SETTINGS)
    assert found.seqlen_new == 1 and found.rotary_dim == 0
    assert found.cache_leftpad is None and not found.cache_batch_idx
    assert found.num_splits == 0 and found.alibi_slopes == "standard"


NONE = Capabilities(entries=frozenset({"dense", "varlen", "kvcache"}),
                    features=frozenset(FEATURES) - {"append", "rotary", "leftpad", "batch-idx",
                                                    "splits", "alibi-per-batch", "paged"})


@settings(max_examples=150, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(cases(NONE))
def test_unclaimed_features_are_never_drawn(case):
    assert not ({"append", "rotary", "leftpad", "batch-idx", "splits", "alibi-per-batch",
                 "paged"} & case.features)
