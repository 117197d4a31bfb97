"""Timing kernels the way the field does, and turning times into TFLOP/s.

The protocol is ``triton.testing.do_bench``'s (triton 3.x), step by step:

1. one untimed call, then a device synchronisation (compilation, autotuning, allocator warm-up);
2. an *estimate*: a few calls, each preceded by the cache flush, timed together; the per-call
   estimate therefore includes the flush, so the repetition count honours the time budget even
   when the flush costs more than the kernel (do_bench uses 5 calls; we use fewer when one call
   alone outlasts the warm-up budget, which only happens for multi-second CPU calls);
3. warm-up calls, their number derived from the warm-up budget and the estimate (the estimate's
   calls count towards it);
4. timed calls, their number derived from the measurement budget and the estimate: before each,
   the cache flush (a 256 MB write); around each, a pair of markers (device events on GPUs, NVIDIA
   and ROCm alike; ``time.perf_counter`` on the CPU). One synchronisation at the end, so no host
   round trip sits between device calls.

What differs from do_bench, on purpose: we report the median, the quartiles (linear
interpolation, as ``torch.quantile`` and do_bench's ``quantiles``) and the repetition count, where
do_bench returns the mean by default (compare with ``return_mode="median"``); we demand at least
``min_reps`` timed calls so that quartiles mean something.

On the CPU the protocol is ``torch.utils.benchmark.Timer.blocked_autorange``'s instead
(:func:`measure_blocked`), because a CPU shares its cores with everything else on the machine:
a warm-up by time (at least :data:`CPU_WARMUP_S`: a fresh worker's first calls pay for the
allocator's growth, page faults and the thread pool), then blocks of calls (each at least
:data:`BLOCK_MS` long) until at least :data:`CPU_BUDGET_S` has passed; the median and quartiles
are over the blocks' per-call times. Measured on a shared 2-core machine (issue 11), 0.25 s of
back-to-back calls in a fresh worker read 25-40% slower than Timer and moved between runs by far
more than their IQR: the calls sampled one moment of the machine's load. A check that times
several calls (the throughput check's forward, backward and both) has them take turns in one
window of at least :data:`CPU_WINDOW_S` (:func:`measure_interleaved`): each call's blocks are
spread over the whole window, so its median and quartiles see the machine's slow swings (on
the scale of seconds on a shared VM) instead of one stretch of them, for no more time than
timing them one after another took. Each call's blocks are also summarized over each half of
the window: where the halves differ as two runs that ``compare`` calls a change do (medians by
more than :data:`STEADY_SPREAD`, IQRs apart), the window goes on for as long again and the
record says so (``timing_drift``, and a note), since a rerun may read anywhere between them.
Nothing is flushed on the CPU (a 256 MB
write costs more than most CPU problems take, and Timer does not flush either).

The CPU's allocator is held steady before timing (:func:`steady_allocator`): glibc's malloc
serves a large block from fresh, page-faulting ``mmap`` memory or from its heap depending on
the process's history (its mmap threshold moves with what was freed before, and the heap's top
is trimmed back to the system), so the same SDPA call of a few MB of scores read 2.2 ms in one
process and 6.0 ms in the next, and switched between the two inside a window as the control
workload's blocks reshuffled the heap. Fixing the thresholds keeps freed memory for reuse, as
PyTorch's caching allocator does on GPUs, and the kernel is timed rather than the page faults.

Graph replay (``graph=True``): for tiny problems, where launching the kernels costs as much as
running them, the call is captured once into a CUDA/HIP graph and every warm-up and timed call
replays it (do_bench_cudagraph's idea, but keeping the flush and per-call events). Where capture
is impossible (a CPU, or a call that synchronises or allocates in ways capture forbids), the
timing falls back to plain calls and says so in :attr:`Timing.note`; it never pretends.

FLOPs follow flash-attn's benchmark: ``4 * batch * heads * head_dim * (visible query-key pairs)``
for the forward (``Case.flops_fwd``), 2.5x that for the backward, 3.5x for both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from harness.results.stats import quantile, shifted

FLUSH_BYTES = 256 * 1024 * 1024
#: Calls timed together for the estimate (do_bench's number).
ESTIMATE_CALLS = 5
#: CPU floors, seconds: warm-up and measurement time of one timed function, whatever the profile
#: asks (Timer's ``blocked_autorange(min_run_time=...)`` takes 0.2 s to size its blocks and
#: ``min_run_time`` to measure; fidelity checks use 2 s).
CPU_WARMUP_S = 0.3
CPU_BUDGET_S = 1.0
#: Shortest block of calls timed together on the CPU, milliseconds (Timer: min_run_time / 1000).
BLOCK_MS = 2.0
#: CPU: the shortest window the timed functions of one check share, seconds, and the rounds it
#: is cut into (:func:`measure_interleaved`). On a shared machine the speed wanders on a scale
#: of seconds (1-s medians of one SDPA call ranged 28-49 ms over 40 s on our 2-core CI
#: machine), so a function timed in one second-long stretch samples one moment of it.
CPU_WINDOW_S = 2.0
CPU_ROUNDS = 4
#: CPU: a call whose medians over the first and the second half of its window differ by more
#: than this fraction, their IQRs apart, was timed while the machine's speed moved
#: (:func:`measure_interleaved` then extends the window and says so). The slow stretches of our
#: shared 2-core VM last seconds at 1.4-1.6x the quiet time of one SDPA call; in quiet windows
#: the halves differed by up to 15% for the few-block calls (fwd+bwd), their IQRs overlapping.
STEADY_SPREAD = 0.15
#: Cold start: after the untimed first call, warm-up goes on while a call took more than this
#: many times the median of the warm-up calls before it (a compilation on a later call, as
#: torch.compile may do), for at most :data:`SETTLE_MAX_S` more, so that no compile lands in
#: the timed window. The median, not the fastest: on a loaded machine one lucky call can be
#: 50x quicker than the rest.
SETTLE_FACTOR = 10.0
SETTLE_MAX_S = 30.0
#: A timed block more than this many times its call's median is discarded (and said): a
#: compilation or cold start inside the window, which no load on a shared machine comes near
#: (its slow stretches are 1.4-20x).
DISCARD_FACTOR = 50.0
#: The control block that follows each timed block lasts at least this share of it.
CONTROL_SHARE = 0.5
#: A graph capture: ``(fn, device) -> replay``.
Capture = Callable[[Callable[[], object], Any], Callable[[], object]]


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings, in milliseconds.

    Attributes:
        median_ms: median of the timed calls.
        q1_ms, q3_ms: first and third quartiles.
        min_ms: fastest call.
        reps: number of timed calls.
        method: how calls were timed, e.g. ``cuda-events+l2-flush+graph``, ``perf-counter``.
        note: why a requested method was not used (e.g. graph replay unavailable), or that the
            machine's speed moved while it was timed; empty otherwise.
        drift: CPU rounds (:func:`measure_interleaved`): the median of the second half of
            the rounds over that of the first, less 1 (how far the machine's speed moved while
            the call was timed); None where calls were not timed in rounds.
        relative, relative_q1, relative_q3: CPU with a control (:func:`measure_interleaved`):
            the median and quartiles of each block's per-call time over the per-call time of
            the control block timed right after it (a fixed workload, so a machine that slows
            both leaves the ratio where it was); None without a control.
        relative_drift: the second half's median ratio over the first's, less 1.
        control_ms: the control's median per-call time, milliseconds.
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    reps: int
    method: str
    note: str = ""
    drift: float | None = None
    relative: float | None = None
    relative_q1: float | None = None
    relative_q3: float | None = None
    relative_drift: float | None = None
    control_ms: float | None = None

    @property
    def iqr_ms(self) -> float:
        """Interquartile range, milliseconds."""
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict:
        out = asdict(self)
        out["iqr_ms"] = self.iqr_ms
        for key in ("note", "drift", "relative", "relative_q1", "relative_q3", "relative_drift",
                    "control_ms"):
            if out[key] in ("", None):
                del out[key]
        return out


def summarize(times_ms: list[float], method: str, note: str = "") -> Timing:
    """Median, quartiles and minimum of a list of times (milliseconds)."""
    if not times_ms:
        raise ValueError("summarize needs at least one time")
    ordered = sorted(times_ms)
    return Timing(statistics.median(ordered), quantile(ordered, 0.25), quantile(ordered, 0.75),
                  ordered[0], len(ordered), method, note)


def tflops(flops: float, time_ms: float) -> float:
    """TFLOP/s for ``flops`` done in ``time_ms`` milliseconds."""
    return flops / (time_ms * 1e-3) / 1e12


def repetitions(estimate_ms: float, estimate_calls: int, *, warmup_s: float, budget_s: float,
                min_reps: int, max_reps: int) -> tuple[int, int]:
    """``(warm-up calls, timed calls)`` for a call estimated at ``estimate_ms`` (flush included).

    Warm-up: enough calls to fill ``warmup_s`` less the ``estimate_calls`` already made (at
    least none); timed: enough to fill ``budget_s``, clamped to ``[min_reps, max_reps]``.
    """
    per_call = max(estimate_ms, 1e-6)
    warmup = max(0, int(warmup_s * 1e3 / per_call) - estimate_calls)
    reps = min(max_reps, max(min_reps, int(budget_s * 1e3 / per_call)))
    return warmup, reps


# ---------------------------------------------------------------------------------- clocks


class Clock(Protocol):
    """Where markers come from and what a flush and a synchronisation are."""

    method: str

    def sync(self) -> None: ...

    def flush(self) -> None: ...

    def mark(self) -> Any: ...

    def elapsed_ms(self, start: Any, end: Any) -> float: ...


class HostClock:
    """``time.perf_counter`` markers; optionally a 256 MB write as the flush."""

    def __init__(self, flush: bool = False) -> None:
        import torch

        self._cache = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32) if flush else None
        self.method = "perf-counter" + ("+flush" if flush else "")

    def sync(self) -> None:
        pass

    def flush(self) -> None:
        if self._cache is not None:
            self._cache.zero_()

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3


class DeviceClock:
    """Device events (``torch.cuda.Event``, NVIDIA and ROCm) and a 256 MB L2 flush."""

    def __init__(self, device, flush: bool = True) -> None:
        import torch

        self._torch = torch
        self.device = device
        self._cache = (torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
                       if flush else None)
        self.method = "cuda-events" + ("+l2-flush" if flush else "")

    def sync(self) -> None:
        self._torch.cuda.synchronize(self.device)

    def flush(self) -> None:
        if self._cache is not None:
            self._cache.zero_()

    def mark(self):
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)


# -------------------------------------------------------------------------------- protocol


def measure(fn: Callable[[], object], clock: Clock, *, warmup_s: float = 0.05,
            budget_s: float = 0.25, min_reps: int = 5, max_reps: int = 100_000,
            method: str | None = None, note: str = "") -> Timing:
    """Time ``fn()`` with ``clock`` by the protocol of the module docstring.

    Args:
        fn: the call to time; its result is discarded.
        clock: markers, flush and synchronisation (:class:`HostClock`, :class:`DeviceClock`).
        warmup_s: warm-up budget, seconds (estimate calls included).
        budget_s: measurement budget, seconds.
        min_reps, max_reps: bounds on the number of timed calls.
        method: recorded in :attr:`Timing.method`; default ``clock.method``.
        note: carried into :attr:`Timing.note`.
    """
    start = clock.mark()
    fn()
    end = clock.mark()
    clock.sync()
    first_ms = clock.elapsed_ms(start, end)
    n_estimate = max(1, min(ESTIMATE_CALLS, int(warmup_s * 1e3 / max(first_ms, 1e-6))))
    start = clock.mark()
    for _ in range(n_estimate):
        clock.flush()
        fn()
    end = clock.mark()
    clock.sync()
    estimate_ms = clock.elapsed_ms(start, end) / n_estimate
    n_warmup, n_reps = repetitions(estimate_ms, n_estimate, warmup_s=warmup_s,
                                   budget_s=budget_s, min_reps=min_reps, max_reps=max_reps)
    for _ in range(n_warmup):
        fn()
    marks = []
    for _ in range(n_reps):
        clock.flush()
        before = clock.mark()
        fn()
        marks.append((before, clock.mark()))
    clock.sync()
    times, dropped = discard_cold([clock.elapsed_ms(a, b) for a, b in marks])
    return summarize(times, method or clock.method, _joined(note, dropped))


def settled(calls_ms: list[float], factor: float = SETTLE_FACTOR) -> bool:
    """Whether the last warm-up call of ``calls_ms`` is no cold start: it took no more than
    ``factor`` times the median of the calls before it (a single call: yes). Warm-up goes on
    (for at most :data:`SETTLE_MAX_S` more) until it is, so that a later call that compiles
    (torch.compile recompiling, a lazy library load) is behind the timed window, not in it."""
    return len(calls_ms) < 2 or calls_ms[-1] <= factor * statistics.median(calls_ms[:-1])


def discard_cold(times_ms: list[float], factor: float = DISCARD_FACTOR) -> tuple[list[float], str]:
    """``times_ms`` without the ones over ``factor`` times their median (a compilation or cold
    start inside the window), and a note saying how many went; the times as given when fewer
    than three or nothing stands out."""
    if len(times_ms) < 3:
        return times_ms, ""
    median = statistics.median(times_ms)
    kept = [t for t in times_ms if not t > factor * median]
    if len(kept) == len(times_ms):
        return times_ms, ""
    worst = max(times_ms)
    return kept, (f"discarded {len(times_ms) - len(kept)} of {len(times_ms)} timed block(s) over "
                  f"{factor:g}x the median ({worst:.4g} ms against {median:.4g} ms): a "
                  "compilation or cold start inside the window")


def _joined(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def measure_blocked(fn: Callable[[], object], clock: Clock, *, warmup_s: float = CPU_WARMUP_S,
                    budget_s: float = CPU_BUDGET_S, min_reps: int = 5, max_reps: int = 100_000,
                    block_ms: float = BLOCK_MS, method: str | None = None,
                    note: str = "") -> Timing:
    """Time ``fn()`` in blocks, as ``torch.utils.benchmark.Timer.blocked_autorange`` does (the
    CPU protocol; see the module docstring).

    Args:
        fn: the call to time; its result is discarded.
        clock: markers (:class:`HostClock`, or a fake in tests); its flush is not used.
        warmup_s: warm-up time, seconds; at least one call.
        budget_s: measurement time, seconds: blocks run until it has passed.
        min_reps, max_reps: bounds on the number of blocks.
        block_ms: shortest block, milliseconds; a block is ``ceil(block_ms / call)`` calls.
        method: recorded in :attr:`Timing.method`; default ``clock.method + "+blocks"``.
        note: carried into :attr:`Timing.note`.

    Returns:
        The median and quartiles of the blocks' per-call times; ``reps`` counts blocks.
    """
    fn()  # the first call: lazy initialisation, compilation
    start = clock.mark()
    calls = 0
    warm_ms: list[float] = []
    spent_ms = 0.0
    while True:
        fn()
        calls += 1
        before, spent_ms = spent_ms, clock.elapsed_ms(start, clock.mark())
        warm_ms.append(spent_ms - before)
        if spent_ms >= warmup_s * 1e3 and settled(warm_ms) or calls >= max_reps \
                or spent_ms >= (warmup_s + SETTLE_MAX_S) * 1e3:
            break
    per_call_ms = max(spent_ms / calls, 1e-6)
    number = max(1, math.ceil(block_ms / per_call_ms))
    times: list[float] = []
    begin = clock.mark()
    while True:
        before = clock.mark()
        for _ in range(number):
            fn()
        after = clock.mark()
        times.append(clock.elapsed_ms(before, after) / number)
        if len(times) >= max_reps:
            break
        if len(times) >= min_reps and clock.elapsed_ms(begin, after) >= budget_s * 1e3:
            break
    label = method or f"{clock.method}+blocks"
    if number > 1:
        label += f"-of-{number}"
    times, dropped = discard_cold(times)
    return summarize(times, label, _joined(note, dropped))


def measure_interleaved(fns: dict[str, Callable[[], object]], clock: Clock, *,
                        warmup_s: float = CPU_WARMUP_S, window_s: float = CPU_WINDOW_S,
                        rounds: int = CPU_ROUNDS, min_reps: int = 5, max_reps: int = 100_000,
                        block_ms: float = BLOCK_MS, extend_s: float = 0.0,
                        steady: float = STEADY_SPREAD, note: str = "",
                        control: Callable[[], object] | None = None) -> dict[str, Timing]:
    """Time several calls in blocks (as :func:`measure_blocked`), taking turns: the window is
    cut into ``rounds`` rounds and each round gives every call an equal slice of blocks, so the
    blocks of each call are spread over the whole window rather than one stretch of it. The
    warm-up takes turns too.

    Each call's blocks are also summarized over the first and over the second half of its
    rounds. Where the two differ as ``attn-harness compare`` says two runs differ (medians by
    more than ``steady``, interquartile ranges apart: the machine's speed moved while it was
    timed, and a slow stretch of a shared machine lasts seconds), the rounds go on for up to
    ``extend_s`` more, so that the quartiles sample more of the machine's states, and the
    call's :attr:`Timing.note` says how the halves read (:attr:`Timing.drift`, the second
    half's median over the first's less 1, is recorded in any case). A slow second or two
    inside one half moves that half's median little.

    Args:
        fns: name -> the call to time; results are discarded.
        clock: markers (:class:`HostClock`, or a fake in tests).
        warmup_s: warm-up time of all the calls together, seconds; at least one call each.
        window_s: measurement time of all the calls together, seconds.
        rounds: turns each call gets in the window; more rounds follow until every call has
            ``min_reps`` blocks.
        min_reps, max_reps: bounds on the number of blocks per call.
        block_ms: shortest block, milliseconds.
        extend_s: more measurement time, seconds, for a window whose rounds disagree.
        steady: the largest ``|drift|`` (second half's median over the first's, less 1) that
            counts as steady whatever the halves' quartiles.
        note: carried into every :attr:`Timing.note`.
        control: a fixed workload (:func:`attention_control`) timed in a block right after every
            block of each call; the ratio of the two per-call times is recorded
            (:attr:`Timing.relative`): a shared machine that slows both leaves it where it was,
            so ``compare`` can tell a slower kernel from a busier machine. Control blocks last
            at least :data:`CONTROL_SHARE` of the block before them and are timed only within
            the window, whose length they do not change.

    Returns:
        name -> the median and quartiles of that call's per-call block times; ``reps`` counts
        its blocks, and ``method`` says ``interleaved``.

    The first call of each is untimed, and warm-up goes on until calls settle
    (:func:`settle`); a block over :data:`DISCARD_FACTOR` times its median is discarded
    (:func:`discard_cold`), so a compilation never lands in the quartiles.
    """
    names = list(fns)
    warm = {**fns, **({_CONTROL: control} if control is not None else {})}
    for fn in warm.values():
        fn()  # the first call: lazy initialisation, compilation
    call_ms: dict[str, list[float]] = {n: [] for n in warm}
    start = clock.mark()
    while True:
        for name, fn in warm.items():
            before = clock.mark()
            fn()
            call_ms[name].append(clock.elapsed_ms(before, clock.mark()))
        spent_ms = clock.elapsed_ms(start, clock.mark())
        calm = all(settled(v) for v in call_ms.values())
        if spent_ms >= warmup_s * 1e3 and calm \
                or min(len(v) for v in call_ms.values()) >= max_reps \
                or spent_ms >= (warmup_s + SETTLE_MAX_S) * 1e3:
            break
    number = {n: max(1, math.ceil(block_ms / max(statistics.median(call_ms[n]), 1e-6)))
              for n in warm}
    slice_ms = window_s * 1e3 / max(1, rounds * len(names))
    #: name -> one list of per-call block times per round
    turns: dict[str, list[list[float]]] = {n: [] for n in names}
    #: name -> per round, each block's per-call time over its control block's
    ratios: dict[str, list[list[float]]] = {n: [] for n in names}
    control_ms: list[float] = []

    def control_block(block_ms: float) -> float:
        """Control calls for at least ``CONTROL_SHARE`` of the block just timed (at least its
        own block's calls): a block as long as the kernel's sees the same mix of the machine's
        quiet and busy moments, where a much shorter one would see one or the other."""
        before = clock.mark()
        calls = 0
        while True:
            for _ in range(number[_CONTROL]):
                control()
            calls += number[_CONTROL]
            spent = clock.elapsed_ms(before, clock.mark())
            if spent >= CONTROL_SHARE * block_ms:
                break
        per_call = spent / calls
        control_ms.append(per_call)
        return per_call

    def blocks(name: str) -> int:
        return sum(len(t) for t in turns[name])

    def halves(name: str, seconds: float) -> tuple[Timing | None, Timing | None, float]:
        """The call's blocks in the first and in the second half of its rounds, summarized,
        and the window's length."""
        done = [t for t in turns[name] if t]
        if len(done) < 2:
            return (None, None, seconds)
        cut = (len(done) + 1) // 2
        return (summarize([t for turn in done[:cut] for t in turn], ""),
                summarize([t for turn in done[cut:] for t in turn], ""), seconds)

    def drift(look) -> float:
        first, second, _ = look
        return second.median_ms / first.median_ms - 1 if first and first.median_ms > 0 else 0.0

    def unsteady(look) -> bool:
        """The halves differ as two runs do that ``attn-harness compare`` calls a change."""
        first, second, _ = look
        return bool(first) and first.median_ms > 0 and shifted(
            (first.q1_ms, first.median_ms, first.q3_ms),
            (second.q1_ms, second.median_ms, second.q3_ms), steady) != 0

    #: name -> the halves of the window as first judged, and of the whole, extension included
    looks: dict[str, list[tuple[Timing | None, Timing | None, float]]] = {n: [] for n in names}
    begin = clock.mark()
    limit_ms = window_s * 1e3
    while True:
        for name in names:
            turn = clock.mark()
            times: list[float] = []
            relative: list[float] = []
            while blocks(name) + len(times) < max_reps:
                before = clock.mark()
                for _ in range(number[name]):
                    fns[name]()
                after = clock.mark()
                times.append(clock.elapsed_ms(before, after) / number[name])
                if control is not None:
                    # Within the window only: the blocks a slow call still needs after it
                    # (min_reps) or an unsteady window's extension are not slowed by controls.
                    block = clock.elapsed_ms(before, after)
                    if clock.elapsed_ms(begin, after) < window_s * 1e3:
                        relative.append(times[-1] / max(control_block(block), 1e-9))
                        after = clock.mark()
                    else:
                        relative.append(math.nan)
                if clock.elapsed_ms(turn, after) >= slice_ms:
                    break
            turns[name].append(times)
            ratios[name].append(relative)
        if all(blocks(n) >= max_reps for n in names):
            break
        if any(blocks(n) < min_reps for n in names):
            continue
        elapsed_ms = clock.elapsed_ms(begin, clock.mark())
        if elapsed_ms >= window_s * 1e3 and not looks[names[0]]:
            for name in names:
                looks[name].append(halves(name, elapsed_ms / 1e3))
            if any(unsteady(look[0]) for look in looks.values()):
                limit_ms = (window_s + extend_s) * 1e3  # unsteady: sample more of the machine
        if elapsed_ms >= limit_ms:
            break
    elapsed_s = clock.elapsed_ms(begin, clock.mark()) / 1e3
    extended = limit_ms > window_s * 1e3
    out = {}
    for name in names:
        label = f"{clock.method}+blocks"
        if number[name] > 1:
            label += f"-of-{number[name]}"
        if len(names) > 1:
            label += f"+interleaved-{len(names)}"
        looks[name].append(halves(name, elapsed_s))
        apart = [look for look in looks[name] if unsteady(look)]
        look = max(apart or looks[name], key=lambda x: abs(drift(x)))
        first, second, seconds = look
        moved = drift(look)
        text = note
        if apart:
            more = f", then timed {elapsed_s - seconds:.1f} s more" if extended else ""
            text = "; ".join(filter(None, [note, (
                f"unsteady: {first.median_ms:.4g} ms (IQR {first.q1_ms:.4g}-{first.q3_ms:.4g}) "
                f"in the first half of a {seconds:.1f} s window and {second.median_ms:.4g} ms "
                f"(IQR {second.q1_ms:.4g}-{second.q3_ms:.4g}) in the second ({moved:+.0%})"
                f"{more}; the machine's speed moved: a rerun may read anywhere between")]))
        times = [t for turn in turns[name] for t in turn]
        kept, dropped = discard_cold(times)
        timing = summarize(kept, label, _joined(text, dropped))
        timing = dataclasses.replace(timing, drift=moved)
        if control is not None and control_ms:
            timing = dataclasses.replace(timing, control_ms=statistics.median(control_ms),
                                         **_relative(turns[name], ratios[name]))
        out[name] = timing
    return out


#: The control's key among the calls of a window (not a name a caller uses).
_CONTROL = " control"


def _relative(turns: list[list[float]], ratios: list[list[float]]) -> dict[str, float]:
    """The ratios' median and quartiles (without the blocks :func:`discard_cold` drops) and how
    far the second half of the rounds moved from the first."""
    times = [t for turn in turns for t in turn]
    limit = DISCARD_FACTOR * statistics.median(times) if len(times) >= 3 else math.inf
    per_round = [[r for t, r in zip(tt, rr, strict=True) if not t > limit and r == r]
                 for tt, rr in zip(turns, ratios, strict=True)]  # r == r: not NaN
    flat = sorted(r for turn in per_round for r in turn)
    if not flat:
        return {}
    done = [turn for turn in per_round if turn]
    cut = (len(done) + 1) // 2
    first = [r for turn in done[:cut] for r in turn]
    second = [r for turn in done[cut:] for r in turn]
    drift = (statistics.median(second) / statistics.median(first) - 1
             if first and second and statistics.median(first) > 0 else 0.0)
    return {"relative": statistics.median(flat), "relative_q1": quantile(flat, 0.25),
            "relative_q3": quantile(flat, 0.75), "relative_drift": drift}


#: The control's largest score matrix, elements (a quarter of a GiB of float32 at most).
CONTROL_SCORES_MAX = 64 * 2**20


def attention_control(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                      device) -> Callable[[], object]:
    """The control workload of a CPU timing window (:func:`measure_interleaved`): PyTorch's
    math attention (``scaled_dot_product_attention`` pinned to the math backend) on fixed
    float32 tensors of the case's dense shape, a quarter of its heads (at least one); batch and
    query rows are cut so its scores fit :data:`CONTROL_SCORES_MAX`. A function of the shape
    alone, so two runs of one case time the same control; attention of the same shape, so a
    loaded machine's contention (threads waiting at each parallel region) slows it much as it
    slows the kernel, which a single large GEMM does not (tests/bench/compare_noise.py)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads = max(1, heads // 4)
    batch = max(1, batch)
    while batch * heads * seqlen_q * seqlen_k > CONTROL_SCORES_MAX:
        if batch > 1:
            batch = max(1, batch // 2)
        elif seqlen_q > 1:
            seqlen_q = max(1, seqlen_q // 2)
        else:
            break
    generator = torch.Generator(device="cpu").manual_seed(seqlen_q * 7919 + seqlen_k)
    q, k, v = (torch.randn(batch, heads, n, max(1, head_dim), generator=generator).to(device)
               for n in (seqlen_q, seqlen_k, seqlen_k))

    def control():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return control


#: glibc's ``mallopt`` parameters, and the values :func:`steady_allocator` sets: the largest
#: mmap threshold glibc accepts on 64-bit systems (32 MiB: blocks up to it are reused from the
#: heap, larger ones are always fresh mmaps) and a trim threshold that never returns the
#: heap's top to the system.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
STEADY_MMAP_THRESHOLD = 32 * 2**20
STEADY_TRIM_THRESHOLD = 2**31 - 1


@functools.cache
def steady_allocator() -> str:
    """Fix glibc malloc's mmap and trim thresholds for the rest of this process (once), so a
    CPU call's temporaries are reused from the heap rather than page-faulted anew on some calls
    and not others (see the module docstring). Returns ``"+malloc-steady"`` for the timing
    method where that was done, ``""`` where the C library is not glibc or refused."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return ""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        steady = libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD) == 1 \
            and libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return ""
    return "+malloc-steady" if steady else ""


def time_functions(fns: dict[str, Callable[[], object]], device, *, warmup_s: float = 0.05,
                   budget_s: float = 0.25, min_reps: int = 5, max_reps: int = 100_000,
                   graph: bool = False, clock: Clock | None = None,
                   capture: Capture | None = None,
                   control: Callable[[], object] | None = None) -> dict[str, Timing]:
    """Time each of several calls on ``device``: on GPUs one after the other with
    :func:`time_function` (the do_bench protocol, unchanged); on a CPU taking turns in one
    window (:func:`measure_interleaved`) of at least :data:`CPU_WINDOW_S` (one call alone:
    :data:`CPU_BUDGET_S`) and at least ``budget_s`` per call, after a shared warm-up of at
    least :data:`CPU_WARMUP_S`; a window whose rounds disagree by more than
    :data:`STEADY_SPREAD` goes on for as long again, and says so. ``control``: the CPU
    window's control workload (:func:`attention_control`); GPUs take none."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" or clock is not None and not isinstance(clock, HostClock):
        return {name: time_function(fn, device, warmup_s=warmup_s, budget_s=budget_s,
                                    min_reps=min_reps, max_reps=max_reps, graph=graph,
                                    clock=clock, capture=capture)
                for name, fn in fns.items()}
    note = ""
    if graph:
        _, note = _graph_or_reason(lambda: None, device, False, capture)
    # One call alone keeps the single-call floor (CPU_BUDGET_S): the window is for sharing.
    floor = CPU_WINDOW_S if len(fns) > 1 else CPU_BUDGET_S
    window_s = max(floor, budget_s * len(fns))
    if clock is None:
        clock = HostClock(False)
        clock.method += steady_allocator()
    return measure_interleaved(fns, clock,
                               warmup_s=max(warmup_s, CPU_WARMUP_S), window_s=window_s,
                               extend_s=window_s, min_reps=min_reps, max_reps=max_reps,
                               note=note, control=control)


def capture_graph(fn: Callable[[], object], device) -> Callable[[], object]:
    """``fn`` captured into a CUDA/HIP graph; returns the graph's replay.

    Warms up on a side stream first (capture requires it for autograd and library handles).
    Raises whatever capture raises; :func:`time_function` turns that into an honest fallback.
    """
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)
    return graph.replay


def time_function(fn: Callable[[], object], device, *, warmup_s: float = 0.05,
                  budget_s: float = 0.25, min_reps: int = 5, max_reps: int = 100_000,
                  flush: bool | None = None, graph: bool = False, clock: Clock | None = None,
                  capture: Capture | None = None, blocked: bool | None = None) -> Timing:
    """Time ``fn()`` on ``device`` (see the module docstring for the method).

    Args:
        fn: the call to time; its result is discarded.
        device: where it runs; ``cuda`` devices (NVIDIA or ROCm) are timed with events.
        warmup_s: warm-up budget, seconds.
        budget_s: measurement budget, seconds.
        min_reps, max_reps: bounds on the number of timed calls.
        flush: write 256 MB before each timed call; default: on GPUs only.
        graph: capture ``fn`` into a CUDA/HIP graph and time its replays (for tiny problems);
            when capture is impossible, plain calls are timed and :attr:`Timing.note` says why.
        clock: markers to use instead of the device's own (tests pass a fake).
        capture: graph capture to use instead of :func:`capture_graph` (tests pass a fake).
        blocked: time blocks of calls (:func:`measure_blocked`) instead of single calls;
            default: on a CPU with its own clock.

    On a CPU the warm-up and budget are at least :data:`CPU_WARMUP_S` and :data:`CPU_BUDGET_S`
    and calls are timed in blocks (:func:`measure_blocked`); on GPUs, :func:`measure`.
    """
    import torch

    device = torch.device(device)
    gpu = device.type == "cuda"
    flush = gpu if flush is None else flush
    if blocked is None:
        blocked = not gpu and clock is None
    if clock is None:
        clock = DeviceClock(device, flush) if gpu else HostClock(flush)
        if not gpu:
            clock.method += steady_allocator()
    note = ""
    method = clock.method
    if graph:
        fn, note = _graph_or_reason(fn, device, gpu, capture)
        method += "" if note else "+graph"
    if blocked:
        return measure_blocked(fn, clock, warmup_s=max(warmup_s, CPU_WARMUP_S),
                               budget_s=max(budget_s, CPU_BUDGET_S), min_reps=min_reps,
                               max_reps=max_reps, note=note)
    return measure(fn, clock, warmup_s=warmup_s, budget_s=budget_s, min_reps=min_reps,
                   max_reps=max_reps, method=method, note=note)


def _graph_or_reason(fn, device, gpu: bool, capture) -> tuple[Callable[[], object], str]:
    if capture is None:
        if not gpu:
            return fn, f"graph replay unavailable: {device.type} is not a CUDA/HIP device"
        capture = capture_graph
    try:
        return capture(fn, device), ""
    except Exception as exc:  # noqa: BLE001 - any capture failure means: time plain calls
        text = str(exc).strip().splitlines()
        return fn, (f"graph replay unavailable: capture failed with {type(exc).__name__}: "
                    f"{text[0] if text else ''}")[:300]
