"""Benchmark, not a test: does one `attn-harness run --checks throughput` on this CPU agree with an
independent timer, run after run, as well as that timer agrees with itself? (Issue 11's CPU
throughput item.)

    .venv/bin/python -m tests.bench.cpu_timing --rounds 8

The independent timer is `torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time=2)` on
the same SDPA call (the harness's own forward on the harness's inputs, b2 q1024 k1024 h8 d64 bf16
causal, sdpa-flash) at the same thread count, each reading in a fresh process. The readings run
in one chain, Timer between every two middles:

    Timer, harness, Timer, Timer (control), Timer, harness, Timer, Timer (control), Timer, ...

so each middle is bracketed by the two Timer readings on either side of it, and the middles take
turns between one harness CLI run (its forward's median and IQR) and one more Timer reading: the
control. A shared machine's speed wanders on the scale of seconds, so no reading agrees with its
neighbours every time; the control says how often an independent timer agrees with itself in
the same chain, which is the most that can be asked of the harness on this machine.

For each arm it prints how often the middle lies within 10% of its brackets' mean, how often its
own reported IQR holds the brackets' mean, and, over all rounds, how the IQR of the middles'
medians (the run-to-run variation) compares with the IQR one reading reports. For the harness it
also counts the runs whose timing said the machine moved (`timing_drift`, an `unsteady` note).
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
from harness.exact.inputs import make_inputs
from harness.case.suites import parse_inline_case
case = parse_inline_case({CASE!r})
backend = load_backend("sdpa-flash")
inputs = make_inputs(case, torch.device("cpu"), 0)
def fwd():
    with torch.no_grad():
        return backend.forward(inputs)
m = Timer(stmt="fn()", globals={{"fn": fwd}},
          num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=2)
print(m.median * 1e3, (m.median - m.iqr / 2) * 1e3, (m.median + m.iqr / 2) * 1e3)
"""


def harness_reading(out: Path, profile: str = "quick") -> dict:
    subprocess.run([sys.executable, "-m", "harness.cli", "run", "--backend", "sdpa-flash",
                    "--checks", "throughput", "--explore", "0", "--max-gflop", "0", "--out",
                    str(out), "--profile", profile, "--case", CASE], check=True,
                   capture_output=True)
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    m = record["metrics"]
    return {"median": m["time_ms"], "q1": m["timing_q1_ms"], "q3": m["timing_q3_ms"],
            "drift": m.get("timing_drift"), "unsteady": "unsteady" in m.get("timing_note", "")}


def timer_reading() -> dict:
    """Timer's median and, as its spread, the median -/+ half its IQR (Timer reports the IQR,
    not the quartiles)."""
    out = subprocess.run([sys.executable, "-c", TIMER], check=True, capture_output=True,
                         text=True)
    median, low, high = map(float, out.stdout.strip().splitlines()[-1].split())
    return {"median": median, "q1": low, "q3": high}


def summary(name: str, rows: list[tuple[dict, float, float]]) -> None:
    """``rows``: (middle reading, bracket before, bracket after)."""
    n = len(rows)
    within = sum(abs(2 * r["median"] / (b + a) - 1) <= 0.10 for r, b, a in rows)
    inside = sum(r["q1"] <= (b + a) / 2 <= r["q3"] for r, b, a in rows)
    medians = [r["median"] for r, _, _ in rows]
    typical = statistics.median(medians)
    covered = sum(r["q1"] <= typical <= r["q3"] for r, _, _ in rows)
    print(f"{name}: within 10% of its brackets' mean in {within} of {n}; its IQR holds the "
          f"brackets' mean in {inside} of {n}; the median of its medians ({typical:.2f} ms) "
          f"inside its IQR in {covered} of {n}; medians {min(medians):.2f}-"
          f"{max(medians):.2f} ms")
    if n >= 2:
        q = statistics.quantiles(medians, n=4, method="inclusive")
        reported = statistics.median(r["q3"] - r["q1"] for r, _, _ in rows)
        print(f"  run to run its medians spread over an IQR of {q[2] - q[0]:.2f} ms; the IQR "
              f"one reading reports is {reported:.2f} ms (median over readings)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4,
                        help="harness runs (and as many control Timer readings); default 4")
    parser.add_argument("--profile", default="quick",
                        help="the harness run's profile (its timing window; default: quick)")
    args = parser.parse_args(argv)
    print("| # | arm | Timer before ms | middle median ms | middle IQR ms | Timer after ms | "
          "ratio to the brackets' mean | harness drift |")
    print("|---|---|---|---|---|---|---|---|")
    arms: dict[str, list[tuple[dict, float, float]]] = {"harness": [], "control": []}
    with tempfile.TemporaryDirectory() as tmp:
        before = timer_reading()["median"]
        for i in range(2 * args.rounds):
            arm = "harness" if i % 2 == 0 else "control"
            middle = (harness_reading(Path(tmp) / f"run{i}", args.profile) if arm == "harness"
                      else timer_reading())
            after = timer_reading()["median"]
            arms[arm].append((middle, before, after))
            drift = middle.get("drift")
            drift_text = "" if drift is None else (
                f"{drift:+.0%}{' unsteady' if middle.get('unsteady') else ''}")
            print(f"| {i + 1} | {arm} | {before:.2f} | {middle['median']:.2f} | "
                  f"{middle['q1']:.2f}-{middle['q3']:.2f} | {after:.2f} | "
                  f"{2 * middle['median'] / (before + after):.3f} | {drift_text} |", flush=True)
            before = after
    print()
    summary("harness", arms["harness"])
    summary("control (Timer)", arms["control"])
    flagged = sum(bool(r.get("unsteady")) for r, _, _ in arms["harness"])
    print(f"harness runs whose timing said the machine moved (an 'unsteady' note): {flagged} of "
          f"{len(arms['harness'])}")
    timers = [b for _, b, _ in arms["harness"] + arms["control"]]
    harness = [r["median"] for r, _, _ in arms["harness"]]
    print(f"the median of the harness's medians over the median of all bracket Timer readings: "
          f"{statistics.median(harness) / statistics.median(timers):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
