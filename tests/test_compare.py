"""attn-harness compare: status flips, error-ratio growth and throughput moves beyond the spread.

Runs are the SYNTHETIC fixtures of tests/fixtures/results with changes injected into copies.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from harness.cli import main
from harness.results.compare import Thresholds, compare, render_markdown, throughput_move
from harness.results.records import Record, RecordWriter, read_many

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "results"
THREE = [FIXTURES / f for f in ("synthetic-rocm6.2-gfx942-mi300x-ck.jsonl",
                                "synthetic-rocm6.2-gfx942-mi300x-triton.jsonl",
                                "synthetic-cuda12.4-sm90-h100.jsonl")]


@pytest.fixture(scope="module")
def baseline() -> list[Record]:
    return read_many(THREE)


def pick(records, *, check, status="pass", flavor="cuda", seqlen=None) -> int:
    for i, r in enumerate(records):
        if (r.check == check and r.status == status and r.backend_flavor == flavor
                and (seqlen is None or r.case.get("seqlen_q") == seqlen)):
            return i
    raise LookupError(check)


def scaled(metrics: dict, factor: float) -> dict:
    out = dict(metrics)
    for key in ("time_ms", "timing_q1_ms", "timing_q3_ms", "timing_min_ms"):
        out[key] = metrics[key] * factor
    out["tflops"] = metrics["tflops"] / factor
    return out


def write(tmp_path: Path, name: str, records: list[Record]) -> Path:
    path = tmp_path / name
    with RecordWriter(path) as w:
        for r in records:
            w.write(r)
    return path


def test_a_run_compared_with_itself_changes_nothing(baseline, capsys):
    result = compare(baseline, baseline)
    assert result.changes == [] and not result.regressed
    assert result.matched == len(baseline) and result.new == result.missing == 0
    assert main(["compare", *map(str, THREE), "--baseline", *map(str, THREE)]) == 0
    assert "no regression: 0 regression(s)" in capsys.readouterr().out


def test_an_injected_pass_to_fail_flip_is_a_regression_naming_the_case(baseline, tmp_path,
                                                                        capsys):
    current = list(baseline)
    i = pick(current, check="fwd")
    current[i] = replace(current[i], status="fail", reason="out: 3 of 65536 elements exceed")
    result = compare(current, baseline)
    [change] = result.regressions
    assert (change.what, change.check, change.before, change.after) == ("status", "fwd", "pass",
                                                                          "fail")
    assert change.case_id == current[i].case_id
    path = write(tmp_path, "now.jsonl", current)
    assert main(["compare", str(path), "--baseline", *map(str, THREE)]) == 1
    out = capsys.readouterr().out
    assert "**1 regression(s)**" in out and current[i].case_id in out
    assert "## Regressions" in out and "out: 3 of 65536 elements exceed" in out


def test_a_25_percent_slowdown_is_a_regression_naming_the_case(baseline, tmp_path, capsys):
    current = list(baseline)
    i = pick(current, check="throughput", seqlen=4096)
    current[i] = replace(current[i], metrics=scaled(current[i].metrics, 1.25))
    result = compare(current, baseline)
    [change] = result.regressions
    assert change.what == "throughput" and change.check == "throughput fwd"
    assert change.case == "b4 q4096 k4096 h32/8 d128 bf16 causal"
    assert "median time +25.0% (slower)" in change.detail
    path = write(tmp_path, "now.jsonl", current)
    assert main(["compare", str(path), "--baseline", *map(str, THREE), "-o",
                 str(tmp_path / "changes.md")]) == 1
    out = capsys.readouterr().out
    assert "b4 q4096 k4096 h32/8 d128 bf16 causal" in out and current[i].case_id in out
    assert (tmp_path / "changes.md").read_text() == out


def test_a_move_inside_the_spread_or_under_the_threshold_is_not_flagged():
    before = {"time_ms": 10.0, "timing_q1_ms": 9.9, "timing_q3_ms": 10.1}
    noisy = {"time_ms": 12.5, "timing_q1_ms": 9.0, "timing_q3_ms": 16.0}  # quartiles overlap
    assert throughput_move(noisy, before, 0.10) is None
    small = {"time_ms": 10.5, "timing_q1_ms": 10.45, "timing_q3_ms": 10.55}  # 5% < 10%
    assert throughput_move(small, before, 0.10) is None
    slow = {"time_ms": 12.5, "timing_q1_ms": 12.4, "timing_q3_ms": 12.6}
    assert throughput_move(slow, before, 0.10)[0] == "regression"
    fast = {"time_ms": 8.0, "timing_q1_ms": 7.9, "timing_q3_ms": 8.1}
    assert throughput_move(fast, before, 0.10)[0] == "improvement"
    assert throughput_move({}, before, 0.10) is None


def test_a_move_timed_while_the_machine_moved_is_inconclusive_not_a_regression():
    before = {"time_ms": 10.0, "timing_q1_ms": 9.9, "timing_q3_ms": 10.1}
    slow = {"time_ms": 12.5, "timing_q1_ms": 12.4, "timing_q3_ms": 12.6, "timing_drift": 0.2,
            "timing_note": "unsteady: 11 ms (IQR 10.9-11.1) in the first half of a 2.0 s window"}
    kind, detail, *_ = throughput_move(slow, before, 0.10)
    assert kind == "inconclusive"
    assert "but the current run was timed while the machine's speed moved" in detail
    # a drift beyond the steady threshold without a note is unsteady too
    assert throughput_move({**slow, "timing_note": ""}, before, 0.10)[0] == "inconclusive"
    steady = {**slow, "timing_note": "", "timing_drift": 0.05}
    kind, detail, *_ = throughput_move(steady, before, 0.10)
    assert kind == "regression" and "machine" not in detail
    # both steady, but the control workload itself moved: the machine differed
    kind, detail, *_ = throughput_move({**steady, "timing_control_ms": 3.0},
                                       {**before, "timing_control_ms": 2.0}, 0.10,
                                       same_software=False)
    assert kind == "inconclusive" and "the control workload itself took +50%" in detail


def _ratio(ms: float, ratio: float, spread: float = 0.02, **more) -> dict:
    return {"time_ms": ms, "timing_q1_ms": ms * 0.99, "timing_q3_ms": ms * 1.01,
            "timing_relative": ratio, "timing_relative_q1": ratio * (1 - spread),
            "timing_relative_q3": ratio * (1 + spread), **more}


def test_on_a_cpu_the_time_relative_to_the_control_is_judged():
    before = _ratio(10.0, 2.0)
    # the machine got busier: wall time +150%, the ratio where it was
    kind, detail, *_ = throughput_move(_ratio(25.0, 2.02), before, 0.10)
    assert kind == "inconclusive" and "the machine's speed differed between the runs" in detail
    # the kernel got 25% slower while the machine got quicker: still found, by the ratio
    kind, detail, *_ = throughput_move(_ratio(8.0, 2.5), before, 0.10)
    assert kind == "regression" and "relative to the control workload timed alongside +25.0%" \
        in detail and "wall time -20.0%" in detail
    assert throughput_move(_ratio(10.0, 2.04), before, 0.10) is None
    # nor where the control's own time moved too far: the load differed too much
    kind, detail, *_ = throughput_move(_ratio(8.0, 2.5, timing_control_ms=4.0),
                                       {**before, "timing_control_ms": 2.0}, 0.10)
    assert kind == "inconclusive" and "the control workload itself took +100%" in detail
    assert throughput_move(_ratio(8.0, 2.5, timing_control_ms=2.6),
                           {**before, "timing_control_ms": 2.0}, 0.10)[0] == "regression"
    # a ratio that drifted within a window cannot be trusted either
    drifting = _ratio(12.5, 2.5, timing_relative_drift=0.3)
    assert throughput_move(drifting, before, 0.10)[0] == "inconclusive"
    # other software (a torch upgrade may change the control too): wall times, steady only
    assert throughput_move(_ratio(12.5, 2.02), before, 0.10,
                           same_software=False)[0] == "regression"


def test_at_the_same_machine_speed_the_kernels_own_time_is_judged():
    """Both runs steady, the control within CONTROL_SAME: the wall time decides, corrected by
    the control. The per-block ratio adds the control's jitter to the kernel's: on the idle
    VM a 25% slower kernel's ratio quartiles overlapped the baseline's in 4 of 10 pairs."""
    before = _ratio(2.45, 6.8, spread=0.12, timing_control_ms=0.36)
    noisy_ratio = _ratio(3.06, 7.5, spread=0.12, timing_control_ms=0.37)  # wall +25%
    kind, detail, *_ = throughput_move(noisy_ratio, before, 0.10)
    assert kind == "regression" and "median time +24.9% (slower)" in detail
    assert "the machine ran at the same speed in both runs" in detail
    # the control slowed almost as much: what is left of the move is within the threshold
    kind, detail, *_ = throughput_move({**noisy_ratio, "timing_control_ms": 0.42}, before, 0.10)
    assert kind == "inconclusive" and "corrected by it the change is +7.1%" in detail
    # faster beyond the spread: an improvement, not a failure
    assert throughput_move(before, noisy_ratio, 0.10)[0] == "improvement"
    # the wall time within the spread: no change, whatever the noisy ratio read
    assert throughput_move(_ratio(2.47, 8.5, spread=0.01, timing_control_ms=0.36),
                           _ratio(2.45, 6.8, spread=0.01, timing_control_ms=0.36), 0.10) is None
    # a run timed while the machine moved leaves the rule to the ratio (inconclusive here)
    unsteady = {**noisy_ratio, "timing_drift": 0.3}
    assert throughput_move(unsteady, before, 0.10)[0] == "inconclusive"
    # without a control time recorded (older records) the ratio decides as before
    plain = {k: v for k, v in noisy_ratio.items() if k != "timing_control_ms"}
    assert throughput_move(plain, before, 0.10)[0] == "inconclusive"


def test_a_ratio_spread_wider_than_the_move_is_no_regression():
    """Identical code at load 5-7 (tests/bench/compare_noise.py, the figures of one pair): the
    control slowed less than the kernel in one run, its ratio's quartiles spread over 4x and
    did not overlap the other run's tight ones. Beyond both spreads means the medians are also
    farther apart than either interquartile range is wide."""
    def record(ms, q1, q3, ratio, r1, r3, control):
        return {"time_ms": ms, "timing_q1_ms": q1, "timing_q3_ms": q3, "timing_relative": ratio,
                "timing_relative_q1": r1, "timing_relative_q3": r3, "timing_control_ms": control}

    before = record(2.55, 2.41, 3.31, 0.892, 0.84, 1.11, 2.78)
    now = record(6.79, 2.82, 7.40, 4.28, 1.31, 4.95, 2.05)  # control -26%: the ratio decides
    assert throughput_move(now, before, 0.10) is None  # the wall times' quartiles overlap too
    # a ratio that moved by more than its spreads are wide still counts
    tight = record(6.79, 6.5, 7.1, 2.5, 2.4, 2.6, 2.05)
    assert throughput_move(tight, before, 0.10)[0] == "regression"


def test_inconclusive_changes_are_listed_and_do_not_fail_the_comparison(baseline):
    current = list(baseline)
    i = pick(current, check="throughput", seqlen=4096)
    m = scaled(current[i].metrics, 1.5)
    m["timing_note"] = "unsteady: the machine moved"
    current[i] = replace(current[i], metrics=m)
    result = compare(current, baseline)
    assert not result.regressed
    assert [c.kind for c in result.changes] == ["inconclusive"]
    text = render_markdown(result)
    assert "1 inconclusive throughput change(s)" in text
    assert "## Inconclusive throughput changes (not regressions)" in text


def test_bwd_and_fwd_bwd_moves_are_compared_too(baseline):
    current = list(baseline)
    i = pick(current, check="throughput", seqlen=2048)
    m = dict(current[i].metrics)
    m["bwd"] = scaled(m["bwd"], 1.5)
    current[i] = replace(current[i], metrics=m)
    [change] = compare(current, baseline).regressions
    assert change.check == "throughput bwd"


def test_improvements_and_coverage_changes_do_not_fail_the_run(baseline, tmp_path):
    current = list(baseline)
    failing = pick(current, check="bwd", status="fail", flavor="rocm-ck")
    current[failing] = replace(current[failing], status="pass", metrics={"ratio": 1.9},
                               reason="")
    faster = pick(current, check="throughput", seqlen=1024)
    current[faster] = replace(current[faster], metrics=scaled(current[faster].metrics, 0.7))
    skipped = pick(current, check="determinism")
    current[skipped] = replace(current[skipped], status="skip", reason="flash-attn missing")
    result = compare(current, baseline)
    kinds = sorted((c.kind, c.what) for c in result.changes)
    assert kinds == [("improvement", "status"), ("improvement", "throughput"),
                     ("notice", "coverage")]
    assert not result.regressed
    path = write(tmp_path, "now.jsonl", current)
    assert main(["compare", str(path), "--baseline", *map(str, THREE)]) == 0
    text = render_markdown(result)
    assert "## Improvements" in text and "## Coverage changes (not regressions)" in text
    assert "median time -30.0% (faster)" in text
    assert "no longer runs: flash-attn missing" in text


@pytest.mark.parametrize(("before", "after", "flagged"), [
    (0.6, 0.9, True),     # +50% and +0.3
    (0.6, 0.68, False),   # +13%
    (0.02, 0.05, False),  # +150% but only +0.03
])
def test_error_ratio_growth(baseline, before, after, flagged):
    i = pick(baseline, check="fwd")
    old = list(baseline)
    old[i] = replace(old[i], metrics={**old[i].metrics, "ratio": before})
    new = list(baseline)
    new[i] = replace(new[i], metrics={**new[i].metrics, "ratio": after})
    result = compare(new, old)
    assert result.regressed is flagged
    if flagged:
        assert result.regressions[0].what == "ratio" and "+50%" in result.regressions[0].detail


def test_status_ranks(baseline):
    i = pick(baseline, check="fwd")
    for before, after, kind in [("pass", "xfail", "regression"), ("fail", "crash", "regression"),
                                ("crash", "fail", "improvement"), ("xpass", "pass", None),
                                ("skip", "pass", "notice")]:
        old = list(baseline)
        old[i] = replace(old[i], status=before)
        new = list(baseline)
        new[i] = replace(new[i], status=after)
        changes = [c for c in compare(new, old).changes if c.what in ("status", "coverage")]
        assert [c.kind for c in changes] == ([kind] if kind else []), (before, after)


def test_an_upgraded_machine_is_paired_with_its_previous_setup(baseline):
    h100 = [r for r in baseline if r.target_id == "cuda12.4-sm90-h100"]
    upgraded = [replace(r, target={**r.target, "target_id": "cuda12.6-sm90-h100",
                                   "runtime": "CUDA 12.6", "runtime_version": "12.6"})
                for r in h100]
    result = compare(upgraded, h100)
    assert result.pairs == [("cuda12.6-sm90-h100", "cuda12.4-sm90-h100")]
    assert result.matched == len(h100) and not result.changes
    assert "`cuda12.6-sm90-h100` against `cuda12.4-sm90-h100`" in render_markdown(result)


def test_new_and_missing_records_are_counted(baseline):
    h100 = [r for r in baseline if r.target_id == "cuda12.4-sm90-h100"]
    result = compare(h100, baseline)
    assert result.new == 0 and result.missing == len(baseline) - len(h100)
    result = compare(baseline, h100)
    assert result.new == len(baseline) - len(h100) and result.missing == 0
    assert sorted(result.unpaired) == ["rocm6.2-gfx942-mi300x (flash-attn rocm-ck)",
                                       "rocm6.2-gfx942-mi300x (flash-attn rocm-triton)"]


def test_thresholds_come_from_the_command_line(baseline, tmp_path):
    current = list(baseline)
    i = pick(current, check="throughput", seqlen=4096)
    current[i] = replace(current[i], metrics=scaled(current[i].metrics, 1.25))
    path = write(tmp_path, "now.jsonl", current)
    assert main(["compare", str(path), "--baseline", *map(str, THREE), "--slowdown", "0.3"]) == 0
    assert compare(current, baseline, Thresholds(slowdown=0.3)).changes == []


def test_compare_of_files_needs_a_baseline(capsys):
    assert main(["compare", str(THREE[0])]) == 2
    assert "give --baseline RUN" in capsys.readouterr().err
