"""The timing method, checked with a fake clock: what is flushed, marked, synchronised and counted.

No assertion here depends on how fast anything runs: the fake clock's time advances only when the
fake kernel or flush says so.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from harness.case import Case
from harness.checks import timing
from harness.checks.timing import (
    Timing,
    measure,
    quantile,
    repetitions,
    summarize,
    tflops,
    time_function,
)


class FakeClock:
    """Virtual milliseconds; logs every flush, mark and sync."""

    method = "fake"

    def __init__(self, flush_ms: float = 0.0) -> None:
        self.now_ms = 0.0
        self.flush_ms = flush_ms
        self.log: list[str] = []

    def sync(self) -> None:
        self.log.append("sync")

    def flush(self) -> None:
        self.now_ms += self.flush_ms
        self.log.append("flush")

    def mark(self) -> float:
        self.log.append("mark")
        return self.now_ms

    def elapsed_ms(self, start: float, end: float) -> float:
        return end - start


class FakeKernel:
    """A call that takes ``durations_ms[i % n]`` of the clock's time on its i-th call."""

    def __init__(self, clock: FakeClock, *durations_ms: float) -> None:
        self.clock = clock
        self.durations = durations_ms
        self.calls = 0

    def __call__(self) -> None:
        self.clock.now_ms += self.durations[self.calls % len(self.durations)]
        self.calls += 1
        self.clock.log.append("call")


def timed_phase(log: list[str]) -> list[str]:
    """The log after the estimate's closing sync (the second sync)."""
    syncs = [i for i, e in enumerate(log) if e == "sync"]
    return log[syncs[1] + 1:]


def test_every_timed_call_is_flushed_and_marked_with_one_sync_at_the_end():
    clock = FakeClock(flush_ms=0.5)
    kernel = FakeKernel(clock, 1.0)
    t = measure(kernel, clock, warmup_s=0.0, budget_s=0.01, min_reps=3)
    tail = timed_phase(clock.log)
    assert tail[-1] == "sync" and tail.count("sync") == 1
    body = tail[:-1]
    assert body == ["flush", "mark", "call", "mark"] * t.reps
    assert clock.log.count("sync") == 3  # first call, estimate, end: no host round trips between


def test_estimate_includes_the_flush_so_the_budget_is_honoured():
    clock = FakeClock(flush_ms=1.0)
    kernel = FakeKernel(clock, 0.01)
    t = measure(kernel, clock, warmup_s=0.0, budget_s=0.1, min_reps=1)
    # 100 ms budget / (0.01 ms call + 1 ms flush) -> 99 reps, not 10,000.
    assert t.reps == 99
    assert t.median_ms == pytest.approx(0.01)  # the flush is outside the markers


@pytest.mark.parametrize(("first_ms", "estimate_calls"), [(1.0, 5), (20.0, 2), (400.0, 1)])
def test_estimate_uses_five_calls_like_do_bench_and_fewer_for_slow_first_calls(first_ms,
                                                                              estimate_calls):
    clock = FakeClock()
    measure(FakeKernel(clock, first_ms, 1.0, 1.0, 1.0, 1.0, 1.0), clock, warmup_s=0.05,
            budget_s=0.0, min_reps=1)
    first_sync, second_sync = [i for i, e in enumerate(clock.log) if e == "sync"][:2]
    assert clock.log[first_sync + 1:second_sync].count("call") == estimate_calls
    assert timing.ESTIMATE_CALLS == 5


def test_warmup_and_repetitions_follow_the_budgets():
    budgets = {"warmup_s": 0.05, "budget_s": 0.25, "min_reps": 5, "max_reps": 10**5}
    assert repetitions(1.0, 5, **budgets) == (45, 250)
    assert repetitions(1000.0, 1, **budgets) == (0, 5)
    assert repetitions(1e-9, 5, warmup_s=0.0, budget_s=1.0, min_reps=5, max_reps=1000) == (0, 1000)


def test_summary_is_the_median_and_linear_quartiles_of_the_timed_calls():
    clock = FakeClock()
    durations = (1.0, 2.0, 3.0, 4.0, 10.0)
    kernel = FakeKernel(clock, *durations)
    t = measure(kernel, clock, warmup_s=0.0, budget_s=0.0, min_reps=5)
    assert t.reps == 5
    # After the first call and 5 estimate calls the timed ones take 2, 3, 4, 10, 1 ms.
    assert (t.min_ms, t.q1_ms, t.median_ms, t.q3_ms) == (1.0, 2.0, 3.0, 4.0)
    assert t.iqr_ms == 2.0
    assert t.method == "fake"


def test_quantile_matches_torch():
    values = sorted([0.3, 1.7, 2.2, 9.0, 4.4, 4.5, 0.1])
    for q in (0.0, 0.2, 0.25, 0.5, 0.75, 0.8, 1.0):
        expected = torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()
        assert quantile(values, q) == pytest.approx(expected)
    s = summarize([5.0, 1.0, 3.0], "m")
    assert (s.median_ms, s.q1_ms, s.q3_ms, s.min_ms, s.reps) == (3.0, 2.0, 4.0, 1.0, 3)
    assert s.median_ms == statistics.median([5.0, 1.0, 3.0])


def test_summarize_refuses_no_times():
    with pytest.raises(ValueError, match="at least one"):
        summarize([], "m")


def test_tflops_units():
    assert tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert tflops(2e12, 1.0) == pytest.approx(2000.0)


def test_graph_replay_on_a_cpu_falls_back_and_says_so():
    calls = []
    t = time_function(lambda: calls.append(1), "cpu", warmup_s=0.0, budget_s=0.0, min_reps=2,
                      graph=True, clock=FakeClock())
    assert "graph replay unavailable" in t.note and "cpu is not a CUDA/HIP device" in t.note
    assert "graph" not in t.method
    assert calls  # the plain call was timed
    assert t.to_dict()["note"] == t.note


def test_graph_replay_times_the_replay_not_the_call():
    clock = FakeClock()
    plain = FakeKernel(clock, 5.0)
    replay = FakeKernel(clock, 1.0)
    captured = []

    def capture(fn, device):
        captured.append((fn, device))
        return replay

    t = time_function(plain, "cpu", warmup_s=0.0, budget_s=0.0, min_reps=3, graph=True,
                      clock=clock, capture=capture)
    assert captured and captured[0][0] is plain
    assert plain.calls == 0 and replay.calls > 0
    assert t.method == "fake+graph" and t.note == "" and "note" not in t.to_dict()
    assert t.median_ms == 1.0


def test_failed_capture_falls_back_to_plain_calls_and_names_the_error():
    clock = FakeClock()
    plain = FakeKernel(clock, 2.0)

    def capture(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    t = time_function(plain, "cpu", warmup_s=0.0, budget_s=0.0, min_reps=3, graph=True,
                      clock=clock, capture=capture)
    assert t.note == ("graph replay unavailable: capture failed with RuntimeError: operation not "
                      "permitted when stream is capturing")
    assert plain.calls > 0 and t.method == "fake" and t.median_ms == 2.0


def test_cpu_default_clock_is_perf_counter_in_blocks_without_flush(monkeypatch):
    monkeypatch.setattr(timing, "CPU_WARMUP_S", 0.0)
    monkeypatch.setattr(timing, "CPU_BUDGET_S", 0.0)
    t = time_function(lambda: None, "cpu", warmup_s=0.0, budget_s=0.0, min_reps=3)
    assert t.method.startswith("perf-counter") and "+blocks-of-" in t.method and t.reps == 3
    assert isinstance(t, Timing) and "flush" not in t.method


def test_cpu_timing_holds_the_allocator_steady_and_says_so():
    """SDPA's math path on a 512 x 512 problem frees and allocates MB-sized score tensors on
    every call; glibc serves them from fresh, page-faulting mmap memory or from its heap
    depending on the process's history (2.2 ms in one process, 6.0 ms in the next on our VM).
    Before CPU timing the thresholds are fixed: no page faults per call, and the method says
    so. Measured in fresh interpreters by their minor page faults per call."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    probe = (
        "import resource, sys, torch\n"
        "from torch.nn.attention import SDPBackend, sdpa_kernel\n"
        "from harness.checks.timing import steady_allocator\n"
        "label = steady_allocator() if sys.argv[1] == 'steady' else '-'\n"
        "q = torch.randn(1, 4, 512, 64)\n"
        "def f():\n"
        "    with sdpa_kernel(SDPBackend.MATH):\n"
        "        torch.nn.functional.scaled_dot_product_attention(q, q, q)\n"
        "for _ in range(20):\n"
        "    f()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20):\n"
        "    f()\n"
        "print(label, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)\n")
    env = {k: v for k, v in os.environ.items()  # glibc's own settings would decide instead
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    faults = {}
    for mode in ("plain", "steady"):
        label, per_call = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True,
                                         text=True, check=True, env=env).stdout.split()
        faults[mode] = float(per_call)
        assert label == ("+malloc-steady" if mode == "steady" else "-")
    # plain: 650-2,300 faults per call measured (a 1 MiB block is 256 pages); steady: 0 on an
    # idle machine, up to 38 beside the other test worker (the heap still growing)
    assert faults["plain"] > 100 and faults["steady"] < faults["plain"] / 10, faults
    t = time_function(lambda: None, "cpu", warmup_s=0.0, budget_s=0.0, min_reps=3)
    assert "+malloc-steady" in t.method


def test_cpu_timing_has_floors_whatever_the_profile_asks(monkeypatch):
    seen = {}

    def fake_blocked(fn, clock, **kwargs):
        seen.update(kwargs)
        return summarize([1.0], "x")

    monkeypatch.setattr(timing, "measure_blocked", fake_blocked)
    time_function(lambda: None, "cpu", warmup_s=0.05, budget_s=0.25, min_reps=5)
    assert seen["warmup_s"] == timing.CPU_WARMUP_S and seen["budget_s"] == timing.CPU_BUDGET_S
    time_function(lambda: None, "cpu", warmup_s=1.0, budget_s=3.0, min_reps=5)
    assert seen["warmup_s"] == 1.0 and seen["budget_s"] == 3.0


def test_blocked_warms_up_by_time_and_times_blocks_until_the_budget():
    clock = FakeClock()
    kernel = FakeKernel(clock, 0.5)  # 0.5 ms a call -> blocks of 4 calls (2 ms)
    t = timing.measure_blocked(kernel, clock, warmup_s=0.1, budget_s=0.2, min_reps=5)
    assert t.method == "fake+blocks-of-4" and t.median_ms == 0.5
    # 1 first call, 200 warm-up calls (0.1 s), then 4-call blocks until 0.2 s had passed
    assert kernel.calls == 1 + 200 + 4 * t.reps and t.reps == 100
    assert "flush" not in clock.log


def test_blocked_quartiles_are_between_blocks_so_a_slow_phase_shows():
    clock = FakeClock()
    # a machine whose load doubles the call time for one block in four
    kernel = FakeKernel(clock, *([10.0] * 3 + [20.0]))
    t = timing.measure_blocked(kernel, clock, warmup_s=0.0, budget_s=0.4, min_reps=5)
    assert t.method == "fake+blocks" and t.min_ms == 10.0
    assert t.q3_ms > t.q1_ms and t.q3_ms >= 12.5  # the slow quarter widens the spread


def test_blocked_times_slow_calls_at_least_min_reps_times():
    clock = FakeClock()
    kernel = FakeKernel(clock, 3000.0)  # a 3 s call: no budget fits it
    t = timing.measure_blocked(kernel, clock, warmup_s=0.3, budget_s=1.0, min_reps=5)
    assert t.reps == 5 and kernel.calls == 1 + 1 + 5


class DriftingKernel:
    """A call of ``ms`` on a machine that becomes twice as slow after ``slow_after_ms`` of
    the clock's time (load arriving mid-measurement, as on a shared CPU)."""

    def __init__(self, clock: FakeClock, ms: float, slow_after_ms: float) -> None:
        self.clock, self.ms, self.slow_after_ms, self.calls = clock, ms, slow_after_ms, 0

    def __call__(self) -> None:
        factor = 2.0 if self.clock.now_ms >= self.slow_after_ms else 1.0
        self.clock.now_ms += self.ms * factor
        self.calls += 1


def test_interleaved_calls_take_turns_over_the_whole_window():
    """Issue 11: timed one after another, the forward sampled only the fast first second and the
    backward only the slow rest; taking turns, both see both phases, and each one's quartiles
    cover the change."""
    clock = FakeClock()
    fwd, bwd = DriftingKernel(clock, 10.0, 1300.0), DriftingKernel(clock, 25.0, 1300.0)
    t = timing.measure_interleaved({"fwd": fwd, "bwd": bwd}, clock, warmup_s=0.3,
                                   window_s=2.0, rounds=4, min_reps=5)
    assert set(t) == {"fwd", "bwd"}
    for name, ms in (("fwd", 10.0), ("bwd", 25.0)):
        assert t[name].min_ms == ms and t[name].q3_ms == 2 * ms  # both phases sampled
        assert t[name].method.endswith("+interleaved-2")
    sequential = FakeClock()
    alone = timing.measure_blocked(DriftingKernel(sequential, 10.0, 1300.0), sequential,
                                   warmup_s=0.3, budget_s=1.0, min_reps=5)
    assert alone.q3_ms == alone.q1_ms == 10.0  # one stretch: the slow phase never shows


class EpisodeKernel:
    """A call of ``ms`` that takes ``factor`` times as long while the clock is inside
    ``[from_ms, to_ms)``: a slow stretch of a shared machine."""

    def __init__(self, clock: FakeClock, ms: float, from_ms: float, to_ms: float,
                 factor: float = 1.5) -> None:
        self.clock, self.ms, self.span, self.factor, self.calls = clock, ms, (from_ms, to_ms), \
            factor, 0

    def __call__(self) -> None:
        slow = self.span[0] <= self.clock.now_ms < self.span[1]
        self.clock.now_ms += self.ms * (self.factor if slow else 1.0)
        self.calls += 1


def test_a_window_whose_halves_disagree_goes_on_and_says_the_machine_moved():
    """Issue 11: a run that began in a slow stretch of the machine reported 41 ms with an IQR
    of 40.6-41.4 while the machine's quiet time was 28 ms. A window in which the speed moves is
    extended by as long again, so that its median rests on more of the machine's states, and
    the record says how its halves read."""
    clock = FakeClock()
    # slow (x1.5) for the first second of the 2 s window
    fwd = EpisodeKernel(clock, 28.0, 0.0, 1400.0)
    bwd = EpisodeKernel(clock, 50.0, 0.0, 1400.0)
    t = timing.measure_interleaved({"fwd": fwd, "bwd": bwd}, clock, warmup_s=0.3,
                                   window_s=2.0, rounds=4, min_reps=5, extend_s=2.0)
    assert clock.now_ms >= 300 + 4000  # extended: warm-up, then 4 s of rounds
    for name, ms in (("fwd", 28.0), ("bwd", 50.0)):
        assert t[name].drift < -0.15  # the second half was quicker
        assert t[name].median_ms == ms and t[name].q3_ms < 1.5 * ms  # 3 of 4 s were quiet
        assert t[name].note.startswith(f"unsteady: {1.5 * ms:.4g} ms (IQR ")
        assert "in the second (-33%), then timed 2.0 s more" in t[name].note
        assert t[name].note.endswith("s more; the machine's speed moved: a rerun may read "
                                     "anywhere between")
        assert t[name].to_dict()["drift"] == t[name].drift


def test_a_steady_window_is_not_extended_and_a_short_blip_is_no_drift():
    clock = FakeClock()
    steady = FakeKernel(clock, 28.0)
    t = timing.measure_interleaved({"fwd": steady}, clock, warmup_s=0.3, window_s=2.0,
                                   rounds=4, min_reps=5, extend_s=2.0)["fwd"]
    assert t.drift == 0.0 and t.note == "" and clock.now_ms < 300 + 2000 + 2 * 28.0
    assert "note" not in t.to_dict()
    blip = FakeClock()
    # one slow quarter-second in the first half: that half's median does not move
    kernel = EpisodeKernel(blip, 28.0, 700.0, 950.0, factor=2.0)
    t = timing.measure_interleaved({"fwd": kernel}, blip, warmup_s=0.3, window_s=2.0,
                                   rounds=4, min_reps=5, extend_s=2.0)["fwd"]
    assert t.drift == 0.0 and t.note == "" and blip.now_ms < 300 + 2000 + 2 * 56.0
    assert t.median_ms == t.q3_ms == 28.0


def test_the_drift_note_keeps_a_note_given_before():
    clock = FakeClock()
    fwd = EpisodeKernel(clock, 10.0, 0.0, 1000.0, factor=2.0)
    t = timing.measure_interleaved({"fwd": fwd}, clock, warmup_s=0.0, window_s=2.0,
                                   rounds=4, min_reps=5, extend_s=0.0, note="graph replay "
                                   "unavailable: cpu is not a CUDA/HIP device")
    assert t["fwd"].note.startswith("graph replay unavailable: cpu is not a CUDA/HIP device; "
                                    "unsteady: ")
    assert clock.now_ms < 2100  # extend_s=0: not extended


def test_interleaved_gives_every_call_min_reps_blocks_and_equal_turns():
    clock = FakeClock()
    quick, slow = FakeKernel(clock, 0.5), FakeKernel(clock, 900.0)
    t = timing.measure_interleaved({"quick": quick, "slow": slow}, clock, warmup_s=0.0,
                                   window_s=0.4, rounds=4, min_reps=5)
    assert t["slow"].reps == 5 and t["quick"].reps >= 5  # more rounds until both have five
    assert t["quick"].method == "fake+blocks-of-4+interleaved-2"
    assert t["quick"].median_ms == 0.5 and t["slow"].median_ms == 900.0


def test_cpu_throughput_calls_share_one_window_with_floors(monkeypatch):
    seen = {}

    def fake(fns, clock, **kwargs):
        seen.update(kwargs, names=tuple(fns))
        return {n: summarize([1.0], "x") for n in fns}

    monkeypatch.setattr(timing, "measure_interleaved", fake)
    calls = {"fwd": lambda: None, "bwd": lambda: None, "fwd_bwd": lambda: None}
    timing.time_functions(calls, "cpu", warmup_s=0.05, budget_s=0.25, min_reps=5)
    assert seen["names"] == ("fwd", "bwd", "fwd_bwd")
    assert seen["warmup_s"] == timing.CPU_WARMUP_S and seen["window_s"] == timing.CPU_WINDOW_S
    assert seen["extend_s"] == seen["window_s"]  # an unsteady window goes on as long again
    timing.time_functions(calls, "cpu", warmup_s=1.0, budget_s=2.0, min_reps=5)
    assert seen["warmup_s"] == 1.0 and seen["window_s"] == 6.0  # the profile's 2 s per call
    graph = timing.time_functions({"fwd": lambda: None}, "cpu", graph=True, min_reps=1)
    assert set(graph) == {"fwd"} and "graph replay unavailable" in seen["note"]
    assert seen["window_s"] == timing.CPU_BUDGET_S  # one call alone: the single-call floor


def test_forward_flops_count_visible_pairs():
    full = Case(batch=2, seqlen_q=1024, heads_q=8, head_dim=64)
    causal = full.replace(causal=True)
    local = full.replace(window=(127, 0))
    assert full.flops_fwd() == 4 * 2 * 8 * 64 * 1024 * 1024
    assert causal.flops_fwd() == 4 * 2 * 8 * 64 * (1024 * 1025 // 2)
    assert local.flops_fwd() == 4 * 2 * 8 * 64 * (128 * 1024 - 127 * 128 // 2)


def test_throughput_check_rates_fwd_bwd_and_both_with_flash_attn_factors(monkeypatch):
    """check_throughput's arithmetic, with time_function replaced by a fixed 2 ms."""
    from harness.backends import load_backend
    from harness.checks import throughput
    from harness.checks.context import CaseRun
    from harness.options import get_profile
    from harness.target import Target

    seen = []

    def fake_time_functions(fns, device, **kwargs):
        for fn in fns.values():
            fn()  # the closures must be callable as built
        seen.append((tuple(fns), kwargs))
        return {name: Timing(2.0, 1.5, 2.5, 1.0, 7, "fake") for name in fns}

    monkeypatch.setattr(throughput, "time_functions", fake_time_functions)
    case = Case(batch=1, seqlen_q=16, heads_q=2, head_dim=8, dtype="float32", causal=True)
    target = Target(vendor="cpu", device_name="cpu", arch="x86_64", peak_tflops=100.0)
    run = CaseRun(case, load_backend("sdpa-math"), target, seed=0,
                         profile=get_profile("quick"), device="cpu")
    verdict = run.run("throughput")
    m = verdict.metrics
    flops = case.flops_fwd()
    assert m["flops_fwd"] == flops
    assert m["time_ms"] == 2.0 and m["tflops"] == pytest.approx(flops / 2e-3 / 1e12)
    assert m["bwd"]["tflops"] == pytest.approx(2.5 * flops / 2e-3 / 1e12)
    assert m["fwd_bwd"]["tflops"] == pytest.approx(3.5 * flops / 2e-3 / 1e12)
    assert m["timing_iqr_ms"] == 1.0 and m["timing_reps"] == 7
    assert m["pct_peak"] is None  # float32 is not what the fp16/bf16 peak measures
    assert [names for names, _ in seen] == [("fwd", "bwd", "fwd_bwd")]  # timed together
    assert all(k["graph"] is False for _, k in seen)
    half = CaseRun(case.replace(dtype="bfloat16"), load_backend("sdpa-math"), target,
                          seed=0, profile=get_profile("quick"), device="cpu").run("throughput")
    assert half.metrics["pct_peak"] == pytest.approx(100 * half.metrics["tflops"] / 100.0)


def test_fp8_throughput_is_measured_against_the_fp8_peak():
    """fp8 cases take the device's dense fp8 figure (issue 14), not the fp16/bf16 one; a device
    without a recorded fp8 figure gets no percentage rather than a wrong one."""
    from harness.checks.throughput import peak_for_dtype
    from harness.target import Target, peak_for

    h100 = Target(vendor="nvidia", device_name="NVIDIA H100 80GB HBM3", arch="sm_90",
                  peak_tflops=989.4)
    assert peak_for_dtype(h100, "bfloat16") == 989.4
    assert peak_for_dtype(h100, "float8_e4m3fn") == peak_for("NVIDIA H100 80GB HBM3").fp8_tflops
    assert peak_for_dtype(h100, "float8_e4m3fn") == pytest.approx(1978.9)
    assert peak_for_dtype(h100, "float32") is None
    a100 = Target(vendor="nvidia", device_name="NVIDIA A100-SXM4-80GB", arch="sm_80",
                  peak_tflops=312.0)
    assert peak_for_dtype(a100, "float8_e4m3fn") is None  # no fp8 tensor cores, none recorded
    cpu = Target(vendor="cpu", device_name="AMD EPYC", arch="x86_64")
    assert peak_for_dtype(cpu, "float8_e4m3fnuz") is None


# ------------------------------------------------------------- cold starts and the control


class ColdKernel:
    """A fake call of ``ms`` whose ``slow_calls`` (call numbers from 0) take ``slow_ms``
    instead: a compilation on a later call, as torch.compile may do."""

    def __init__(self, clock: FakeClock, ms: float, slow_calls: dict[int, float]) -> None:
        self.clock, self.ms, self.slow, self.calls = clock, ms, slow_calls, 0

    def __call__(self) -> None:
        self.clock.now_ms += self.slow.get(self.calls, self.ms)
        self.calls += 1


def test_a_compile_on_the_second_call_stays_out_of_the_window():
    clock = FakeClock()
    # first call 90 s, second 30 s (both compiling), then 2 ms calls
    kernel = ColdKernel(clock, 2.0, {0: 90_000.0, 1: 30_000.0})
    t = timing.measure_interleaved({"fwd": kernel}, clock, warmup_s=0.3, window_s=1.0,
                                   min_reps=5)
    assert t["fwd"].median_ms == 2.0 and t["fwd"].q3_ms == 2.0 and t["fwd"].note == ""
    blocked = timing.measure_blocked(ColdKernel(clock, 2.0, {0: 90_000.0, 1: 30_000.0}), clock,
                                     warmup_s=0.3, budget_s=1.0)
    assert blocked.median_ms == 2.0 and blocked.q3_ms == 2.0


def test_a_compile_inside_the_window_is_discarded_and_said():
    clock = FakeClock()
    kernel = ColdKernel(clock, 2.0, {400: 20_000.0})  # well inside the timed blocks
    t = timing.measure_interleaved({"fwd": kernel}, clock, warmup_s=0.3, window_s=1.0,
                                   min_reps=5)
    assert t["fwd"].median_ms == 2.0 and t["fwd"].q3_ms == 2.0
    assert "discarded 1 of" in t["fwd"].note and "compilation or cold start" in t["fwd"].note


def test_the_control_ratio_stays_put_when_the_machine_slows_both():
    clock = FakeClock()
    # the machine runs everything 3x slower for the first half of the window
    fwd = EpisodeKernel(clock, 4.0, 300.0, 1300.0, factor=3.0)
    control = EpisodeKernel(clock, 2.0, 300.0, 1300.0, factor=3.0)
    t = timing.measure_interleaved({"fwd": fwd}, clock, warmup_s=0.3, window_s=2.0,
                                   min_reps=5, control=control)["fwd"]
    assert t.relative == pytest.approx(2.0) and t.relative_q3 == pytest.approx(2.0)
    assert abs(t.relative_drift) < 1e-9 and t.control_ms in (2.0, 6.0)
    assert t.to_dict()["relative"] == t.relative
    assert t.drift < -0.5 and t.note.startswith("unsteady")  # the wall times saw it move


def test_the_control_is_a_function_of_the_case_alone():
    a = timing.attention_control(2, 8, 64, 96, 32, "cpu")
    b = timing.attention_control(2, 8, 64, 96, 32, "cpu")
    assert torch.equal(a(), b()) and a().shape == (2, 2, 64, 32)  # a quarter of the heads
    huge = timing.attention_control(64, 4, 8192, 8192, 64, "cpu")
    assert huge().shape[0] * huge().shape[2] * 8192 <= timing.CONTROL_SCORES_MAX


def test_one_lucky_quick_warm_up_call_does_not_prolong_the_warm_up():
    # On a loaded machine one call may run 50x quicker than the rest: it is not the yardstick.
    clock = FakeClock()
    kernel = ColdKernel(clock, 2.0, {3: 0.04})
    timing.measure_interleaved({"fwd": kernel}, clock, warmup_s=0.3, window_s=1.0, min_reps=5)
    assert clock.now_ms < 300 + 1000 + 50
    clock = FakeClock()
    timing.measure_blocked(ColdKernel(clock, 2.0, {3: 0.04}), clock, warmup_s=0.3,
                           budget_s=1.0)
    assert clock.now_ms < 300 + 1000 + 50
