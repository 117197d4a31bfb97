"""run_tasks_on_devices: one worker per device, every task once, records serialised to the sink.

On this CPU machine the "devices" are two CPU workers (a worker given a device index on a
machine without GPUs simply runs on the CPU), which exercises the scheduling for real.
"""

from __future__ import annotations

import threading

from harness.case import Case
from harness.cli import _devices
from harness.run.worker import Task, Worker, run_tasks_on_devices

CASES = [Case(seqlen_q=16 + i, heads_q=2, head_dim=16, dtype="float32") for i in range(5)]


def tasks():
    return [Task(suite="t", case=c, backend="sdpa-math", checks=("fwd",)) for c in CASES]


class Sink:
    """Collects records and fails if two threads are ever inside it at once."""

    def __init__(self) -> None:
        self.records = []
        self.inside = threading.Lock()
        self.overlaps = 0

    def __call__(self, record) -> None:
        if not self.inside.acquire(blocking=False):
            self.overlaps += 1
            self.inside.acquire()
        try:
            self.records.append(record)
        finally:
            self.inside.release()


def test_tasks_spread_over_two_workers_each_run_once():
    sink = Sink()
    seen = []
    first = Worker()
    first.start()
    outcome = run_tasks_on_devices(tasks(), sink, devices=[0, 1], timeout_s=120,
                                   progress=lambda task, records: seen.append(task.case.case_id),
                                   first_worker=first)
    assert sink.overlaps == 0
    assert sorted(r.case_id for r in sink.records) == sorted(c.case_id for c in CASES)
    assert all(r.status == "pass" for r in sink.records), [r.reason for r in sink.records]
    assert sorted(seen) == sorted(c.case_id for c in CASES)
    assert outcome.counts == {"pass": len(CASES)}
    assert not first.process.is_alive()  # reused for device 0, stopped at the end


def test_devices_all_on_a_cpu_is_a_note_not_an_error():
    notes: list[str] = []
    assert _devices("all", {"device_count": 0, "vendor": "cpu"}, notes) == []
    assert notes == ["--devices all: no GPU here, so one worker runs on the CPU"]
    notes.clear()
    assert _devices((1, 0), {"device_count": 2, "vendor": "nvidia"}, notes) == [1, 0]
    assert notes == ["--devices: one worker on each of device(s) 1,0"]
    assert _devices(None, {"device_count": 2, "vendor": "nvidia"}, notes) == []
