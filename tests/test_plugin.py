"""The pytest plugin, through pytester: options, outcomes, isolation, records."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from tests.conftest import REPO

ZOO = str(REPO / "tests" / "zoo" / "kernels.py")


@pytest.fixture
def parity(pytester):
    """A pytester directory holding the parity suites, as users run them."""
    for name in ("test_cases.py", "test_explore.py"):
        shutil.copy(REPO / "harness" / "parity" / name, pytester.path / name)
    return pytester


def run(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=600)


def suite(pytester, text: str) -> str:
    path = pytester.path / "cases.toml"
    path.write_text(text)
    return str(path)


def test_plugin_import_does_not_import_torch():
    code = "import sys, attn_harness_pytestplugin; print('torch' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_lists_every_option_in_one_group(pytester):
    result = pytester.runpytest("--help")
    text = result.stdout.str()
    assert "attention kernel parity (attn-harness):" in text
    for option in ("--attn-backend=NAME|FAMILY@MODULE|FILE.py:FUNC",
                   "--attn-suite=NAME|FILE.toml", "--attn-cases-dir=DIR", "--attn-max-cases=N",
                   "--attn-profile=quick|nightly|exhaustive", "--attn-checks=LIST",
                   "--attn-seed=N", "--attn-explore=N|profile, --attn-examples=N|profile",
                   "--attn-timeout=S",
                   "--attn-max-gflop=N", "--attn-audit", "--attn-out=DIR, --attn-records=DIR",
                   "--attn-regressions=DIR", "--attn-graph-replay",
                   "--attn-shard=I/N|auto|auto/N", "--attn-durations=FILE|DIR",
                   "--attn-run-id=ID"):
        assert option in text, option
    assert text.count("(default:") >= 17


def test_the_cli_and_the_plugin_share_names_and_defaults():
    """Options are declared once and registered twice, as pytest-benchmark does."""
    import argparse

    from harness.cli import build_parser
    from harness.options import OPTIONS

    run = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cli = {a.dest: a for a in run.choices["run"]._actions}
    for opt in OPTIONS:
        action = cli[opt.dest("")]
        assert f"--{opt.name}" in action.option_strings
        assert action.default == (False if opt.flag else opt.default), opt.name
        assert action.help.endswith(f"(default: {opt.default_text})")


@pytest.mark.parametrize(("args", "message"), [
    (["--attn-checks", "fwd,speed"], "could not parse 'fwd,speed'"),
    (["--attn-profile", "fast"], "could not parse 'fast'"),
    (["--attn-explore", "-1"], "could not parse '-1': must be >= 0"),
    (["--attn-examples", "-1"], "could not parse '-1': must be >= 0"),
    (["--attn-backend", "nope"], "--attn-backend nope: unknown backend"),
    (["--attn-backend", "missing.py:f"], "no such file missing.py"),
    (["--attn-suite", "no-such-suite"], "--attn-suite: --suite no-such-suite: no such suite"),
    (["--attn-backend", f"{ZOO}:no_such_function"], "has no function 'no_such_function'"),
])
def test_bad_options_are_usage_errors(parity, args, message):
    result = run(parity, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


def test_a_correct_kernel_passes_cases_and_exploration(parity):
    path = suite(parity, "[[case]]\nseqlen_q = 33\nseqlen_k = 65\nheads_q = 4\nheads_kv = 2\n"
                         "causal = true\n[[case]]\nseqlen_q = 16\nheads_q = 2\nalibi = true\n"
                         "softcap = 2.0\n[[case]]\nentry = 'varlen'\nseqlens_q = [3]\n"
                         "seqlens_k = [5]\n")
    records = parity.path / "records"
    result = run(parity, f"--attn-backend={ZOO}:correct", f"--attn-suite={path}",
                 "--attn-examples=8", f"--attn-records={records}")
    result.assert_outcomes(passed=3, skipped=1)
    lines = (records / "results.jsonl").read_text().splitlines()
    assert len(lines) >= 3 * 3 + 8 * 3
    assert "## Verdicts" in (records / "report.md").read_text()
    assert "report: " in result.stdout.str()


def test_a_buggy_kernel_fails_with_the_minimal_case_and_its_replay_command(parity):
    regressions = parity.path / "regressions"
    # forward only: the mapping is wrong in the forward, and the zoo's Python kernel took
    # minutes over the backward of the decode and dropout corners (and was once killed for
    # memory there while other work ran)
    result = run(parity, "test_explore.py", f"--attn-backend={ZOO}:gqa_mapping",
                 "--attn-examples=20", "--attn-checks=fwd", f"--attn-regressions={regressions}")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "shrunk in" in out and "replay: attn-harness run --backend" in out
    (written,) = regressions.glob("*.toml")
    text = written.read_text()
    assert "[[case]]" in text and "# failed: fwd fail" in text
    assert "heads_kv = 1" in text or "heads_kv = 2" in text  # GQA survives shrinking


def test_a_kernel_that_kills_its_process_loses_no_other_result(parity):
    path = suite(parity, "[defaults]\nseqlen_q = 16\nheads_q = 2\n"
                         "[[case]]\nhead_dim = 32\n[[case]]\nhead_dim = 96\n"
                         "[[case]]\nhead_dim = 64\n")
    records = parity.path / "records"
    result = run(parity, "test_cases.py", f"--attn-backend={ZOO}:aborts_on_head_dim_96",
                 f"--attn-suite={path}", "--attn-checks=fwd", f"--attn-records={records}")
    result.assert_outcomes(passed=2, failed=1)
    assert "crash" in result.stdout.str() and "SIGABRT" in result.stdout.str()
    statuses = sorted(json.loads(x)["status"] for x in
                      (records / "results.jsonl").read_text().splitlines())
    assert statuses == ["crash", "pass", "pass"]


def test_stale_results_in_the_out_directory_are_not_merged_into_the_report(parity):
    path = suite(parity, "[[case]]\nseqlen_q = 16\nheads_q = 2\n")
    out = parity.path / "records"
    out.mkdir()
    stale = out / "results-gw7.jsonl"  # left by an earlier session
    stale.write_text((REPO / "tests" / "fixtures" / "results" /
                      "synthetic-cuda12.4-sm90-h100.jsonl").read_text())
    import os

    os.utime(stale, (1_000_000_000, 1_000_000_000))
    result = run(parity, "test_cases.py", "--attn-backend=sdpa-math", f"--attn-suite={path}",
                 "--attn-checks=fwd", f"--attn-out={out}")
    result.assert_outcomes(passed=1)
    report = (out / "report.md").read_text()
    assert "1 records from 1 machine(s)" in report, report[:400]


def test_the_old_option_spellings_still_work_and_say_they_are_deprecated(parity):
    path = suite(parity, "[[case]]\nseqlen_q = 16\nheads_q = 2\n")
    records = parity.path / "records"
    result = run(parity, "test_cases.py", "--attn-backend=sdpa-math", f"--attn-suite={path}",
                 "--attn-checks=fwd", f"--attn-records={records}", "--attn-examples=0")
    result.assert_outcomes(passed=1)
    assert (records / "results.jsonl").is_file()
    assert "--attn-records is deprecated" in result.stdout.str()
