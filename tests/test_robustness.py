"""Bad input, bad environments and misbehaving kernels never turn into a pass, a traceback or
lost records (issue 11): case names beyond the BMP, trailing --case content, records with 1e999
or a case_id of another case, torn and empty results files, a full disk, a symlinked jury
directory, known-issue files with mistakes, and kernels whose child processes outlive them.

The kernels used here live in tests/zoo_robust/ and say what they imitate.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from harness.case import Case, case_from_dict
from harness.case.suites import parse_inline_case
from harness.errors import HarnessError, InvalidCase, RecordsError
from harness.results import records as recs
from harness.results.records import Record, RecordWriter, read_many, read_records

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "results"
H100 = FIXTURES / "synthetic-cuda12.4-sm90-h100.jsonl"
EMOJI_NAME = "rocket \U0001F680 case, \u00e9t\u00e9 \"quoted\" \\ tab\t"


def _record(case: Case, **changes) -> Record:
    fields = dict(case_id=case.case_id, case=case.to_dict(), backend={"name": "sdpa-flash"},
                  target={"target_id": "cpu-x86_64"}, check="fwd", status="fail",
                  metrics={"ratio": 5.0}, reason="too far")
    fields.update(changes)
    return Record(**fields)


# ------------------------------------------------------------------------ case text (item 5)


def test_a_name_beyond_the_bmp_survives_toml_and_the_replay_command():
    from harness.results.report import replay_command

    case = Case(batch=2, seqlen_q=17, heads_q=2, causal=True, name=EMOJI_NAME, source="\u2603")
    inline = case.to_inline_toml()
    assert inline.isascii() and "\\U0001F680" in inline
    again = parse_inline_case(inline)
    assert again == case and again.name == EMOJI_NAME and again.source == "\u2603"
    table = tomllib.loads(case.to_toml())["case"][0]
    assert case_from_dict(table).name == EMOJI_NAME
    words = shlex.split(replay_command(_record(case)))
    replayed = parse_inline_case(words[words.index("--case") + 1])
    assert replayed.case_id == case.case_id and replayed.name == EMOJI_NAME


@pytest.mark.parametrize("text", [
    "{seqlen_q = 16} garbage",
    "{seqlen_q = 16}\nx = 1",
    "{seqlen_q = 16}\n[other]\ny = 2",
])
def test_trailing_content_after_the_inline_case_is_refused(text):
    with pytest.raises(InvalidCase, match="--case"):
        parse_inline_case(text)


def test_an_inline_case_with_a_comment_is_still_fine():
    assert parse_inline_case("{seqlen_q = 16} # a comment").seqlen_q == 16


# ------------------------------------------------------------------ records on disk (item 4)


@pytest.fixture(scope="module")
def lines() -> list[str]:
    """Real lines of a records file (the synthetic H100 fixture)."""
    return [line for line in H100.read_text(encoding="utf-8").splitlines() if line][:4]


def _write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_text("\n".join(lines) + end, encoding="utf-8")
    return path


@pytest.mark.parametrize("number", ["1e999", "-1e999", "Infinity", "NaN"])
def test_an_overflowing_or_non_finite_number_is_refused(tmp_path, lines, number):
    data = json.loads(lines[0])
    data["metrics"]["ratio"] = 0.5
    text = json.dumps(data).replace("0.5", number, 1)
    path = _write(tmp_path / "r.jsonl", [lines[1], text])
    with pytest.raises(RecordsError, match=r"r\.jsonl:2: not JSON"):
        read_records(path)


def test_a_case_id_that_is_not_its_case_is_refused(tmp_path, lines):
    data = json.loads(lines[0])
    data["case"]["seqlen_q"] += 1  # the case changed, the id did not
    path = _write(tmp_path / "r.jsonl", [lines[1], json.dumps(data)])
    with pytest.raises(RecordsError, match=r"r\.jsonl:2: field 'case_id' is '[0-9a-f]{12}' but "
                                           r"its case has id"):
        read_records(path)


def test_resume_drops_a_torn_last_line_and_says_so(tmp_path, lines):
    path = _write(tmp_path / "r.jsonl", [*lines[:3], lines[3][:57]], end="")
    with pytest.raises(RecordsError, match=r"r\.jsonl:4: not JSON"):
        read_records(path)  # report and compare still refuse it
    records, note = recs.read_for_resume(path)
    assert len(records) == 3 and "r.jsonl:4: dropped a torn last line" in note
    assert path.read_text(encoding="utf-8") == "\n".join(lines[:3]) + "\n"
    with RecordWriter(path, append=True) as writer:  # what the resumed run appends
        writer.write(read_records(_write(tmp_path / "one.jsonl", [lines[3]]))[0])
    assert len(read_records(path)) == 4
    assert recs.read_for_resume(path)[1] == ""


def test_resume_refuses_a_bad_line_in_the_middle(tmp_path, lines):
    path = _write(tmp_path / "r.jsonl", [lines[0], lines[1][:40], lines[2]])
    with pytest.raises(RecordsError, match=r"r\.jsonl:2: not JSON"):
        recs.read_for_resume(path)


def test_resume_completes_a_last_record_whose_newline_is_missing(tmp_path, lines):
    path = _write(tmp_path / "r.jsonl", lines[:2], end="")
    records, note = recs.read_for_resume(path)
    assert len(records) == 2 and note == ""
    assert path.read_text(encoding="utf-8").endswith("}\n")


class FullDisk:
    """A file object on a disk that fills up after ``room`` bytes (as a full tmpfs does: the
    write that does not fit raises ENOSPC after writing what fitted)."""

    def __init__(self, room: int, code: int = errno.ENOSPC) -> None:
        self.data = bytearray()
        self.room, self.code = room, code

    def write(self, view) -> int:
        fits = max(0, min(len(view), self.room - len(self.data)))
        self.data += bytes(view[:fits])
        if fits < len(view):
            raise OSError(self.code, os.strerror(self.code))
        return fits

    def truncate(self, size: int) -> None:
        del self.data[size:]

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, lines, monkeypatch, code):
    records = read_records(_write(tmp_path / "src.jsonl", lines))
    writer = RecordWriter(tmp_path / "out.jsonl")
    first = len(records[0].to_json()) + 1
    fake = FullDisk(room=first + 30, code=code)
    writer._file.close()
    writer._file = fake
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    writer.write(records[0])
    with pytest.raises(RecordsError) as info:
        writer.write(records[1])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot write {tmp_path / 'out.jsonl'}: ")
    assert message.endswith("; records so far are kept") and os.strerror(code) in message
    assert isinstance(info.value, HarnessError)
    kept = _write(tmp_path / "kept.jsonl", [fake.data.decode()], end="")
    assert [r.case_id for r in read_records(kept)] == [records[0].case_id]


def test_a_results_path_that_cannot_be_opened_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecordsError, match=r"^cannot write .*file/results.jsonl: "):
        RecordWriter(tmp_path / "file" / "results.jsonl")


# ----------------------------------------------------------- empty results, missing (item 3)


def test_an_empty_or_missing_results_file_is_bad_input_for_report_and_compare(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(RecordsError, match=r"empty\.jsonl: holds no records"):
        read_many([H100, empty], require_records=True)
    with pytest.raises(RecordsError, match=r"nope\.jsonl: cannot read it"):
        read_many([tmp_path / "nope.jsonl"], require_records=True)
    assert read_records(empty) == []  # without the flag: unchanged (a run's own file)


def test_an_empty_run_against_a_full_baseline_regresses():
    from harness.results.compare import compare, render_markdown

    baseline = read_records(H100)
    result = compare([], baseline)
    assert result.regressed and result.missing == len(baseline)
    assert len(result.regressions) == len(baseline)
    assert {c.what for c in result.regressions} == {"missing"}
    assert "--allow-missing" in render_markdown(result)
    dropped = compare([], baseline, allow_missing=True)
    assert not dropped.regressed and dropped.missing == len(baseline)
    partial = compare(baseline[1:], baseline)
    assert [(c.case_id, c.check) for c in partial.regressions] == [
        (baseline[0].case_id, baseline[0].check)]


# ------------------------------------------------------------- processes of kernels (item 6)

KERNELS = Path(__file__).resolve().parent / "fixtures" / "kernels" / "process_kernels.py"
TINY = Case(seqlen_q=16, heads_q=1, head_dim=16, dtype="float32")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process took the pid
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _gone_within(pid: int, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_kernel_that_forks_then_aborts_is_a_crash_and_its_child_is_gone(tmp_path):
    import time

    from harness.run.worker import Task, run_tasks

    pids = tmp_path / "pids"
    task = Task("t", TINY, f"{KERNELS}:fork_then_abort", ("fwd", "bwd"))
    records: list[Record] = []
    start = time.monotonic()
    run_tasks([task], records.append, timeout_s=120, env={"ATTN_TEST_PID_FILE": str(pids)})
    elapsed = time.monotonic() - start
    assert [(r.check, r.status) for r in records] == [("fwd", "crash"), ("bwd", "skip")]
    assert "SIGABRT" in records[0].reason
    assert elapsed < 60  # the child holding the pipe did not stall the run until the timeout
    (child,) = _pids(pids)
    assert _gone_within(child, 5), f"the kernel's child {child} outlived the run"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_children_a_kernel_leaves_behind_do_not_outlive_the_run(tmp_path):
    from harness.run.worker import Task, run_tasks

    pids = tmp_path / "pids"
    task = Task("t", TINY, f"{KERNELS}:fork_then_return", ("fwd",))
    records: list[Record] = []
    run_tasks([task], records.append, timeout_s=120, env={"ATTN_TEST_PID_FILE": str(pids)})
    assert [r.status for r in records] == ["pass"], records[0].reason
    children = _pids(pids)
    assert children and all(_gone_within(pid, 5) for pid in children)


SCRIPT = """
import os, signal, sys, time
from harness.case import Case
from harness.run.worker import Task, Worker

pids = sys.argv[1]
worker = Worker(None, {"ATTN_TEST_PID_FILE": pids, "ATTN_TEST_SLEEP_S": "2"})
worker.start()
worker.send(Task("t", Case(seqlen_q=16, heads_q=1, head_dim=16, dtype="float32"),
                 sys.argv[2], ("fwd",)))
while not os.path.exists(pids):
    time.sleep(0.02)
os.kill(os.getpid(), signal.SIGKILL)  # the main process dies mid-task
"""


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_a_worker_whose_main_process_was_killed_ends_quietly(tmp_path):
    import subprocess
    import time

    pids = tmp_path / "pids"
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        subprocess.run([sys.executable, "-c", SCRIPT, str(pids), f"{KERNELS}:slow"],
                       stdout=stderr, stderr=stderr, timeout=300, check=False)
    (worker,) = _pids(pids)  # the kernel ran in the worker
    assert _gone_within(worker, 10)
    time.sleep(0.5)
    text = err.read_text()
    assert "Traceback" not in text and "BrokenPipeError" not in text, text


def test_the_exploration_goes_on_in_the_suites_worker_and_stops_it():
    """``attn-harness run`` hands the suite's worker to the exploration: one process start
    and, for compiled backends (flex-attention), their compiled graphs kept; a worker lost to a
    crash is still replaced, and the exploration stops the one it was given."""
    from harness.run.worker import ExplorationWorker, Task, run_tasks

    outcome = run_tasks([Task("t", TINY, "sdpa-math", ("fwd",))], lambda r: None,
                        timeout_s=120, keep_worker=True)
    worker = outcome.worker
    assert worker is not None and worker.process.is_alive()
    pid = worker.process.pid
    with ExplorationWorker(120, worker=worker) as runner:
        records = runner.run(Task("explore", TINY, "sdpa-math", ("fwd", "bwd")), lambda r: None)
        assert [r.status for r in records] == ["pass", "pass"]
        assert runner.worker is worker and worker.process.pid == pid
        crashed = runner.run(Task("explore", TINY, f"{KERNELS}:fork_then_abort", ("fwd",)),
                             lambda r: None)
        assert [r.status for r in crashed] == ["crash"]
        assert runner.worker is None or runner.worker.process.pid != pid
    worker.process.join(10)
    assert not worker.process.is_alive()
