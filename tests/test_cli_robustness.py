"""Bad input and bad environments at the command line: exit 2 with one line, nothing lost, and
nothing run twice. Each test here failed before (a traceback, exit 1, a silent default, or
duplicate records)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import harness, records

TINY = "[[case]]\nseqlen_q = 16\nheads_q = 2\nhead_dim = 32\n"


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def run_tiny(tiny: Path, out: Path, *extra: str):
    return harness("run", "--backend", "sdpa-math", "--suite", str(tiny), "--checks", "fwd",
                   "--explore", "0", "--out", str(out), *extra)


def one_line_usage_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_out_that_is_a_file_or_lies_under_a_file_is_a_usage_error(tiny, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    line = one_line_usage_error(run_tiny(tiny, a_file))
    assert "is a file, not a directory" in line
    line = one_line_usage_error(run_tiny(tiny, a_file / "below"))
    assert "is a file, not a directory" in line


def test_out_that_cannot_be_created_is_a_usage_error(tiny):
    line = one_line_usage_error(run_tiny(tiny, Path("/proc/attn-harness-out")))
    assert "cannot create it" in line


def test_report_and_compare_outputs_under_a_file_are_usage_errors(tiny, tmp_path):
    out = tmp_path / "out"
    assert run_tiny(tiny, out).returncode == 0
    a_file = tmp_path / "file"
    a_file.write_text("x")
    results = str(out / "results.jsonl")
    line = one_line_usage_error(harness("report", results, "-o", str(a_file / "r.md")))
    assert "is a file, not a directory" in line
    line = one_line_usage_error(harness("compare", results, "--baseline", results, "-o",
                                        str(a_file / "c.md")))
    assert "is a file, not a directory" in line


@pytest.mark.parametrize("value", ["inf", "none", "1e7", "1e400"])
def test_timeout_without_limit_is_accepted(tiny, tmp_path, value):
    result = run_tiny(tiny, tmp_path / "out", "--timeout", value)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {r["status"] for r in records(tmp_path / "out")} == {"pass"}


def test_resume_with_another_seed_is_refused_naming_the_field(tiny, tmp_path):
    out = tmp_path / "out"
    assert run_tiny(tiny, out).returncode == 0
    line = one_line_usage_error(run_tiny(tiny, out, "--resume", "--seed", "7"))
    assert "seed (0, this run 7)" in line


def test_resume_into_another_machines_results_is_refused(tiny, tmp_path):
    out = tmp_path / "out"
    assert run_tiny(tiny, out).returncode == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    other = []
    for line in lines:
        record = json.loads(line)
        record["target"] = {**record["target"], "target_id": "rocm6.2-gfx942-mi300x",
                            "vendor": "amd"}
        other.append(json.dumps(record))
    (out / "results.jsonl").write_text("\n".join(other) + "\n")
    line = one_line_usage_error(run_tiny(tiny, out, "--resume"))
    assert "target (rocm6.2-gfx942-mi300x)" in line


def test_retry_crashed_runs_crash_records_again(tiny, tmp_path):
    out = tmp_path / "out"
    assert run_tiny(tiny, out).returncode == 0
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    record.update(status="crash", reason="the worker process died with SIGSEGV", metrics={})
    (out / "results.jsonl").write_text(json.dumps(record) + "\n")
    kept = run_tiny(tiny, out, "--resume")
    assert kept.returncode == 1  # the crash record is kept and fails the run
    retried = run_tiny(tiny, out, "--resume", "--retry-crashed")
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert [r["status"] for r in records(out)] == ["pass"]


def test_repeated_suites_backends_and_cases_run_once(tiny, tmp_path):
    out = tmp_path / "out"
    case = "{seqlen_q = 16, heads_q = 2, head_dim = 32}"
    result = harness("run", "--backend", "sdpa-math", "--backend", "sdpa-math", "--suite",
                     str(tiny), "--suite", str(tiny), "--case", case, "--checks", "fwd",
                     "--explore", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(records(out)) == 1
    assert "given more than once: run once" in result.stderr
    assert "appear more than once" in result.stderr


def test_an_integral_float_seed_is_that_integer_and_a_fraction_is_refused(tiny, tmp_path):
    out = tmp_path / "out"
    assert run_tiny(tiny, out, "--seed", "7.0").returncode == 0
    assert [r["seed"] for r in records(out)] == [7]
    line = one_line_usage_error(run_tiny(tiny, tmp_path / "o2", "--seed", "0.5"))
    assert "could not parse '0.5'" in line


def test_compare_of_an_empty_current_file_is_bad_input(tiny, tmp_path):
    out = tmp_path / "out"
    assert run_tiny(tiny, out).returncode == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = one_line_usage_error(harness("compare", str(empty), "--baseline",
                                        str(out / "results.jsonl")))
    assert "holds no records" in line
    line = one_line_usage_error(harness("report", str(empty)))
    assert "holds no records" in line


def test_a_baseline_record_without_counterpart_is_a_regression_unless_allowed(tmp_path):
    suite = tmp_path / "two.toml"
    suite.write_text(TINY + "[[case]]\nseqlen_q = 8\nheads_q = 1\nhead_dim = 32\n")
    full = tmp_path / "full"
    assert run_tiny(suite, full).returncode == 0
    lines = (full / "results.jsonl").read_text().splitlines()
    part = tmp_path / "part.jsonl"
    part.write_text(lines[0] + "\n")
    baseline = str(full / "results.jsonl")
    assert harness("compare", str(part), "--baseline", baseline).returncode == 1
    assert harness("compare", str(part), "--baseline", baseline,
                   "--allow-missing").returncode == 0


def test_a_broken_project_known_issues_file_is_one_line_before_anything_runs(tiny, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "known_issues.toml").write_text(
        '[[issue]]\nid = "x"\nbackend = "sdpa-math"\nlink = "l"\nwhen = { features = "causal" }\n')
    result = harness("run", "--backend", "sdpa-math", "--suite", str(tiny), "--checks", "fwd",
                     "--explore", "0", "--out", str(tmp_path / "out"), cwd=tmp_path)
    line = one_line_usage_error(result)
    assert "known_issues.toml" in line and "features" in line
    assert not (tmp_path / "out" / "results.jsonl").exists()
