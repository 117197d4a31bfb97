"""Shared fixtures for the harness's self-tests (CPU, fast)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]


def cpu_threads_per_worker() -> int:
    """The CPU threads each pytest-xdist worker's torch gets: the machine's cores shared out.

    torch's CPU kernels start one thread per core, and a parallel region waits for all of them:
    two workers with two threads each on two cores (and the harness subprocesses they start)
    keep descheduling each other's threads, and a job that takes 55 s alone took 290 s beside
    the other worker. The suite's times are not what it judges (benches are); its subprocesses
    inherit the setting through ``OMP_NUM_THREADS``."""
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    return max(1, (os.cpu_count() or 1) // workers)


# In each xdist worker, before anything imports torch (test modules do, after this file). The
# controller sets nothing, so a value found here is the user's, and it stays.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_worker()))


@pytest.fixture
def repo() -> Path:
    return REPO
