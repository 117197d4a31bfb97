""".ci/gpu-check degrades on a machine without a GPU: it says so, skips the GPU families'
steps with the reason, keeps to its time budget and still packs what it did."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "gpu-check"


@pytest.mark.skipif(torch.cuda.is_available(), reason="pins the behaviour without a GPU")
def test_without_a_gpu_it_says_so_and_skips_what_needs_one(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "BUDGET": "90",
           "SKIP": "run problems sweep pytest fidelity"}
    proc = subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "no GPU here" in out
    assert "== fa4-compile: skipped (no GPU here)" in out
    assert "== flashinfer-compile: skipped (" in out
    assert "== run: skipped (SKIP)" in out and "== fidelity: skipped (SKIP)" in out
    with tarfile.open(tmp_path / "gpu-check.tar.gz") as packed:
        names = packed.getnames()
    assert "./info.log" in names and "./info.json" in names, out
