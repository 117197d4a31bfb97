"""A failing kernel whose output equals attention without a feature the case turns on says so
(issue 24, point 3): in the record's reason and metrics (the console and the report print the
reason). In-process, on small cases."""

from __future__ import annotations

import pytest

from harness.case import Case
from harness.run.worker import Task, execute
from harness.target import detect

KERNELS = "tests/fixtures/kernels/ignoring_kernels.py"


@pytest.fixture(scope="module")
def target():
    return detect()


def fwd(kernel: str, case: Case, target):
    records = [r for kind, r in execute(Task("t", case, f"{KERNELS}:{kernel}", ("fwd",)),
                                        target, {}) if kind == "record"]
    (record,) = records
    return record


def test_an_ignored_window_is_named_with_its_max_difference(target):
    case = Case(seqlen_q=64, seqlen_k=64, heads_q=2, head_dim=32, window=(8, 0))
    record = fwd("ignores_window", case, target)
    assert record.status == "fail"
    assert record.reason.startswith("window_size appears to be ignored: the output equals "
                                    "attention without the window, max difference ")
    assert set(record.metrics["ignored_features"]) == {"window"}


def test_an_ignored_softcap_and_alibi_are_named_too(target):
    for kernel, feature, words in (("softcap_ignored", "softcap", "softcap appears"),
                                   ("alibi_ignored", "alibi", "alibi_slopes appears")):
        case = Case(seqlen_q=32, heads_q=2, head_dim=32, **{feature: 2.0 if feature ==
                                                                    "softcap" else True})
        records = [r for kind, r in execute(Task("t", case, f"tests/zoo/kernels.py:{kernel}",
                                                 ("fwd",)), target, {}) if kind == "record"]
        assert records[0].status == "fail" and words in records[0].reason, records[0].reason


def test_an_ignored_dropout_is_named(target):
    case = Case(seqlen_q=16, heads_q=2, head_dim=32, dropout_p=0.3)
    record = fwd("ignores_dropout", case, target)
    assert record.status == "fail"
    assert "dropout_p appears to be ignored: the output equals attention without dropout" \
        in record.reason
    assert set(record.metrics["ignored_features"]) == {"dropout"}


def test_a_kernel_wrong_for_another_reason_is_not_said_to_ignore_anything(target):
    case = Case(seqlen_q=64, heads_q=2, head_dim=32, window=(8, 0), causal=True)
    record = fwd("wrong_everywhere", case, target)
    assert record.status == "fail" and "appears to be ignored" not in record.reason
    assert "ignored_features" not in record.metrics


def test_the_console_line_and_the_report_name_the_ignored_feature(tmp_path):
    """End to end through the CLI: the console's reason line under the failing case and the
    report's failure entry both say which feature the kernel looks as if it ignored."""
    import subprocess
    import sys

    from tests.conftest import REPO

    suite = tmp_path / "window.toml"
    suite.write_text("[[case]]\nseqlen_q = 64\nseqlen_k = 64\nheads_q = 2\nhead_dim = 32\n"
                     "window = [8, 0]\ndtype = \"float32\"\n")
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--backend", f"{KERNELS}:ignores_window",
         "--suite", str(suite), "--checks", "fwd", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    said = "window_size appears to be ignored: the output equals attention without the window"
    (console,) = [line for line in result.stderr.splitlines() if said in line]
    assert console.strip().startswith("fwd fail: window_size appears")
    assert said in (out / "report.md").read_text()
