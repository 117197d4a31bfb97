"""Timing kernels the way the field does, and turning times into TFLOP/s.

GPU: device events around each call after a warm-up, a 256 MB write before every timed call to
flush the L2 cache, repetitions until a time budget is spent; this is the method of
``triton.testing.do_bench``. CPU: ``time.perf_counter`` with the same warm-up/budget protocol and
no cache flush (a 256 MB write costs more than most CPU problems take, and
``torch.utils.benchmark``, the CPU yardstick, does not flush either). We report the median and the
interquartile range.

FLOPs follow flash-attn's benchmark: ``4 * batch * heads * head_dim * (visible query-key pairs)``
for the forward, 2.5x that for the backward, 3.5x for both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

FLUSH_BYTES = 256 * 1024 * 1024
BWD_FACTOR = 2.5


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    reps: int
    method: str

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict:
        out = asdict(self)
        out["iqr_ms"] = self.iqr_ms
        return out


def summarize(times_ms: list[float], method: str) -> Timing:
    """Median, quartiles and minimum of a list of times."""
    ordered = sorted(times_ms)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Timing(statistics.median(ordered), q1, q3, ordered[0], len(ordered), method)


def tflops(flops: float, time_ms: float) -> float:
    """TFLOP/s for ``flops`` done in ``time_ms`` milliseconds."""
    return flops / (time_ms * 1e-3) / 1e12


def time_function(fn: Callable[[], object], device: torch.device | str, *, warmup_s: float = 0.05,
                  budget_s: float = 0.25, min_reps: int = 5, max_reps: int = 100_000,
                  flush: bool | None = None) -> Timing:
    """Time ``fn()`` on ``device`` (see the module docstring for the method).

    Args:
        fn: the call to time; its result is discarded.
        device: where it runs; ``cuda`` devices (NVIDIA or ROCm) are timed with events.
        warmup_s: untimed calls for at least this long (and at least one call).
        budget_s: timed calls until this much time is spent (and at least ``min_reps``).
        flush: write 256 MB before each timed call; default: on GPUs only.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    flush = gpu if flush is None else flush
    cache = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device) if flush else None
    # Warm-up, also measuring one call so the repetition count can follow the budget.
    start = time.perf_counter()
    calls = 0
    while True:
        fn()
        calls += 1
        if gpu:
            torch.cuda.synchronize(device)
        if time.perf_counter() - start >= warmup_s:
            break
    estimate_s = (time.perf_counter() - start) / calls
    reps = int(min(max_reps, max(min_reps, budget_s / max(estimate_s, 1e-7))))
    if gpu:
        return _time_gpu(fn, device, reps, cache)
    return _time_cpu(fn, reps, cache)


def _time_gpu(fn, device, reps: int, cache) -> Timing:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if cache is not None:
            cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return summarize(times, "cuda-events" + ("+l2-flush" if cache is not None else ""))


def _time_cpu(fn, reps: int, cache) -> Timing:
    times = []
    for _ in range(reps):
        if cache is not None:
            cache.zero_()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, "perf-counter" + ("+flush" if cache is not None else ""))
