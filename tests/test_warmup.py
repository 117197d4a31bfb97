"""Compiling ahead (:mod:`harness.run.warmup`): a second process compiles the graphs that
torch's FlexAttention will need, and the run loads them instead of compiling them.

The run can only load what the warmer compiled if a case's graph is the same in any process,
whatever ran before it. Three things broke that, each tested here through the end-to-end test:
dynamo compiled a later case's graph differently after other cases (sizes seen earlier get
symbols of their own); the reference left torch's float32 matmul setting at ``"ieee"`` where a
fresh process has ``"none"``, a setting compiled graphs are keyed on; and a varlen case whose
dynamic-shape compile fails (torch 2.13, CPU) sent every later case of the run to static
graphs, while the warmer, going backwards, compiled those cases dynamic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from harness.run import warmup

THREE_CASES = textwrap.dedent("""
    [[case]]
    batch = 1
    seqlen_q = 32
    seqlen_k = 48
    heads_q = 2
    head_dim = 16
    dtype = "float32"

    [[case]]  # its dynamic-shape graph fails to compile on torch 2.13's CPU: a static one
    entry = "varlen"
    batch = 3
    seqlens_q = [64, 64, 64]
    seqlens_k = [64, 64, 64]
    heads_q = 4
    head_dim = 64
    dtype = "float16"
    causal = true

    [[case]]
    batch = 2
    seqlen_q = 40
    seqlen_k = 40
    heads_q = 4
    heads_kv = 2
    head_dim = 32
    dtype = "bfloat16"
    causal = true
""")

#: Warms flex-attention's graphs for a suite file and N exploration draws (checks fwd: no
#: gradients), printing the warmer's report.
WARM = textwrap.dedent("""
    import json, sys
    from harness.case.suites import load_suite
    from harness.run.machine import detect
    from harness.run.warmup import Exploration, Plan, warm
    cases = [c for s in load_suite(sys.argv[1]) for c in s.cases]
    plan = Plan(backend="flex-attention", cases=cases,
                exploration=Exploration("quick", int(sys.argv[2]), 0, False))
    print(json.dumps(warm(plan, detect(), {})))
""")


def _compiled_graphs(cache: Path) -> int:
    """Graphs in torch's FX graph cache."""
    return sum(1 for p in (cache / "fxgraph").rglob("*") if p.is_file())


@pytest.mark.slow  # four flex-attention compiles ahead, then a run that loads them: ~60 s
def test_graphs_compiled_ahead_are_the_ones_the_run_loads(tmp_path):
    suite = tmp_path / "three.toml"
    suite.write_text(THREE_CASES, encoding="utf-8")
    cache = tmp_path / "inductor"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    warmed = subprocess.run([sys.executable, "-c", WARM, str(suite), "1"], env=env,
                            capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(warmed.stdout.splitlines()[-1])
    # the suite's cases from the last backwards, then the one exploration draw
    assert len(report["compiled"]) == 4 and not report["failed"], report
    graphs = _compiled_graphs(cache)
    assert graphs >= 4

    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--backend", "flex-attention",
                          "--suite", str(suite), "--explore", "1", "--checks", "fwd",
                          "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiles the suite's and the exploration's graphs ahead" in run.stderr
    judged = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["case_id"] for r in judged} == set(report["compiled"])
    # the run (and its own warmer) compiled nothing: every graph was the warmer's
    assert _compiled_graphs(cache) == graphs


def test_the_warmer_goes_backwards_over_the_cases_the_run_calls_until_it_meets_the_run(
        tmp_path, monkeypatch):
    """It used to stop at the first cached case, taking it for the run's progress: but cases
    differing only in values or sizes share a graph (the smoke suite's ``vals=scaled100`` case
    is its first case's), so on a first run it stopped after one compile. It also compiled
    cases the run skips (dropout and kv-cache cases on flex-attention)."""
    from harness.backends import load_backend
    from harness.case import Case
    from harness.run.machine import detect

    counter = iter(range(1000))
    monkeypatch.setattr(warmup, "_cache_misses", lambda: next(counter))  # all compile
    cases = [Case(batch=1, seqlen_q=16 + i, heads_q=2, head_dim=16, dtype="float32")
             for i in range(6)]
    cases[4] = cases[4].replace(softcap=5.0)  # sdpa-math does not take it: the run skips it
    progress = tmp_path / "progress"
    progress.write_text("1", encoding="utf-8")  # the run has started cases[1]
    plan = warmup.Plan(backend="sdpa-math", cases=cases, progress_path=str(progress))
    done = warmup.warm(plan, detect(), {"sdpa-math": load_backend("sdpa-math")})
    assert done["compiled"] == [cases[5].case_id, cases[3].case_id, cases[2].case_id]
    assert done["stopped"] == "the run has come this far" and not done["failed"]
    # no progress file: every case the run calls; a cached streak ends it (a warm cache)
    monkeypatch.setattr(warmup, "_cache_misses", lambda: 0)
    done = warmup.warm(warmup.Plan(backend="sdpa-math", cases=cases), detect(), {})
    assert len(done["cached"]) == warmup.CACHED_STREAK and "cache is warm" in done["stopped"]


def test_the_run_tells_its_warmer_which_case_it_has_reached(monkeypatch):
    from harness.case import Case
    from harness.run import worker as worker_module
    from harness.run.worker import Task, Warmers

    monkeypatch.setattr(worker_module, "Worker", lambda idle: types.SimpleNamespace(
        send=lambda message: None, receive=lambda timeout: None, kill=lambda: None))
    cases = [Case(batch=1, seqlen_q=16 + i, heads_q=2, head_dim=16) for i in range(3)]
    warmers = Warmers([warmup.Plan(backend="flex-attention", cases=cases)]).start()
    try:
        plan, path, _ = warmers._progress[0]
        assert plan.progress_path == str(path) and warmup.run_reached(plan) == -1
        warmers.reached(Task("smoke", cases[1], "sdpa-math", ("fwd",)))  # another backend
        assert warmup.run_reached(plan) == -1
        warmers.reached(Task("smoke", cases[1], "flex-attention", ("fwd",)))
        assert warmup.run_reached(plan) == 1
    finally:
        warmers.workers.clear()  # stand-ins: no process to stop
        warmers.stop()
    assert not path.parent.exists()


def test_the_warmer_runs_at_idle_priority_and_so_do_the_compilers_it_starts():
    code = textwrap.dedent("""
        import os, subprocess, sys
        from harness.run.warmup import lower_priority
        how = lower_priority()
        child = subprocess.run([sys.executable, "-c",
                                "import os; print(os.sched_getscheduler(0))"],
                               capture_output=True, text=True, check=True).stdout.strip()
        print(how, os.sched_getscheduler(0), child, getattr(os, "SCHED_IDLE", -1))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    how, mine, child, idle = out
    if how != "SCHED_IDLE":
        pytest.skip(f"this machine gives no SCHED_IDLE (lowered by {how or 'nothing'})")
    assert mine == child == idle


class _Task:
    def __init__(self, backend: str, case: object, seed: int = 0, profile: str = "quick"):
        self.backend, self.case, self.seed, self.profile = backend, case, seed, profile
        self.checks, self.audit, self.max_gflop = ("fwd",), False, None


def test_only_a_cpu_run_of_a_backend_that_compiles_per_structure_is_warmed():
    resolved = {"flex-attention": {"compiles_per_structure": True, "availability": None},
                "sdpa-math": {"compiles_per_structure": False, "availability": None},
                "gone": {"compiles_per_structure": True, "availability": "not here"}}
    tasks = [_Task(spec, f"case-{spec}") for spec in ("sdpa-math", "flex-attention", "gone")]
    exploration = warmup.Exploration("quick", 20, 0, True)
    plans = warmup.plans(tasks, resolved, {"vendor": "cpu"}, exploration)
    assert [(p.backend, p.cases) for p in plans] == [("flex-attention",
                                                      ["case-flex-attention"])]
    assert plans[0].exploration == exploration
    # on a GPU the warmer's launches would share the device with the timed kernels
    assert warmup.plans(tasks, resolved, {"vendor": "nvidia"}, exploration) == []


class _Recorder:
    """Stands in for a run's warmers: records when the run would stop and continue them."""

    def __init__(self, log: list) -> None:
        self.log = log

    def pause(self, paused: bool) -> None:
        self.log.append(("pause" if paused else "go", None))

    def reached(self, task) -> None:
        self.log.append(("reached", task.case.case_id))


def test_the_warmers_are_stopped_exactly_while_a_check_is_timed():
    """With a warmer compiling beside it, the first run's timed cases read 6-13 GFLOP/s where
    they read 42-75 alone: idle priority was not enough, so the run stops the warmers while a
    timed check runs."""
    from harness.case import Case
    from harness.run import worker as worker_module
    from harness.run.worker import Task, run_tasks

    log: list = []
    recorder = _Recorder(log)
    worker_module._QUIET.append(recorder)
    try:
        case = Case(batch=1, seqlen_q=32, seqlen_k=32, heads_q=2, head_dim=16,
                    dtype="float32", checks=("fwd", "throughput"))
        run_tasks([Task("t", case, "sdpa-math", ("fwd", "throughput"))],
                  lambda record: log.append(("record", record.check)), timeout_s=300)
    finally:
        worker_module._QUIET.remove(recorder)
    assert log[0] == ("reached", case.case_id)  # told before the case starts
    events = [kind if kind != "record" else f"record {what}" for kind, what in log[1:]]
    fwd, timed = events.index("record fwd"), events.index("record throughput")
    assert "pause" not in events[:fwd]  # judging runs beside the warmers
    # stopped when the timed check begins, continued as soon as its record comes
    assert events[fwd + 1:timed] == ["pause", "go"]
    assert events[-1] == "go"


def test_a_paused_warmer_is_stopped_and_continues():
    from harness.run.worker import Warmers, Worker

    def state(pid: int, want: str) -> str:
        """The process's state once it is ``want`` (signals arrive asynchronously), or after
        5 s."""
        deadline = time.monotonic() + 5
        while True:
            now = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if (now == "T") == (want == "T") or time.monotonic() > deadline:
                return now
            time.sleep(0.02)

    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here")
    warmers = Warmers([])
    warmers.workers.append(Worker(idle=True))
    try:
        pid = warmers.workers[0].process.pid
        warmers.workers[0].start()
        warmers.pause(True)
        assert state(pid, "T") == "T"
        warmers.pause(False)
        assert state(pid, "running") != "T"
    finally:
        warmers.stop()


#: Starts a warmer on flex-attention, lets it compile a while, then ends it as a run does.
KILLED = textwrap.dedent("""
    import sys, time
    from harness.case import Case
    from harness.run.warmup import Plan
    from harness.run.worker import Warmers

    def main():
        case = Case(batch=1, seqlen_q=32, seqlen_k=48, heads_q=2, head_dim=16, dtype="float32")
        warmers = Warmers([Plan(backend="flex-attention", cases=[case])]).start()
        time.sleep(float(sys.argv[1]))
        warmers.stop()

    if __name__ == "__main__":
        main()
""")


@pytest.mark.slow  # a warmer killed in the middle of its first compile: ~15 s
def test_a_run_that_kills_its_warmer_leaves_no_leaked_semaphore_warning(tmp_path):
    """torch.fx's progress bar (tqdm) made a multiprocessing lock in the warmer; killing the
    warmer then left Python warning at the run's end of "1 leaked semaphore objects"."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED, encoding="utf-8")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, str(script), "12"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "leaked semaphore" not in done.stderr
