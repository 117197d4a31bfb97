"""Processes a kernel leaves behind end with the run, wherever they went
(tests/fixtures/kernels/escaping_kernels.py): a child in a session of its own, an orphan
re-parented away from the worker, after a crash and after a timeout. Before, the worker's
process group was killed and a child in its own session outlived the run, holding the
harness's stdout open."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.case import Case
from harness.results.records import Record
from harness.run.worker import Task, run_tasks

pytestmark = pytest.mark.skipif(not Path("/proc/self").is_dir() or not hasattr(os, "fork"),
                                reason="needs Linux processes")

KERNELS = Path(__file__).resolve().parent / "fixtures" / "kernels" / "escaping_kernels.py"
TINY = Case(seqlen_q=16, heads_q=1, head_dim=16, dtype="float32")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _run(tmp_path, kernel: str, timeout_s: float = 120, **kwargs):
    pids = tmp_path / "pids"
    records: list[Record] = []
    outcome = run_tasks([Task("t", TINY, f"{KERNELS}:{kernel}", ("fwd",))], records.append,
                        timeout_s=timeout_s, env={"ATTN_TEST_PID_FILE": str(pids)}, **kwargs)
    left = [int(x) for x in pids.read_text().split()] if pids.exists() else []
    assert left, "the kernel ran and left a process"
    return records, left, outcome


@pytest.mark.parametrize("kernel, status", [
    ("session_child_then_return", "pass"),
    ("orphaned_grandchild_then_return", "pass"),
    ("session_child_then_abort", "crash"),
])
def test_what_a_kernel_leaves_outside_the_worker_group_does_not_outlive_the_run(tmp_path,
                                                                                kernel, status):
    records, left, _ = _run(tmp_path, kernel)
    assert [r.status for r in records] == [status], records[0].reason
    assert all(_gone_within(pid, 5) for pid in left), f"{left} outlived the run"


def test_a_session_child_of_a_kernel_that_times_out_is_gone(tmp_path):
    records, left, _ = _run(tmp_path, "session_child_then_sleep", timeout_s=3)
    assert [r.status for r in records] == ["timeout"]
    assert all(_gone_within(pid, 5) for pid in left), f"{left} outlived the run"


def test_a_session_child_is_ended_with_its_case_while_the_worker_lives_on(tmp_path):
    records, left, outcome = _run(tmp_path, "session_child_then_return", keep_worker=True)
    try:
        assert outcome.worker is not None and outcome.worker.process.is_alive()
        assert all(_gone_within(pid, 5) for pid in left), f"{left} outlived its case"
    finally:
        outcome.worker.stop()


def test_the_harness_stdout_is_not_held_open_by_a_kernel_child(tmp_path):
    """`attn-harness run ... | cat` ends when the run does: the pipe's last writer is gone."""
    start = time.monotonic()
    env = {**os.environ, "ATTN_TEST_PID_FILE": str(tmp_path / "pids")}
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--backend",
         f"{KERNELS}:session_child_then_return", "--case", TINY.to_inline_toml(),
         "--checks", "fwd", "--out", str(tmp_path / "out")],
        capture_output=True, env=env, timeout=100, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert time.monotonic() - start < 60, "the pipe stayed open until the child's sleep ended"


RAISES = Path(__file__).resolve().parent / "fixtures" / "kernels" / "raises_base_exceptions.py"


@pytest.mark.parametrize("kernel, named", [
    ("keyboard_interrupt", "KeyboardInterrupt: interrupted inside the kernel"),
    ("generator_exit", "GeneratorExit"),
    ("system_exit", "SystemExit: 3"),
])
def test_a_kernel_raising_what_ends_a_process_is_a_crash_that_names_it(kernel, named, capfd):
    records: list[Record] = []
    run_tasks([Task("t", TINY, f"{RAISES}:{kernel}", ("fwd", "bwd")),
               Task("t", TINY, "sdpa-math", ("fwd",))], records.append, timeout_s=120)
    assert [(r.check, r.status) for r in records] == [("fwd", "crash"), ("bwd", "skip"),
                                                      ("fwd", "pass")]
    assert records[0].reason.startswith(f"the kernel raised {named} during fwd")
    assert "Traceback" not in capfd.readouterr().err
