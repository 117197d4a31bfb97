"""Progress a user can follow (issue 24, point 2): a line per judged case with what is left,
failures' reasons on the console, shrinking steps as they happen, a live line only in a
terminal outside CI, and the plugin's suite cases before its exploration."""

from __future__ import annotations

import io
from types import SimpleNamespace

from harness.case import Case
from harness.results.records import Record
from harness.run.progress import Console, Estimate, duration, live_wanted


def _record(case: Case, check: str, status: str, **metrics) -> Record:
    return Record(case_id=case.case_id, case=case.to_dict(), backend={"name": "b"},
                  target={"target_id": "t"}, check=check, status=status, metrics=metrics,
                  reason="out: 3 of 8 elements exceed the tolerance" if status == "fail" else "")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_live_line_only_in_a_terminal_outside_ci():
    assert live_wanted(_Tty(), environ={})
    assert not live_wanted(_Tty(), environ={"CI": "true"})
    assert not live_wanted(io.StringIO(), environ={})


def test_the_estimate_uses_each_backends_mean_task_time():
    estimate = Estimate({"fast": 4, "slow": 2})
    assert estimate.left_s() is None
    estimate.add("fast", 1.0)
    estimate.add("slow", 10.0)
    assert estimate.left_s() == 3 * 1.0 + 1 * 10.0
    assert estimate.text() == "2/6, ETA 13s"
    assert (duration(13), duration(185), duration(3720)) == ("13s", "3m05s", "1h02m")


def test_suite_lines_count_estimate_rate_and_reason():
    out = io.StringIO()
    console = Console(out, live=False)
    case = Case(seqlen_q=8, heads_q=1)
    tasks = [SimpleNamespace(backend=b, case=case) for b in ("a", "a", "b")]
    console.suite(tasks)
    console.task(tasks[0], [_record(case, "fwd", "pass"),
                            _record(case, "throughput", "pass", tflops=4.72e-4)])
    console.task(tasks[1], [_record(case, "fwd", "fail")])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/3]") and "ETA" in lines[0]
    assert "fwd ok | throughput 472 MFLOP/s" in lines[0]
    assert lines[1].startswith("[2/3]") and lines[1].endswith("fwd FAIL")
    assert lines[2].strip() == "fwd fail: out: 3 of 8 elements exceed the tolerance"


def test_a_live_console_writes_its_lines_above_a_progress_bar():
    out = _Tty()
    console = Console(out, live=True)
    case = Case(seqlen_q=8, heads_q=1)
    task = SimpleNamespace(backend="a", case=case)
    console.suite([task, task])
    assert console._bar is not None
    console.task(task, [_record(case, "fwd", "pass")])
    console.close()
    assert "[1/2]" in out.getvalue() and "suite" in out.getvalue()


def test_exploration_reports_each_case_and_each_shrinking_step_as_it_happens(tmp_path,
                                                                            monkeypatch):
    from harness.backends import load_backend
    from harness.run.explore import explore

    out = io.StringIO()
    console = Console(out, live=False)
    console.exploring("fake", 6)
    seen = []

    def run_case(case: Case) -> list[Record]:
        seen.append(len(out.getvalue().splitlines()))  # lines printed before this case ran
        return [_record(case, "fwd", "fail" if case.seqlen_q > 1 else "pass")]

    monkeypatch.delenv("CI", raising=False)  # CI keeps no example database
    run_dir = tmp_path / "0001-rev-20260101-000000"
    result = explore("fake", load_backend("tests/zoo/kernels.py:correct").capabilities,
                     run_case, examples=6, on_case=lambda *a: console.explored("fake", *a),
                     regressions=run_dir / "regressions", database_dir=run_dir / ".hypothesis")
    assert len(list((run_dir / "regressions").glob("*.toml"))) == 1  # in the run's folder
    lines = out.getvalue().splitlines()
    assert result.minimal is not None and result.shrink_steps > 0
    assert seen == sorted(seen) and seen[-1] > 0  # printed while it ran, not after
    drawn = [line for line in lines if line.startswith("explore fake [")]
    assert drawn and all(" ETA " in line for line in drawn if "[6/6]" not in line)
    shrinks = [line for line in lines if line.startswith("explore fake shrink ")]
    assert len(shrinks) == result.shrink_steps and not any(" ETA " in x for x in shrinks)


def test_exploration_lines_estimate_what_is_left_of_the_backend():
    out = io.StringIO()
    console = Console(out, live=False)
    console.exploring("flex", 4)
    case = Case(seqlen_q=8, heads_q=1)
    for step in (1, 2, 3, 4):
        console.explored("flex", "generate", case, [_record(case, "fwd", "pass")], step)
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert all(" ETA " in line for line in lines[:3]) and " ETA " not in lines[3]


def test_the_plugin_runs_every_suite_case_before_exploring(pytester):
    import shutil

    from tests.conftest import REPO

    for name in ("test_cases.py", "test_explore.py"):
        shutil.copy(REPO / "harness" / "parity" / name, pytester.path / name)
    (pytester.path / "c.toml").write_text("[[case]]\nseqlen_q = 16\nheads_q = 2\n"
                                          "[[case]]\nseqlen_q = 8\nheads_q = 1\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--collect-only", "-q", "--attn-backend=sdpa-math",
        "--attn-backend=sdpa-flash", "--attn-suite=c.toml", "--attn-explore=2",
        f"--attn-out={pytester.path / 'out'}", timeout=300)
    items = [line for line in result.stdout.lines if "::test_" in line]
    kinds = [line.split("::")[1].split("[")[0] for line in items]
    assert kinds == ["test_case"] * 4 + ["test_explore"] * 2, items
