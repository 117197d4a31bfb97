"""The work guard: checks whose pass needs more FLOPs than the machine's limit become skips with
the estimate in the reason (a CPU has a default limit; a GPU none; --max-gflop sets it)."""

from __future__ import annotations

import pytest

from harness.backends import load_backend
from harness.case import Case
from harness.checks.plan import CPU_MAX_GFLOP, plan, work_flops, work_limit_gflop, work_reasons
from harness.cli import main
from harness.run.worker import Task, execute
from harness.target import Target

CPU = Target(vendor="cpu", device_name="test CPU", arch="x86_64", memory_bytes=24 * 2**30)
GPU = Target(vendor="nvidia", device_name="NVIDIA H100", arch="sm_90", device_count=1,
             memory_bytes=80 * 2**30)
ALL = ("fwd", "bwd", "determinism", "throughput")
PREFILL_8K = Case(seqlen_q=8192, heads_q=32, heads_kv=8, head_dim=128, dtype="bfloat16",
                  causal=True)
# 4 * 32 * 128 * 128 * 128 = 0.27 GFLOP forward, 0.94 forward + backward
SMALL = Case(seqlen_q=128, heads_q=32, heads_kv=8, head_dim=128, dtype="bfloat16")


def test_limit_in_force():
    assert work_limit_gflop(CPU, None) == CPU_MAX_GFLOP == 2.0
    assert work_limit_gflop(GPU, None) == 0  # no default limit on a GPU
    assert work_limit_gflop(CPU, 0) == 0
    assert work_limit_gflop(GPU, 5) == 5


def test_work_counts_flash_attn_flops_and_backward_factor():
    assert work_flops(SMALL, "fwd") == 4 * 32 * 128 * 128 * 128
    assert work_flops(SMALL, "bwd") == int(3.5 * 4 * 32 * 128 * 128 * 128)
    assert work_flops(SMALL, "throughput") == work_flops(SMALL, "fwd")


def test_too_large_for_a_cpu_skips_every_check_with_the_estimate():
    the_plan = plan(PREFILL_8K, load_backend("sdpa-math"), CPU, ALL)
    assert the_plan.run == ()
    assert the_plan.skips["fwd"] == ("needs about 550 GFLOP per forward pass, more than the 2 "
                                     "GFLOP limit on this CPU (--max-gflop N raises it, 0 "
                                     "removes it)")
    assert "per forward + backward pass" in the_plan.skips["bwd"]
    assert set(the_plan.skips) == set(ALL)


def test_only_the_checks_over_the_limit_are_skipped():
    the_plan = plan(SMALL, load_backend("sdpa-math"), CPU, ALL, max_gflop=0.5)
    assert the_plan.run == ("fwd", "determinism", "throughput")
    assert the_plan.skips == {"bwd": work_reasons(SMALL, CPU, ("bwd",), 0.5)["bwd"]}
    assert "needs about 0.94 GFLOP per forward + backward pass" in the_plan.skips["bwd"]


def test_no_limit_on_a_gpu_or_with_zero():
    assert work_reasons(PREFILL_8K, GPU, ALL, None) == {}
    assert work_reasons(PREFILL_8K, CPU, ALL, 0) == {}
    assert "limit here" in work_reasons(PREFILL_8K, GPU, ("fwd",), 100)["fwd"]


def test_memory_is_checked_before_work():
    huge = Case(seqlen_q=1, seqlen_k=1 << 22, heads_q=32, heads_kv=8, head_dim=128)
    the_plan = plan(huge, load_backend("sdpa-math"), CPU, ("fwd",))
    assert the_plan.skips["fwd"].startswith("needs about ") and "GiB" in the_plan.skips["fwd"]


def test_the_limit_travels_with_the_task_to_the_worker():
    tiny = Case(seqlen_q=16, heads_q=2, head_dim=16, dtype="float32")
    task = Task(suite="t", case=tiny, backend="sdpa-math", checks=("fwd",), max_gflop=1e-9)
    records = [payload for kind, payload in execute(task, CPU, {}) if kind == "record"]
    assert [(r.check, r.status) for r in records] == [("fwd", "skip")]
    assert "GFLOP limit on this CPU" in records[0].reason


@pytest.mark.parametrize("value", ["-1", "lots"])
def test_cli_rejects_a_bad_limit_in_one_line(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--max-gflop", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"attn-harness run: error: argument --max-gflop: could not parse "
                          f"{value!r}") and "\n" not in err
