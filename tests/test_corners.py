"""Exploration visits every corner of the input space where reported bugs live, whatever the
seed: the quick profile's 20 cases include one inside each corner (grid limit, 16k keys, 16-bit
overflow, key-bias, packed qkv, v strided unlike k, strided dout, dropout), and a failure found
in a corner that does not need it is reported outside it.

The kernels here are fake ``run_case`` functions that judge nothing: they record the cases
exploration would run and fail on the condition a test names."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

from harness.backends import load_backend
from harness.case import Case
from harness.results.records import Record
from harness.run.explore import explore, plan
from harness.run.strategies import (
    BUDGETS,
    CORNERS,
    cases,
    corners_for,
    in_corner,
    vacuous_features,
)

CORRECT = "tests/zoo/kernels.py:correct"


def _record(case: Case, status: str = "pass") -> Record:
    return Record(case_id=case.case_id, case=case.to_dict(), backend={"name": "fake"},
                  target={"target_id": "t"}, check="fwd", status=status,
                  reason="fake verdict" if status == "fail" else "")


def _explored(caps, seed: int, fails=lambda case, n: False, examples=None):
    """Explore with a fake kernel; returns (the cases run, the exploration)."""
    ran: list[Case] = []

    def run_case(case: Case) -> list[Record]:
        ran.append(case)
        return [_record(case, "fail" if fails(case, len(ran)) else "pass")]

    result = explore("fake", caps, run_case, profile="quick", seed=seed, examples=examples)
    return ran, result


def test_the_plan_gives_each_corner_a_case_and_the_free_draws_the_rest():
    assert plan(list(CORNERS), 20) == [(None, 12)] + [(c, 1) for c in CORNERS]
    nightly = plan(list(CORNERS), 300)
    assert nightly[0] == (None, 240) and sum(n for _, n in nightly) == 300
    assert {n for _, n in nightly[1:]} == {7, 8}
    # Too few cases for every corner: half of them go to corners, the seed rotates which.
    assert plan(list(CORNERS), 4, seed=0) == [(None, 2), ("grid", 1), ("decode", 1)]
    assert plan(list(CORNERS), 4, seed=3) == [(None, 2), ("key-bias", 1), ("packed", 1)]
    assert plan(list(CORNERS), 1) == [(None, 1)] and plan([], 20) == [(None, 20)]


def test_corners_follow_the_capabilities():
    assert corners_for(load_backend(CORRECT).capabilities) == list(CORNERS)
    flex = corners_for(load_backend("flex-attention").capabilities)
    assert "dropout" not in flex and "dout-strided" not in flex  # flex claims neither
    assert "dout-strided" not in corners_for(load_backend(CORRECT).capabilities, backward=False)


@pytest.mark.parametrize("corner", CORNERS)
def test_a_corner_draws_only_cases_inside_it(corner):
    caps = load_backend(CORRECT).capabilities
    drawn: list[Case] = []

    @hypothesis_seed(1)
    @settings(max_examples=15, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(cases(caps, BUDGETS["quick"], corner=corner))
    def draw(case):
        drawn.append(case)

    draw()
    assert len(drawn) >= 10
    for case in drawn:
        assert in_corner(case, corner), case.label
        assert (case.dropout_p > 0) == (corner == "dropout"), case.label
        assert not vacuous_features(case), case.label


#: What each input-space zoo kernel (tests/zoo/input_space_kernels.py) needs to show its bug,
#: without dropout (which the judge sees through less sharply) unless it is the dropout's.
TRIGGERS = {
    "unscaled_fp16_scores": lambda c: c.dtype == "float16" and (
        c.values == "large" or (c.values == "scaled" and c.value_scale_used >= 100)),
    "running_max_from_zero": lambda c: c.values == "key-bias",
    "v_uses_k_strides": lambda c: c.layout == "v-transposed",
    "dout_assumed_contiguous": lambda c: c.layout == "dout-strided",
    "packed_grad_strides": lambda c: c.layout == "packed-qkv" and c.total_q > 1,
    "grid_limit": lambda c: c.entry == "dense" and c.batch * c.heads_q > 65535,
    "keys_past_16k": lambda c: c.seqlen_k > 16384,
    "backward_new_mask": lambda c: c.dropout_p > 0 and c.entry != "kvcache",
}


@pytest.mark.parametrize("seed", range(4))
def test_every_seed_of_the_quick_profile_reaches_every_input_space_trigger(seed):
    ran, result = _explored(load_backend(CORRECT).capabilities, seed)
    assert len(ran) == 20 and result.minimal is None
    missed = [name for name, hit in TRIGGERS.items()
              if not any(hit(c) and (c.dropout_p == 0 or name == "backward_new_mask")
                         for c in ran)]
    assert not missed


def test_a_failure_found_in_a_corner_it_does_not_need_is_reported_outside_it():
    # Fails on every case after the free draws: the first corner (overflow, with seed 2's
    # rotation of four cases) finds it; normal values fail as well, so that is the minimum.
    ran, result = _explored(load_backend(CORRECT).capabilities, seed=2,
                            fails=lambda case, n: n > 2, examples=4)
    assert result.phases[1][0] == "overflow"
    assert result.minimal is not None and result.minimal.values == "normal"
    assert any(in_corner(c, "overflow") for c in ran)


def test_a_failure_that_needs_its_corner_keeps_it():
    ran, result = _explored(load_backend(CORRECT).capabilities, seed=0,
                            fails=lambda case, n: case.layout == "v-transposed")
    assert result.minimal is not None and result.minimal.layout == "v-transposed"
    assert result.examples <= 20


def test_one_packed_token_is_a_vacuous_layout():
    assert vacuous_features(Case(seqlen_q=1, layout="packed-qkv")) == ["packed"]
    assert vacuous_features(Case(seqlen_q=2, layout="packed-qkv")) == []
    assert vacuous_features(Case(batch=2, seqlen_q=1, layout="packed-qkv")) == []
    assert vacuous_features(Case(seqlen_q=4, seqlen_k=1, layout="packed-kv")) == ["packed"]


def test_a_corner_out_of_the_backends_reach_is_said_not_raised():
    # Head dims in multiples of 32 cannot make 65,536 tiny problems fit the quick budget.
    from dataclasses import replace

    from harness.run.explore import summary

    caps = replace(load_backend(CORRECT).capabilities, head_dim_multiple=32)
    ran, result = _explored(caps, seed=0)
    assert "grid" in result.unreachable and result.minimal is None
    assert not any(in_corner(c, "grid") for c in ran)
    assert "no case of the grid corner(s) fits" in summary(result)
