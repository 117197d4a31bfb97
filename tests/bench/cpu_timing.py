"""Benchmark, not a test: does one `attn-harness run --checks throughput` on this CPU agree with an
independent timer, run after run? (Issue 11's CPU throughput item.)

    .venv/bin/python -m tests.bench.cpu_timing --rounds 3

Each round times the same SDPA call (the harness's own forward on the harness's inputs) with
`torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time=2)` at the same thread count in
a fresh process, then runs the harness CLI in a fresh process on the case (b2 q1024 k1024 h8 d64
bf16 causal, sdpa-flash), then Timer again: the two Timer readings bracket the harness's run, so
the ratio (the harness's median over the mean of the two) compares measurements of one stretch
of the machine, and the Timers' difference says how far the machine itself moved in it. It
prints whether that mean lies inside the harness's reported IQR and, over all rounds, how many
rounds' IQRs hold the median of every round's median, how the IQR of the medians across rounds
(the run-to-run variation) compares with the IQR one run reports, and the range each timer read
across rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CASE = ('{batch = 2, seqlen_q = 1024, seqlen_k = 1024, heads_q = 8, head_dim = 64, '
        'dtype = "bfloat16", causal = true}')

TIMER = f"""
import torch
from torch.utils.benchmark import Timer
from harness.backends import load_backend
from harness.inputs import make_inputs
from harness.suites import parse_inline_case
case = parse_inline_case({CASE!r})
backend = load_backend("sdpa-flash")
inputs = make_inputs(case, torch.device("cpu"), 0)
def fwd():
    with torch.no_grad():
        return backend.forward(inputs)
m = Timer(stmt="fn()", globals={{"fn": fwd}},
          num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=2)
print(m.median * 1e3)
"""


def harness_ms(out: Path, profile: str = "quick") -> tuple[float, float, float]:
    subprocess.run([sys.executable, "-m", "harness.cli", "run", "--backend", "sdpa-flash",
                    "--checks", "throughput", "--explore", "0", "--max-gflop", "0", "--out",
                    str(out), "--profile", profile, "--case", CASE], check=True,
                   capture_output=True)
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    m = record["metrics"]
    return m["time_ms"], m["timing_q1_ms"], m["timing_q3_ms"]


def timer_ms() -> float:
    out = subprocess.run([sys.executable, "-c", TIMER], check=True, capture_output=True,
                         text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default="quick",
                        help="the harness run's profile (its timing window; default: quick)")
    args = parser.parse_args(argv)
    print("| round | Timer before ms | harness median ms | harness IQR ms | Timer after ms | "
          "ratio to the Timers' mean | Timer inside the IQR |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            before = timer_ms()
            median, q1, q3 = harness_ms(Path(tmp) / f"run{i}", args.profile)
            after = timer_ms()
            independent = (before + after) / 2
            inside = q1 <= independent <= q3
            rows.append((median, q1, q3, before, after, inside))
            print(f"| {i + 1} | {before:.2f} | {median:.2f} | {q1:.2f}-{q3:.2f} | {after:.2f} | "
                  f"{median / independent:.3f} | {'yes' if inside else 'no'} |", flush=True)
    within = sum(abs(2 * m / (b + a) - 1) <= 0.10 for m, _, _, b, a, _ in rows)
    medians = [m for m, *_ in rows]
    timers = [t for *_, b, a, _ in rows for t in (b, a)]
    typical = statistics.median(medians)
    covered = sum(q1 <= typical <= q3 for _, q1, q3, *_ in rows)
    drift = max(abs(a / b - 1) for *_, b, a, _ in rows)
    print(f"\nratio within 10%: {within} of {len(rows)}; Timer's mean inside the harness's "
          f"reported IQR: {sum(r[-1] for r in rows)} of {len(rows)}; the median of the "
          f"harness's medians ({typical:.2f} ms) inside a round's IQR: {covered} of {len(rows)}")
    print(f"across rounds the harness read {min(medians):.2f}-{max(medians):.2f} ms and Timer "
          f"{min(timers):.2f}-{max(timers):.2f} ms; Timer's own reading moved by up to "
          f"{100 * drift:.0f}% between the two ends of one round")
    if len(rows) >= 2:
        q = statistics.quantiles(medians, n=4, method="inclusive")
        reported = statistics.median(q3 - q1 for _, q1, q3, *_ in rows)
        print(f"run to run, the harness's medians spread over an IQR of {q[2] - q[0]:.2f} ms; "
              f"the IQR one run reports is {reported:.2f} ms (the median over rounds): a run's "
              f"spread is {'at least as wide as' if reported >= q[2] - q[0] else 'narrower than'}"
              f" the run-to-run variation")
    steady = [(m, b, a) for m, _, _, b, a, _ in rows if abs(a / b - 1) <= 0.10]
    agree = sum(abs(2 * m / (b + a) - 1) <= 0.10 for m, b, a in steady)
    print(f"rounds in which Timer's two readings agree within 10% (the machine held still): "
          f"{len(steady)}; the harness within 10% of them in {agree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
