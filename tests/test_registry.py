"""A new check is one registry entry and one function: the framework reads the rest from the
registry (``CheckSpec``). Shown with the throwaway gradient and timing checks of
``tests/fixtures/checks/throwaway.py``, which touch nothing else, run end to end through
``attn-harness run`` (in this process: ``--no-isolation``), ``report`` and ``compare``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

DENSE = '{batch = 1, seqlen_q = 33, seqlen_k = 40, heads_q = 2, head_dim = 32, dtype = "float32"}'
KVCACHE = ('{batch = 1, seqlen_q = 1, seqlen_k = 48, heads_q = 2, head_dim = 32, '
           'dtype = "float32", entry = "kvcache"}')

#: flash-attn's API in plain PyTorch: every entry point, a backward, on the CPU.
BACKEND = "flash-attn@tests/fixtures/flash_attn_ref.py"

PROGRAM = textwrap.dedent("""
    import sys
    import tests.fixtures.checks.throwaway  # declares and registers the two checks first
    from harness.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def harness(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROGRAM, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={"PYTHONPATH": str(REPO),
                                                       "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("registry")
    result = harness("run", "--no-isolation", "--backend", BACKEND,
                     "--checks", "fwd,dv-only,fwd-time", "--case", DENSE, "--case", KVCACHE,
                     "--out", str(out / "run"), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in
               (out / "run" / "results.jsonl").read_text().splitlines()]
    return out, records


def by(records, entry: str, check: str) -> dict:
    (record,) = [r for r in records
                 if r["check"] == check and r["case"].get("entry", "dense") == entry]
    return record


def test_the_new_checks_run_and_are_recorded(run):
    _, records = run
    dv = by(records, "dense", "dv-only")
    assert dv["status"] == "pass" and dv["metrics"]["ratio"] is not None
    timed = by(records, "dense", "fwd-time")
    assert timed["status"] == "pass" and timed["metrics"]["tflops"] > 0


def test_a_gradient_check_is_refused_where_there_is_no_backward(run):
    _, records = run
    refused = by(records, "kvcache", "dv-only")
    assert refused["status"] == "skip"
    assert refused["reason"] == "the kvcache entry point is forward-only"


def test_report_and_compare_take_the_new_checks(run):
    out, _ = run
    results = str(out / "run" / "results.jsonl")
    report = harness("report", results, cwd=REPO)
    assert report.returncode == 0, report.stderr
    assert "dv-only" in report.stdout
    throughput = report.stdout[report.stdout.index("Throughput"):]
    assert "b1 q33 k40 h2 d32 f32" in throughput  # the timing check's row
    compared = harness("compare", results, "--baseline", results, cwd=REPO)
    assert compared.returncode == 0, compared.stderr


def test_the_work_limit_counts_a_gradient_check_as_forward_plus_backward():
    program = textwrap.dedent("""
        import tests.fixtures.checks.throwaway
        from harness.case import Case
        from harness.checks.plan import work_flops
        case = Case(batch=1, seqlen_q=64, seqlen_k=64, heads_q=2, head_dim=32)
        print(work_flops(case, "dv-only") / case.flops_fwd(), work_flops(case, "fwd-time")
              / case.flops_fwd())
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3.5", "1.0"]
