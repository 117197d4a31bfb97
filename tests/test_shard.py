"""Sharding a sweep (harness/shard.py): parsing I/N and auto, scheduler variables, the partition,
the packing by recorded or estimated time, the exploration split and what records say of shards.

Pure functions, fast: no worker process, no torch (except the exploration test at the end,
which draws cases with hypothesis from sdpa-math's claims and runs none of them).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from harness.errors import UsageError
from harness.results.records import Record, parse_line
from harness.shard import (
    COUNT_ENV,
    AutoShard,
    Shard,
    Work,
    derive_run_id,
    estimate_seconds,
    explore_seed,
    explore_share,
    parse_shard,
    partition,
    recorded_seconds,
    resolve_shard,
    shard_from_env,
    shard_loads,
    shard_runs,
    task_costs,
)

# ------------------------------------------------------------------------------ parsing I/N


@pytest.mark.parametrize(("text", "expected"), [
    ("0/4", Shard(0, 4)), ("3/4", Shard(3, 4)), (" 1 / 2 ", Shard(1, 2)), ("0/1", Shard(0, 1)),
    ("auto", AutoShard()), ("AUTO", AutoShard()), ("auto/8", AutoShard(8)),
])
def test_shard_values_parse(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("4/4", "the shard index is 0-based: 0 <= I < N, so 0..3 for N=4, got 4"),
    ("1/1", "0-based: 0 <= I < N, so 0 for N=1, got 1"),
    ("0/0", "the shard count N must be >= 1, got 0"),
    ("auto/0", "the shard count N must be >= 1, got 0"),
    ("-1/4", "give I/N with a 0-based index"),
    ("1", "give I/N with a 0-based index"),
    ("a/b", "give I/N with a 0-based index"),
])
def test_bad_shard_values_say_the_index_is_0_based(text, message):
    with pytest.raises(ValueError) as info:
        parse_shard(text)
    assert message in str(info.value)


def test_shard_names_its_folder_and_prints_as_i_of_n():
    assert str(Shard(2, 4)) == "2/4" and Shard(2, 4).dirname == "shard-2-of-4"


# ------------------------------------------------------------------------ scheduler variables


def slurm(task_id, count=None, low=None, high=None, step=None) -> dict[str, str]:
    env = {"SLURM_ARRAY_TASK_ID": str(task_id)}
    for name, value in (("COUNT", count), ("MIN", low), ("MAX", high), ("STEP", step)):
        if value is not None:
            env[f"SLURM_ARRAY_TASK_{name}"] = str(value)
    return env


@pytest.mark.parametrize(("env", "expected"), [
    (slurm(2, count=4, low=0, high=3, step=1), Shard(2, 4)),   # sbatch --array=0-3
    (slurm(2, count=4), Shard(2, 4)),
    (slurm(1, low=1, high=4), Shard(0, 4)),                   # --array=1-4 is shards 0..3
    (slurm(4, count=4, low=1, high=4), Shard(3, 4)),
    (slurm(6, count=4, low=0, high=6, step=2), Shard(3, 4)),  # --array=0-6:2
    ({"JOB_COMPLETION_INDEX": "3", COUNT_ENV: "5"}, Shard(3, 5)),
])
def test_auto_reads_slurm_arrays_and_indexed_jobs(env, expected):
    assert shard_from_env(AutoShard(), env) == expected


def test_auto_n_gives_the_count_an_indexed_job_does_not():
    assert shard_from_env(AutoShard(4), {"JOB_COMPLETION_INDEX": "0"}) == Shard(0, 4)
    assert shard_from_env(AutoShard(4), slurm(3, count=4, low=0, high=3)) == Shard(3, 4)


@pytest.mark.parametrize(("spec", "env", "message"), [
    (AutoShard(), {}, "no scheduler variable is set; looked for SLURM_ARRAY_TASK_ID with "
                      "SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MIN/MAX (Slurm arrays), "
                      "JOB_COMPLETION_INDEX with auto/N or ATTN_HARNESS_SHARD_COUNT"),
    (AutoShard(), {"JOB_COMPLETION_INDEX": "1"}, "gives the index but not the count: give "
                                                 "--shard auto/N or set ATTN_HARNESS_SHARD_COUNT"),
    (AutoShard(), {"JOB_COMPLETION_INDEX": "4", COUNT_ENV: "4"},
     "JOB_COMPLETION_INDEX=4: the shard index is 0-based: 0 <= I < N, so 0..3 for N=4"),
    (AutoShard(4), slurm(1, count=3, low=0, high=2), "the Slurm array has 3 tasks, not 4"),
    (AutoShard(), slurm(3, count=3, low=1, high=7), "SLURM_ARRAY_TASK_COUNT=3 but the array "
                                                    "spans 1-7 (7 indices)"),   # --array=1,3,7
    (AutoShard(), slurm(2), "without SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MAX"),
    (AutoShard(), {"SLURM_ARRAY_TASK_ID": "x"}, "SLURM_ARRAY_TASK_ID='x' is not a non-negative"),
])
def test_auto_says_which_variables_it_looked_for_and_what_is_wrong(spec, env, message):
    with pytest.raises(UsageError) as info:
        shard_from_env(spec, env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_resolve_keeps_explicit_shards_and_none():
    assert resolve_shard(Shard(1, 2), {"SLURM_ARRAY_TASK_ID": "0"}) == Shard(1, 2)
    assert resolve_shard(None, {}) is None


# -------------------------------------------------------------------------------- partition


def costs_of(values: dict[str, float], backend: str = "b") -> dict[tuple[str, str], float]:
    return {(case, backend): cost for case, cost in values.items()}


def test_partition_is_disjoint_complete_and_longest_first():
    costs = costs_of({"a": 5, "b": 4, "c": 3, "d": 3, "e": 2, "f": 1})
    shares = partition(costs, 2)
    assert set(shares) == set(costs)  # every task, each in exactly one share
    # longest first onto the lighter share: a->0 (5), b->1 (4), c->1 (7), d->0 (8), e->1 (9), f->0
    assert {k[0]: i for k, i in shares.items()} == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1,
                                                    "f": 0}
    assert shard_loads(costs, shares, 2) == [9.0, 9.0]


def test_partition_is_the_same_whatever_the_order_it_is_given_in():
    rng = random.Random(7)
    costs = {(f"{i:012x}", f"backend{i % 3}"): float(rng.choice([1, 2, 2, 3, 5, 8]))
             for i in range(200)}
    first = partition(costs, 7)
    items = list(costs.items())
    for _ in range(3):
        rng.shuffle(items)
        assert partition(dict(items), 7) == first


def test_ties_go_to_the_lower_case_id_and_the_lower_shard():
    shares = partition(costs_of({"c": 1, "a": 1, "b": 1}), 3)
    assert [shares[(c, "b")] for c in "abc"] == [0, 1, 2]


def test_packing_balances_better_than_dealing_in_turn():
    rng = random.Random(3)
    costs = {(f"{i:012x}", "b"): rng.lognormvariate(0, 1.5) for i in range(60)}
    loads = shard_loads(costs, partition(costs, 4), 4)
    dealt = [0.0] * 4
    for i, key in enumerate(sorted(costs)):
        dealt[i % 4] += costs[key]
    assert max(loads) - min(loads) < max(dealt) - min(dealt)
    # LPT's bound: no share exceeds the mean by more than the largest task
    assert max(loads) <= sum(loads) / 4 + max(costs.values())


def test_a_case_stays_on_one_shard_when_the_jury_sits():
    costs = {**costs_of({"a": 3, "b": 3, "c": 1}, "x"), **costs_of({"a": 3, "b": 3, "c": 1}, "y")}
    shares = partition(costs, 2, together=True)
    for case in "abc":
        assert shares[(case, "x")] == shares[(case, "y")]
    assert len(set(partition(costs, 2).values())) == 2


def test_more_shards_than_tasks_leaves_some_shares_empty():
    shares = partition(costs_of({"a": 1, "b": 1}), 4)
    assert sorted(shares.values()) == [0, 1]


# ---------------------------------------------------------------------------- task costs


def test_the_estimate_grows_with_the_work_and_is_the_profiles_budget_for_throughput():
    small = estimate_seconds(1e9, "fwd", warmup_s=0.05, budget_s=0.25)
    large = estimate_seconds(4e9, "fwd", warmup_s=0.05, budget_s=0.25)
    assert 0 < small < large
    assert estimate_seconds(1e9, "bwd", warmup_s=0, budget_s=0) > small
    quick = estimate_seconds(1e9, "throughput", warmup_s=0.05, budget_s=0.25)
    exhaustive = estimate_seconds(1e9, "throughput", warmup_s=0.5, budget_s=2.0)
    assert quick < exhaustive and exhaustive == estimate_seconds(1e12, "throughput",
                                                                warmup_s=0.5, budget_s=2.0)


@dataclass
class Rec:
    """A stand-in for harness.results.records.Record with the fields durations read."""

    case_id: str
    check: str
    time: str = ""
    seconds: float | None = None
    backend_name: str = "b"


def test_recorded_seconds_prefer_the_field_and_take_the_median_over_files():
    files = [[Rec("a", "fwd", seconds=2.0), Rec("a", "bwd", seconds=6.0)],
             [Rec("a", "fwd", seconds=4.0)], [Rec("a", "fwd", seconds=100.0)]]
    assert recorded_seconds(files) == {("b", "a", "fwd"): 4.0, ("b", "a", "bwd"): 6.0}


def test_older_files_give_the_gaps_between_record_times():
    """Records written before ``seconds`` existed: each gets the time since the one before it
    in its file; the first record, an unreadable time and a clock going back give nothing."""
    t = "2026-12-01T10:00:{:02d}+00:00"
    files = [[Rec("a", "fwd", t.format(0)), Rec("a", "bwd", t.format(3)),
              Rec("b", "fwd", t.format(10)), Rec("c", "fwd", "garbage"),
              Rec("d", "fwd", t.format(12)), Rec("e", "fwd", t.format(11))]]
    assert recorded_seconds(files) == {("b", "a", "bwd"): 3.0, ("b", "b", "fwd"): 7.0,
                                       ("b", "d", "fwd"): 2.0}


def test_task_costs_use_records_where_they_exist_and_scale_the_estimate_elsewhere():
    work = [Work("a", "b", (("fwd", 1.0), ("bwd", 2.0))), Work("n", "b", (("fwd", 1.0),))]
    # without records: the estimates
    assert task_costs(work) == {("a", "b"): 3.0, ("n", "b"): 1.0}
    # records say this machine takes 10x the estimate: the new case is scaled alike
    costs = task_costs(work, {("b", "a", "fwd"): 10.0, ("b", "a", "bwd"): 20.0})
    assert costs == {("a", "b"): 30.0, ("n", "b"): 10.0}


def test_durations_change_the_partition_to_even_out_the_times():
    estimated = costs_of({"a": 1, "b": 1, "c": 1, "d": 1})
    recorded = costs_of({"a": 9, "b": 1, "c": 1, "d": 1})
    assert shard_loads(recorded, partition(estimated, 2), 2) == [10.0, 2.0]
    assert shard_loads(recorded, partition(recorded, 2), 2) == [9.0, 3.0]


# ----------------------------------------------------------------------------- run identity


def test_the_run_id_is_a_function_of_the_partition_and_the_settings():
    shares = partition(costs_of({"a": 2, "b": 1}), 2)
    settings = {"seed": 0, "profile": "quick"}
    run_id = derive_run_id(shares, settings)
    assert run_id.startswith("sweep-") and len(run_id) == len("sweep-") + 12
    assert derive_run_id(dict(reversed(list(shares.items()))), dict(settings)) == run_id
    assert derive_run_id({**shares, ("a", "b"): 1 - shares[("a", "b")]}, settings) != run_id
    assert derive_run_id(shares, {**settings, "seed": 1}) != run_id


# ------------------------------------------------------------------------------ exploration


PLAN = [(None, 64), ("grid", 2), ("decode", 2), ("overflow", 2), ("key-bias", 2),
        ("packed", 2), ("v-transposed", 2), ("dout-strided", 2), ("dropout", 2)]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_the_shards_parts_add_up_to_the_plan_of_n_times_the_examples(count):
    parts = [explore_share(PLAN, Shard(i, count)) for i in range(count)]
    for phase, (corner, n) in enumerate(PLAN):
        assert sum(part[phase][1] for part in parts) == n
        assert all(part[phase][0] == corner for part in parts)
        # the phase's first (seed-independent, simplest) case belongs to exactly one shard
        assert sum(part[phase][2] for part in parts) == 1
    totals = [sum(n for _, n, _ in part) for part in parts]
    assert max(totals) - min(totals) <= 1 and sum(totals) == 80


def test_each_shard_draws_with_its_own_seed_and_one_shard_with_the_runs():
    assert explore_seed(5, None) == 5 and explore_seed(5, Shard(0, 1)) == 5
    seeds = {explore_seed(5, Shard(i, 4)) for i in range(4)}
    assert len(seeds) == 4 and explore_seed(5, Shard(1, 4)) == explore_seed(5, Shard(1, 4))
    assert explore_seed(6, Shard(1, 4)) != explore_seed(5, Shard(1, 4))


# ------------------------------------------------------------------- shards in the records


def rec(case: str, shard: str, *, run: str = "sweep-1", tasks: int | None = 2,
        suite: str = "smoke", target: str = "cpu-x86_64", backend: str = "b"):
    return SimpleNamespace(case_id=case, backend_name=backend, shard=shard, run_id=run,
                           shard_tasks=tasks, suite=suite, target_id=target)


def test_all_shards_present():
    (run,) = shard_runs([rec("a", "0/2"), rec("b", "0/2"), rec("c", "1/2"), rec("d", "1/2"),
                         rec("x", "1/2", suite="explore")])
    assert run.complete and run.line() == "shards: 2 of 2 (0,1)"


def test_a_missing_shard_is_named():
    (run,) = shard_runs([rec("a", "0/3", tasks=1), rec("c", "2/3", tasks=1)])
    assert run.missing == (1,) and not run.complete
    assert run.line().startswith("shards: 2 of 3 (0,2); missing 1/3: no record")


def test_a_shard_that_stopped_early_is_named_incomplete():
    (run,) = shard_runs([rec("a", "0/2"), rec("b", "0/2"), rec("c", "1/2", tasks=3)])
    assert run.incomplete == ((1, 1, 3),)
    assert "incomplete 1/2: 1 of its 3 task(s) recorded" in run.line()


def test_a_task_recorded_by_two_shards_is_reported():
    (run,) = shard_runs([rec("a", "0/2", tasks=1), rec("a", "1/2", tasks=1)])
    assert run.twice == (("a", "b", (0, 1)),) and not run.complete
    assert "1 task(s) recorded by more than one shard" in run.line()


def test_runs_and_setups_are_checked_apart_and_unsharded_records_ignored():
    records = [rec("a", "0/2", tasks=1), rec("b", "1/2", tasks=1),            # complete on cpu
               rec("a", "0/2", tasks=1, target="rocm-gfx942"),                # 1/2 missing there
               rec("z", "0/1", run="sweep-2", tasks=1), rec("y", "")]
    runs = {(r.run_id, r.setup): r for r in shard_runs(records)}
    assert set(runs) == {("sweep-1", "cpu-x86_64"), ("sweep-1", "rocm-gfx942"),
                         ("sweep-2", "cpu-x86_64")}
    assert runs[("sweep-1", "cpu-x86_64")].complete
    assert runs[("sweep-1", "rocm-gfx942")].missing == (1,)


# ------------------------------------------------------------------------ records' fields


def a_record(**fields) -> Record:
    from harness.case import Case

    case = Case(seqlen_q=8, seqlen_k=8, heads_q=1, head_dim=16)
    return Record(case_id=case.case_id, case=case.to_dict(), backend={"name": "sdpa-math"},
                  target={"target_id": "cpu-x86_64"}, check="fwd", status="pass", **fields)


def test_records_carry_the_shard_and_older_lines_without_it_still_read():
    sharded = a_record(seconds=1.5, run_id="sweep-abc", shard="1/4", shard_tasks=7)
    again = parse_line(sharded.to_json(), "x:1")
    assert (again.shard, again.run_id, again.shard_tasks, again.seconds) == (
        "1/4", "sweep-abc", 7, 1.5)
    plain = json.loads(a_record().to_json())
    assert not {"seconds", "run_id", "shard", "shard_tasks"} & set(plain)  # as before
    old = parse_line(json.dumps(plain), "x:1")
    assert (old.shard, old.run_id, old.shard_tasks, old.seconds) == ("", "", None, None)


@pytest.mark.parametrize(("field", "value"), [("shard", "1-4"), ("run_id", "a b"),
                                              ("seconds", -1), ("shard_tasks", -2)])
def test_the_schema_refuses_malformed_shard_fields(field, value):
    from harness.errors import RecordsError

    data = json.loads(a_record().to_json())
    data[field] = value
    with pytest.raises(RecordsError, match=f"field '{field}'"):
        parse_line(json.dumps(data), "x:1")


# -------------------------------------------------------------------- exploration, drawn


def test_shards_explore_their_own_parts_and_shard_0_of_1_is_the_unsharded_run(monkeypatch):
    """Draws (without running) what 3 shards of a quick exploration would: each its part of
    the plan for 3 x 8 examples, the phase's simplest case once, and the whole run unchanged
    by --shard 0/1."""
    monkeypatch.setenv("CI", "1")  # no example database: draws depend on the seed alone
    from harness.backends import load_backend
    from harness.run.explore import explore

    capabilities = load_backend("sdpa-math").capabilities

    def drawn(shard, examples=8):
        ids = []
        result = explore("sdpa-math", capabilities, lambda case: ids.append(case.case_id) or [],
                         examples=examples, seed=0, shard=shard)
        return ids, result

    whole, _ = drawn(None)
    assert drawn(Shard(0, 1))[0] == whole
    parts = [drawn(Shard(i, 3)) for i in range(3)]
    assert [len(ids) for ids, _ in parts] == [8, 8, 8]
    union = [case for ids, _ in parts for case in ids]
    assert len(set(union)) >= len(union) - 2  # distinct streams: a rare small case twice at most
    assert len(set(parts[0][0]) & set(parts[1][0]) & set(parts[2][0])) == 0
    assert all(result.shard == f"{i}/3" for i, (_, result) in enumerate(parts))
