"""Fidelity of the harness's timing: one call timed by the harness and by the field's yardstick.

Run ``python -m harness.run.fidelity`` (``--help`` for options). For every case and backend it
builds the inputs once, then times the very same call (forward, and backward with a retained
graph) alternately with :func:`harness.checks.timing.time_function` and with the yardstick:

* CPU: ``torch.utils.benchmark.Timer(...).blocked_autorange`` with
  ``num_threads=torch.get_num_threads()`` (Timer uses one thread unless told otherwise), median;
* GPU (NVIDIA or ROCm): ``triton.testing.do_bench(fn, warmup, rep, return_mode="median")``;
  triton is imported only there, so the script runs on CPU-only machines without it.

Each of ``--rounds`` rounds times the call with both (in alternating order, so drift hits both
alike); the ratio reported is the median over rounds of the two methods' medians' ratio within
a round. It prints one markdown table, one row per case,
backend and pass, with the ratio ``harness / yardstick``, and exits 1 when any ratio is further
from 1 than the target (10% on a CPU, 3% on a GPU), 0 otherwise.

This is a benchmark, not a unit test: it lives in the package (not ``tests/``) so an installed
harness on a GPU machine can run it from anywhere, with nothing but the package itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from tabulate import tabulate

from harness.backends import load_backend
from harness.case.suites import parse_inline_case
from harness.checks import timing
from harness.errors import HarnessError
from harness.target import detect

#: Allowed |harness / yardstick - 1| per device type.
TOLERANCE = {"cpu": 0.10, "cuda": 0.03}

#: Default backends; an unavailable one (flash-attn on a CPU) becomes a note, not an error.
DEFAULT_BACKENDS = ("sdpa-flash", "flash-attn")

#: Default cases, sized so one call takes about 1-30 ms on the device type.
DEFAULT_CASES = {
    "cpu": (
        "{batch = 2, seqlen_q = 256, seqlen_k = 256, heads_q = 8, heads_kv = 8, head_dim = 64, "
        "dtype = \"float32\", causal = true}",
        "{batch = 1, seqlen_q = 512, seqlen_k = 512, heads_q = 8, heads_kv = 2, head_dim = 128, "
        "dtype = \"bfloat16\"}",
        "{batch = 2, seqlen_q = 128, seqlen_k = 128, heads_q = 4, heads_kv = 4, head_dim = 64, "
        "dtype = \"float16\", causal = true}",
    ),
    "cuda": (
        "{batch = 4, seqlen_q = 2048, seqlen_k = 2048, heads_q = 16, heads_kv = 16, "
        "head_dim = 128, dtype = \"bfloat16\", causal = true}",
        "{batch = 8, seqlen_q = 1024, seqlen_k = 1024, heads_q = 32, heads_kv = 8, "
        "head_dim = 128, dtype = \"bfloat16\"}",
        "{batch = 1, seqlen_q = 8192, seqlen_k = 8192, heads_q = 32, heads_kv = 32, "
        "head_dim = 64, dtype = \"float16\", causal = true}",
    ),
}


@dataclass(frozen=True)
class Row:
    """One comparison: the medians (ms) of both methods over the rounds."""

    case: str
    backend: str
    timed: str
    harness_ms: float
    yardstick_ms: float
    harness_iqr_ms: float
    reps: int
    #: Median over rounds of ``harness / yardstick`` measured in the same round.
    ratio: float


def within(ratio: float, tolerance: float) -> bool:
    """Whether ``ratio`` is within ``tolerance`` of 1."""
    return abs(ratio - 1.0) <= tolerance


def table(rows: Sequence[Row], tolerance: float, yardstick: str) -> str:
    """The rows as a GitHub markdown table."""
    body = [[r.case, f"`{r.backend}`", r.timed, f"{r.harness_ms:.4g}", f"{r.harness_iqr_ms:.2g}",
             r.reps, f"{r.yardstick_ms:.4g}", f"{r.ratio:.3f}",
             "ok" if within(r.ratio, tolerance) else f"OFF by more than {tolerance:.0%}"]
            for r in rows]
    return tabulate(body, headers=["case", "backend", "pass", "harness ms", "IQR ms", "reps",
                                   f"{yardstick} ms", "ratio", "verdict"],
                    tablefmt="github", disable_numparse=True)


# ------------------------------------------------------------------------------- measuring


def yardstick(device_type: str, warmup_ms: float, rep_ms: float) -> tuple[str, Callable]:
    """The name and the timing function (``fn -> median ms``) of the device's yardstick."""
    import torch

    if device_type == "cuda":
        import triton.testing  # only on GPUs: CPU machines need not have triton

        def do_bench(fn) -> float:
            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                 return_mode="median"))

        return "triton do_bench", do_bench

    from torch.utils.benchmark import Timer

    def timer(fn) -> float:
        t = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return t.blocked_autorange(min_run_time=rep_ms / 1e3).median * 1e3

    return "torch Timer", timer


def calls(case, backend, device) -> dict[str, Callable[[], object]]:
    """The forward call and, when the backend has one, the backward call of a case."""
    import torch

    from harness.exact.inputs import make_inputs

    inputs = make_inputs(case, device, 0)

    def fwd():
        with torch.no_grad():
            return backend.forward(inputs)

    out = {"fwd": fwd}
    if backend.capabilities.backward and case.entry != "kvcache":
        grad_inputs = inputs.with_grad()
        result = backend.forward(grad_inputs).out
        leaves = (grad_inputs.q, grad_inputs.k, grad_inputs.v)
        out["bwd"] = lambda: torch.autograd.grad(result, leaves, inputs.dout, retain_graph=True)
    return out


def compare_call(fn, device, *, rounds: int, warmup_ms: float, rep_ms: float, graph: bool,
                 measure_yardstick: Callable) -> Row:
    """Both methods over ``rounds`` alternating rounds (``case`` and ``backend`` left empty).

    The ratio is the median of the per-round ratios: a round's two measurements are seconds
    apart, so load from other processes, clock changes and drift mostly cancel in its ratio.
    """
    ours, theirs, ratios, iqrs, reps = [], [], [], [], []
    for i in range(rounds):
        steps = ["harness", "yardstick"] if i % 2 == 0 else ["yardstick", "harness"]
        got: dict[str, float] = {}
        for step in steps:
            if step == "harness":
                t = timing.time_function(fn, device, warmup_s=warmup_ms / 1e3,
                                         budget_s=rep_ms / 1e3, graph=graph)
                got[step] = t.median_ms
                iqrs.append(t.iqr_ms)
                reps.append(t.reps)
            else:
                got[step] = measure_yardstick(fn)
        ours.append(got["harness"])
        theirs.append(got["yardstick"])
        ratios.append(got["harness"] / got["yardstick"])
    return Row("", "", "", statistics.median(ours), statistics.median(theirs),
               statistics.median(iqrs), int(statistics.median(reps)), statistics.median(ratios))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness.run.fidelity",
        description="Time the same attention call with the harness and with "
                    "torch.utils.benchmark (CPU) or triton.testing.do_bench (GPU); print the "
                    "ratio.")
    parser.add_argument("--backend", action="append", metavar="NAME|FILE.py:FUNC",
                        help="backend to time, repeatable (default: sdpa-flash and flash-attn, "
                             "where available)")
    parser.add_argument("--case", action="append", metavar="'{...}'",
                        help="a case as a TOML inline table, repeatable (default: three cases "
                             "sized for this device)")
    parser.add_argument("--passes", default="fwd,bwd", metavar="LIST",
                        help="comma-separated passes to time: fwd, bwd (default: fwd,bwd)")
    parser.add_argument("--rounds", type=int, default=7, metavar="N",
                        help="alternating rounds per call; the median of the rounds' ratios is "
                             "reported (default: 7)")
    parser.add_argument("--warmup-ms", type=float, default=None, metavar="MS",
                        help="warm-up budget per measurement (default: 25 on GPUs, as do_bench; "
                             "on CPUs the harness's floor, harness.checks.timing.CPU_WARMUP_S: "
                             "300)")
    parser.add_argument("--rep-ms", type=float, default=None, metavar="MS",
                        help="measurement budget per measurement (default: 100 on GPUs, as "
                             "do_bench; on CPUs the harness's floor, CPU_BUDGET_S: 1000; the "
                             "harness side never times less than that floor)")
    parser.add_argument("--graph", action="store_true",
                        help="time the harness side with CUDA/HIP graph replay (default: off)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    target = detect()
    device_type = target.device_type
    device = torch.device(device_type)
    warmup_ms = args.warmup_ms or (25.0 if device_type == "cuda" else timing.CPU_WARMUP_S * 1e3)
    rep_ms = args.rep_ms or (100.0 if device_type == "cuda" else timing.CPU_BUDGET_S * 1e3)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    try:
        cases = [parse_inline_case(text) for text in (args.case or DEFAULT_CASES[device_type])]
        backends = [load_backend(spec) for spec in (args.backend or DEFAULT_BACKENDS)]
    except HarnessError as exc:
        print(f"python -m harness.run.fidelity: error: {exc}", file=sys.stderr)
        return 2
    name, measure_yardstick = yardstick(device_type, warmup_ms, rep_ms)
    tolerance = TOLERANCE[device_type]
    print(f"# Timing fidelity on {target.target_id} ({target.device_name}): harness vs {name}\n")
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads{load}, warm-up "
          f"{warmup_ms:g} ms, budget {rep_ms:g} ms per measurement, {args.rounds} alternating "
          f"rounds; ratio = median over rounds of harness / {name} in the same round; "
          f"target |ratio - 1| <= {tolerance:.0%}\n")
    rows, notes = [], []
    for backend in backends:
        unavailable = backend.availability()
        if unavailable:
            notes.append(f"{backend.name}: unavailable ({unavailable})")
            continue
        for case in cases:
            reasons = backend.unsupported_reasons(case, target)
            if reasons:
                notes.append(f"{backend.name} {case.label}: skipped ({'; '.join(reasons)})")
                continue
            try:
                for timed, fn in calls(case, backend, device).items():
                    if timed not in passes:
                        continue
                    row = replace(compare_call(
                        fn, device, rounds=args.rounds, warmup_ms=warmup_ms, rep_ms=rep_ms,
                        graph=args.graph, measure_yardstick=measure_yardstick),
                        case=case.label, backend=backend.name, timed=timed)
                    rows.append(row)
                    print(f"  {backend.name} {case.label} {timed}: {row.harness_ms:.4g} ms vs "
                          f"{row.yardstick_ms:.4g} ms", file=sys.stderr, flush=True)
            except Exception as exc:  # noqa: BLE001 - a failing kernel is a note, not a crash
                first = (str(exc).strip().splitlines() or [""])[0]
                notes.append(f"{backend.name} {case.label}: not timed, the call raised "
                             f"{type(exc).__name__}: {first}"[:300])
    if rows:
        print(table(rows, tolerance, name))
    for note in notes:
        print(f"\n- {note}")
    off = [r for r in rows if not within(r.ratio, tolerance)]
    print(f"\n{len(rows) - len(off)} of {len(rows)} within {tolerance:.0%}; worst ratio "
          f"{max((r.ratio for r in rows), key=lambda x: abs(x - 1), default=float('nan')):.3f}")
    return 1 if off or not rows else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
