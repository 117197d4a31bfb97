"""Loading a user's backend: what Python's import finds is found, whatever the file looks like
(tests/fixtures/kernels/generated/), and a spec that cannot work is one line and exit 2 before
any case runs. Before, a static reading of the file refused functions defined without a literal
``def`` ("has no function 'attn_generated_64' (it defines: torch)")."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.case import Case
from harness.run.session import validate_options
from harness.run.worker import Task, execute
from harness.target import detect

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kernels"
VARIANTS = FIXTURES / "generated" / "variants.py"
CASE = Case(batch=1, seqlen_q=16, seqlen_k=24, heads_q=2, head_dim=32, dtype="float16",
            causal=True)


@pytest.mark.parametrize("name", ["attn_generated_64", "attn_generated_128", "attn_set",
                                  "attn_star", "attn_lazy"])
def test_a_function_defined_without_def_is_found_and_runs(name):
    spec = f"{VARIANTS}:{name}"
    assert validate_options({"backend": [spec]}).backends == (spec,)
    records = [r for kind, r in execute(Task("t", CASE, spec, ("fwd",)), detect(), {})
               if kind == "record"]
    assert [r.status for r in records] == ["pass"], records[0].reason


BAD = FIXTURES / "bad_signatures.py"


@pytest.mark.parametrize("name, why", [
    ("two_inputs", "too many positional arguments"),
    ("needs_a_mask", "missing a required argument: 'mask'"),
    ("keyword_only", "too many positional arguments"),
    ("needs_a_block_size", "missing a required argument: 'block'"),
])
def test_a_function_that_cannot_take_q_k_v_is_a_usage_error(name, why):
    from harness.backends import load_backend
    from harness.errors import UsageError

    with pytest.raises(UsageError) as info:
        load_backend(f"{BAD}:{name}")
    text = str(info.value)
    assert text.startswith(f"--backend {BAD}:{name}: {name}(") and "\n" not in text
    assert f"cannot be called as {name}(q, k, v) ({why})" in text


def test_a_bad_signature_stops_the_run_before_any_case(tmp_path):
    """Exit 2 and one line; no records, no regression files (before: an error record per case
    and a regression file for each)."""
    import subprocess
    import sys

    out, regressions = tmp_path / "out", tmp_path / "regressions"
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--backend", f"{BAD}:needs_a_mask",
         "--suite", "smoke", "--checks", "fwd", "--explore", "2", "--out", str(out),
         "--regressions", str(regressions)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "cannot be called as needs_a_mask(q, k, v)" \
        in result.stderr
    assert not (out / "results.jsonl").exists() and not regressions.exists()


def _cli(*args: str, timeout: float = 300):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_an_import_that_ends_the_worker_is_named(tmp_path):
    spec = f"{FIXTURES / 'import_exits.py'}:attention"
    result = _cli("run", "--backend", spec, "--case", CASE.to_inline_toml(), "--out",
                  str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert f"error: --backend {spec}: while importing {FIXTURES / 'import_exits.py'}, the " \
           "worker process exited with status 3" in result.stderr


def test_an_import_that_hangs_obeys_the_timeout(tmp_path):
    import time

    spec = f"{FIXTURES / 'import_hangs.py'}:attention"
    start = time.monotonic()
    result = _cli("run", "--backend", spec, "--case", CASE.to_inline_toml(), "--timeout", "3",
                  "--out", str(tmp_path), timeout=200)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert f"--backend {spec}: importing {FIXTURES / 'import_hangs.py'} did not finish within " \
           "3 s (--timeout); the worker was killed" in result.stderr
    assert time.monotonic() - start < 120
