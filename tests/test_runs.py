"""Runs kept side by side (issue 24, point 1): numbered run folders under reports/<target-id>/,
a ``latest`` pointer, run numbers for report and compare, --out exactly, promotion of a
regression on purpose."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.options import RunOptions
from harness.results import storage
from tests.test_cli import harness

TARGET = {"target_id": "cpu-test", "git_revision": "0123456789ab-dirty", "harness": "0.1.0"}


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_each_run_gets_a_numbered_folder_and_latest_points_at_the_newest(here):
    from harness.run.session import open_run

    first = open_run(RunOptions(suites=("smoke",)), TARGET)
    second = open_run(RunOptions(suites=("smoke",)), TARGET, inline=("{seqlen_q = 8}",))
    assert first.parent == second.parent == Path("reports/cpu-test")
    assert first.name.startswith("0001-0123456789ab-dirty-") and second.name.startswith("0002-")
    assert os.readlink(first.parent / "latest") == second.name  # a relative symlink
    assert storage.latest(first.parent).path == second
    meta = json.loads((second / "run.json").read_text())
    assert meta["number"] == 2 and meta["selection"]["cases"] == ["{seqlen_q = 8}"]
    # --resume without a number goes on with the latest, with one with that run
    assert open_run(RunOptions(), TARGET, resume="latest") == second
    assert open_run(RunOptions(), TARGET, resume="1") == first
    with pytest.raises(UsageError, match=r"run 7: no such run in reports/cpu-test \(runs 1-2"):
        open_run(RunOptions(), TARGET, resume="7")
    # --out writes exactly there, and refuses a run number
    assert open_run(RunOptions(out=here / "mine"), TARGET) == here / "mine"
    with pytest.raises(UsageError, match="--resume 1 names a kept run"):
        open_run(RunOptions(out=here / "mine"), TARGET, resume="1")


def test_latest_is_a_text_file_where_symlinks_cannot_be_made(here, monkeypatch):
    def no_symlinks(self, *args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "symlink_to", no_symlinks)
    run = storage.new_run(here / "m", "rev")
    link = here / "m" / "latest"
    assert not link.is_symlink() and link.read_text().strip() == run.path.name
    again = storage.new_run(here / "m", "rev")
    assert link.read_text().strip() == again.path.name
    assert storage.latest(here / "m") == again


def test_the_workers_of_one_pytest_session_join_one_run(here):
    a = storage.new_run(here / "m", "rev", started="20260101-000000", join=True)
    b = storage.new_run(here / "m", "rev", started="20260101-000000", join=True)
    c = storage.new_run(here / "m", "rev", started="20260101-000001", join=True)
    assert a == b and c.number == 2


def test_run_arguments_resolve_to_results_files(here):
    m = Path("reports") / "cpu-a"
    runs = [storage.new_run(m, "rev", meta={"selection": {"suites": [s]}})
            for s in ("smoke", "edge", "smoke", "edge")]
    for run in runs:
        (run.path / "results.jsonl").write_text("{}\n")
    assert storage.resolve_run(None)[1] == [runs[3].path / "results.jsonl"]
    assert storage.resolve_run("2")[0] == runs[1]
    assert storage.resolve_run("cpu-a/1")[0] == runs[0]
    assert storage.resolve_run(str(runs[2].path))[0].number == 3  # a run folder by path
    assert storage.resolve_run("other.jsonl")[1] == [Path("other.jsonl")]  # read as given
    # compare's default baseline: the latest earlier run that asked for the same
    assert storage.previous(runs[3])[0] == runs[1]
    assert storage.previous(runs[2])[0] == runs[0]
    assert storage.previous(runs[1])[0] == runs[0]  # none of the same: the one before
    with pytest.raises(UsageError, match="no earlier run with results"):
        storage.previous(runs[0])
    # several machines: numbers name the one with the newest run, and say so
    other = storage.new_run(here / "reports" / "cpu-b", "rev", started="19990101-000000")
    (other.path / "results.jsonl").write_text("{}\n")
    assert storage.resolve_run("1")[0] == runs[0] and "using cpu-a's" in storage.resolve_run("1")[2]


def test_promote_copies_a_regression_into_cases_regressions(here):
    from harness.case.regressions import promote

    found = here / "reports" / "m" / "0001-r-20260101-000000" / "regressions"
    found.mkdir(parents=True)
    good = found / "k-123.toml"
    good.write_text("# found by exploration\n[[case]]\nseqlen_q = 8\nheads_q = 1\n")
    [(target, what)] = promote([good])
    assert (target, what) == (here / "cases" / "regressions" / "k-123.toml", "promoted")
    assert target.read_text() == good.read_text()
    assert promote([good])[0][1] == "already there"
    good.write_text("[[case]]\nseqlen_q = 9\n")
    with pytest.raises(UsageError, match="exists and differs"):
        promote([good])
    bad = found / "bad.toml"
    bad.write_text("[[case]]\nwindow = [3]\n")
    with pytest.raises(Exception, match=r"bad.toml, case 1: window=\[3\]"):
        promote([bad])


TINY = "[[case]]\nseqlen_q = 16\nheads_q = 2\nhead_dim = 32\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A suite run, then a replay of one case, from one folder without --out."""
    cwd = tmp_path_factory.mktemp("runs")
    (cwd / "tiny.toml").write_text(TINY)
    common = ("--backend", "sdpa-math", "--checks", "fwd")
    first = harness("run", *common, "--suite", "tiny.toml", cwd=cwd)
    second = harness("run", *common, "--case", "{seqlen_q = 8, heads_q = 1, head_dim = 32}",
                     cwd=cwd)
    return cwd, first, second


def test_a_replay_is_a_new_run_beside_the_first(two_runs):
    cwd, first, second = two_runs
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    (machine,) = (cwd / "reports").iterdir()
    one, two = storage.runs(machine)
    assert (one.number, two.number) == (1, 2)
    assert len((one.path / "results.jsonl").read_text().splitlines()) == 1  # kept, not replaced
    assert (one.path / "report.md").is_file() and (two.path / "report.md").is_file()
    assert f"writing to {two.path.relative_to(cwd)}" in second.stderr
    assert not (cwd / ".hypothesis").exists() and not (cwd / "cases").exists()


def test_report_and_compare_act_on_the_latest_run(two_runs):
    cwd = two_runs[0]
    report = harness("report", cwd=cwd)
    assert report.returncode == 0 and "report: run 2" in report.stderr
    assert "b1 q8 k8 h1 d32" in report.stdout and "q16" not in report.stdout
    compare = harness("compare", cwd=cwd)
    assert "run 2" in compare.stderr and "against run 1" in compare.stderr
    assert "the run before it" in compare.stderr  # no earlier run of the same selection
    numbered = harness("compare", "1", "--baseline", "1", cwd=cwd)
    assert numbered.returncode == 0 and "no regression" in numbered.stdout


def test_the_pytest_plugin_keeps_its_run_beside_the_others(pytester):
    import shutil

    from tests.conftest import REPO

    shutil.copy(REPO / "harness" / "parity" / "test_cases.py", pytester.path / "test_cases.py")
    (pytester.path / "c.toml").write_text(TINY)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--attn-backend=sdpa-math",
                                           "--attn-suite=c.toml", "--attn-checks=fwd",
                                           timeout=300)
    result.assert_outcomes(passed=1)
    (machine,) = (pytester.path / "reports").iterdir()
    (run,) = storage.runs(machine)
    assert run.number == 1 and (run.path / "results.jsonl").is_file()
    assert (run.path / "report.md").is_file() and storage.latest(machine) == run


def test_a_pytest_n_session_gets_one_report_over_all_its_workers(pytester):
    """`pytest -n 2`: the workers write a results file each into one run folder, and the
    controller (which runs no test) renders report.md over both and names it."""
    import shutil

    from tests.conftest import REPO

    shutil.copy(REPO / "harness" / "parity" / "test_cases.py", pytester.path / "test_cases.py")
    (pytester.path / "c.toml").write_text(TINY + "[[case]]\nseqlen_q = 8\nheads_q = 1\n"
                                          "head_dim = 32\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--dist", "load",
                                           "--attn-backend=sdpa-math", "--attn-suite=c.toml",
                                           "--attn-checks=fwd", timeout=300)
    result.assert_outcomes(passed=2)
    (machine,) = (pytester.path / "reports").iterdir()
    (run,) = storage.runs(machine)
    report = (run.path / "report.md").read_text()
    assert "2 records from 1 machine(s)" in report
    assert any(line.startswith("report: ") and line.endswith(f"{run.path.name}/report.md")
               for line in result.stdout.lines), result.stdout.str()


def test_the_promote_command_takes_files_or_a_run_number(here, capsys):
    from harness.cli import main

    run = storage.new_run(Path("reports") / "cpu-a", "rev")
    (run.path / "regressions").mkdir()
    for name in ("a-1.toml", "a-2.toml"):
        (run.path / "regressions" / name).write_text("[[case]]\nseqlen_q = 8\nheads_q = 1\n")
    assert main(["promote", str(run.path / "regressions" / "a-1.toml"), "--to", "mine"]) == 0
    assert [p.name for p in (here / "mine").iterdir()] == ["a-1.toml"]
    assert main(["promote", "1"]) == 0  # every regression of run 1, into ./cases/regressions
    assert sorted(p.name for p in (here / "cases" / "regressions").iterdir()) == [
        "a-1.toml", "a-2.toml"]
    assert "attn-harness run --suite regressions runs them" in capsys.readouterr().err
    assert main(["promote", "missing.toml"]) == 2


def test_a_regressions_suite_run_is_a_new_run_that_does_not_explore(tmp_path):
    """``--suite regressions`` (the promoted cases in ./cases/regressions) is a run like any
    other: a numbered folder beside the earlier run, which is kept, and no exploration."""
    (tmp_path / "tiny.toml").write_text(TINY)
    common = ("--backend", "sdpa-math", "--checks", "fwd")
    first = harness("run", *common, "--suite", "tiny.toml", cwd=tmp_path)
    regressions = tmp_path / "cases" / "regressions"
    regressions.mkdir(parents=True)
    (regressions / "found.toml").write_text("[[case]]\nseqlen_q = 8\nheads_q = 1\nhead_dim = 32\n")
    second = harness("run", *common, "--suite", "regressions", cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    (machine,) = (tmp_path / "reports").iterdir()
    one, two = storage.runs(machine)
    assert (one.number, two.number) == (1, 2)
    assert "q16" in (one.path / "report.md").read_text()  # the first run's report is kept
    (record,) = [json.loads(x) for x in (two.path / "results.jsonl").read_text().splitlines()]
    assert record["suite"] == "found" and record["case"]["seqlen_q"] == 8  # its file
    assert "explored" not in second.stderr
