"""No record lost, corrupted or mixed (issue 22): resuming in this process, two runs on one
output folder, a run killed while it shrinks a failure, a resume under another profile, an
output that is one of the inputs, and links in place of the files a run writes.

Each test here failed before its fix. The kernel that kills its run is in
tests/fixtures/kernels/record_kernels.py and says what it imitates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import UsageError
from harness.results import outdir
from harness.results.records import read_records

REPO = Path(__file__).resolve().parent.parent
KERNELS = REPO / "tests" / "fixtures" / "kernels" / "record_kernels.py"
ONE = "[[case]]\nseqlen_q = 16\nheads_q = 2\nhead_dim = 32\ndtype = \"float32\"\n"
TWO = ONE + "[[case]]\nseqlen_q = 8\nheads_q = 1\nhead_dim = 32\ndtype = \"float32\"\n"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def suite(tmp_path: Path, text: str, name: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run_here(tmp_path: Path, text: str, out: Path, *extra: str) -> int:
    """``attn-harness run --no-isolation`` in this process (no worker start: fast)."""
    return main(["run", "--backend", "sdpa-math", "--suite", suite(tmp_path, text, "s.toml"),
                 "--checks", "fwd", "--explore", "0", "--out", str(out), "--no-isolation",
                 *extra])


# ------------------------------------------------------------------ resume in this process


def test_resume_without_isolation_keeps_the_records_and_runs_only_what_is_missing(tmp_path,
                                                                                  capsys):
    out = tmp_path / "out"
    assert run_here(tmp_path, ONE, out) == 0
    (first,) = (out / "results.jsonl").read_text().splitlines()
    assert run_here(tmp_path, TWO, out, "--resume") == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == first  # kept as it was, not run again
    assert "resuming: 1 record(s) kept, 1 task(s) to go" in capsys.readouterr().err
    assert run_here(tmp_path, TWO, out, "--resume") == 0
    assert (out / "results.jsonl").read_text().splitlines() == lines  # nothing added


# ------------------------------------------------------------------------------- profile


def test_records_carry_their_profile_and_a_resume_under_another_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_here(tmp_path, ONE, out) == 0
    assert [r.profile for r in read_records(out / "results.jsonl")] == ["quick"]
    capsys.readouterr()
    assert run_here(tmp_path, TWO, out, "--resume", "--profile", "nightly") == 2
    line = one_line(capsys.readouterr().err)
    assert "profile (quick, this run nightly)" in line
    assert len(read_records(out / "results.jsonl")) == 1  # nothing appended


def test_a_resume_of_records_without_a_profile_is_refused_naming_the_field(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_here(tmp_path, ONE, out) == 0
    results = out / "results.jsonl"
    data = json.loads(results.read_text())
    del data["profile"]  # as an older attn-harness wrote it: still a readable record
    results.write_text(json.dumps(data) + "\n")
    assert read_records(results)[0].profile == ""
    capsys.readouterr()
    assert run_here(tmp_path, ONE, out, "--resume") == 2
    assert "profile (not recorded" in one_line(capsys.readouterr().err)


# ----------------------------------------------------------------- one run per out folder


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process that holds ``out``'s lock (as a run in progress does) until killed."""
    code = ("import sys, time; from harness.results import outdir; outdir.lock(sys.argv[1]); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_process(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        assert run_here(tmp_path, ONE, out) == 2
        line = one_line(capsys.readouterr().err)
        assert f"is in use by process {holder.pid} (" in line and "--out" in line
        assert not (out / "results.jsonl").exists()
        with pytest.raises(UsageError, match=f"process {holder.pid}"):
            outdir.lock(out)
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the lock goes with the process
        holder.wait()
    assert (out / outdir.LOCK_NAME).exists()  # the stale file blocks nothing
    assert run_here(tmp_path, ONE, out) == 0
    with outdir.lock(out):  # released when the run ended
        pass


# ---------------------------------------------------------- killed while shrinking, resumed


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A run whose kernel kills it (SIGKILL) while exploration shrinks the failure it found,
    then ``--resume``, then ``--resume`` of the finished run: (regression files after the kill,
    the regressions folder, the three results, the records after each)."""
    tmp = tmp_path_factory.mktemp("killed")
    plain = suite(tmp, "[[case]]\nseqlen_q = 1\nheads_q = 1\nhead_dim = 32\n", "one.toml")
    out, regressions, kills = tmp / "out", tmp / "regressions", tmp / "kills"
    kills.mkdir()
    argv = ["run", "--backend", f"{KERNELS}:off_by_one_then_kill", "--suite", plain,
            "--checks", "fwd", "--explore", "8", "--out", str(out), "--regressions",
            str(regressions)]
    env = {"CI": "1"}  # no hypothesis database: the resumed run must find the failure itself
    killed = cli(*argv, env={**env, "ATTN_TEST_KILL_DIR": str(kills)})
    after_kill = (out / "results.jsonl").read_text().splitlines()
    written_before_resume = sorted(regressions.glob("*.toml"))
    time.sleep(1)  # the orphaned worker ends itself
    resumed = cli(*argv, "--resume", env=env)
    after_resume = (out / "results.jsonl").read_text().splitlines()
    again = cli(*argv, "--resume", env=env)
    after_again = (out / "results.jsonl").read_text().splitlines()
    return (written_before_resume, regressions, (killed, resumed, again),
            (after_kill, after_resume, after_again))


@pytest.mark.slow  # one killed run and two resumed ones, ~50 s together
def test_the_first_failing_example_is_a_record_before_the_kill(killed_and_resumed):
    written, _, (killed, _, _), (after_kill, _, _) = killed_and_resumed
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    failing = [json.loads(x) for x in after_kill if json.loads(x)["status"] == "fail"]
    assert failing and all(r["suite"] == "explore" for r in failing)
    assert written == []  # killed before the shrinking ended


@pytest.mark.slow  # one killed run and two resumed ones, ~50 s together
def test_a_resumed_run_picks_up_from_the_failure_found_before_the_kill(killed_and_resumed):
    _, regressions, (_, resumed, _), (after_kill, after_resume, _) = killed_and_resumed
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    (failed,) = [json.loads(x) for x in after_kill if json.loads(x)["status"] == "fail"]
    drawn = sum(1 for x in after_kill if json.loads(x)["suite"] == "explore")
    # the recorded failure is the first failure again: no other case is drawn before it
    assert f"case {drawn} failed after" in resumed.stderr, resumed.stderr[-3000:]
    assert "shrunk in" in resumed.stderr and "written to" in resumed.stderr
    (written,) = regressions.glob("*.toml")
    from harness.case.suites import load_file

    (case,) = load_file(written).cases
    assert case.seqlen_q == 2  # the smallest case that still fails
    assert after_resume[:len(after_kill)] == after_kill  # kept, not rewritten
    added = {json.loads(x)["case_id"] for x in after_resume[len(after_kill):]}
    assert added == {case.case_id}  # only the minimal case's records are new
    assert failed["case_id"] != case.case_id


def test_the_exploration_of_a_resumed_run_sees_the_records_it_keeps():
    """What the resumed exploration is told about a case it ran before the interruption: its
    records, so a failure stays a failure (no worker is started for them)."""
    from harness.case import Case
    from harness.results.records import Record
    from harness.run.worker import ExplorationWorker, Task

    case = Case(seqlen_q=16, heads_q=2, head_dim=32)
    kept = Record(case_id=case.case_id, case=case.to_dict(), backend={"name": "k"},
                  target={"target_id": "t"}, check="fwd", status="fail", reason="off by one",
                  suite="explore", profile="quick")
    runner = ExplorationWorker(timeout_s=10)
    task = Task(suite="explore", case=case, backend="k", checks=("fwd",))
    assert runner.run(task, lambda r: None, {("k", case.case_id, "fwd"): kept}) == [kept]
    assert runner.worker is None


@pytest.mark.slow  # one killed run and two resumed ones, ~50 s together
def test_resuming_a_finished_run_adds_nothing(killed_and_resumed):
    _, _, (_, _, again), (_, after_resume, after_again) = killed_and_resumed
    assert again.returncode == 1, again.stderr[-3000:]
    assert "shrunk in" in again.stderr  # the failure is still reported
    assert after_again == after_resume


# ------------------------------------------------------------- outputs that are inputs


@pytest.fixture(scope="module")
def results_file(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("results")
    assert run_here(tmp, ONE, tmp / "out") == 0
    return tmp / "out" / "results.jsonl"


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotted"])
@pytest.mark.parametrize("command", ["report", "compare"])
def test_an_output_that_is_an_input_is_refused(tmp_path, capsys, results_file, how, command):
    given = tmp_path / "results.jsonl"
    given.write_bytes(results_file.read_bytes())
    before = given.read_bytes()
    output = {"same": given, "symlink": tmp_path / "link.md", "hardlink": tmp_path / "hard.md",
              "dotted": tmp_path / "." / "results.jsonl"}[how]
    if how == "symlink":
        output.symlink_to(given)
    elif how == "hardlink":
        os.link(given, output)
    argv = ([command, str(given), "-o", str(output)] if command == "report" else
            [command, str(results_file), "--baseline", str(given), "-o", str(output)])
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "is the input" in one_line(captured.err) and captured.out == ""
    assert given.read_bytes() == before


# ---------------------------------------------------------------- links in place of files


@pytest.mark.parametrize("name", ["results.jsonl", "report.md", "jury.jsonl"])
def test_a_link_in_place_of_a_written_file_is_refused(tmp_path, capsys, name):
    out, outside = tmp_path / "out", tmp_path / "outside.txt"
    out.mkdir()
    outside.write_text("not the harness's\n")
    (out / name).symlink_to(outside)
    assert run_here(tmp_path, ONE, out) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{name} is a symlink" in line and "--out" in line
    assert outside.read_text() == "not the harness's\n"
    assert sorted(p.name for p in out.iterdir()) == sorted([name, outdir.LOCK_NAME])


def test_writers_do_not_follow_a_link_made_after_the_check(tmp_path):
    from harness.errors import RecordsError
    from harness.results import jury
    from harness.results.records import RecordWriter

    outside = tmp_path / "outside.txt"
    outside.write_text("kept\n")
    for name in ("results.jsonl", "jury.jsonl"):
        (tmp_path / name).symlink_to(outside)
    with pytest.raises(RecordsError, match="is a symlink"):
        RecordWriter(tmp_path / "results.jsonl")
    with pytest.raises(UsageError, match="is a symlink"):
        jury.write([], tmp_path / "jury.jsonl")
    assert outside.read_text() == "kept\n"
