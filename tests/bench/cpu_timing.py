"""Benchmark, not a test: does one `attn-harness run --checks throughput` on this CPU agree with an
independent timer, run after run? (Issue 11's CPU throughput item.)

    .venv/bin/python -m tests.bench.cpu_timing --rounds 3

Each round runs the harness CLI in a fresh process on one case (b2 q1024 k1024 h8 d64 bf16
causal, sdpa-flash) and then, in another fresh process, times the same SDPA call (the harness's
own forward on the harness's inputs) with `torch.utils.benchmark.Timer(...).blocked_autorange(
min_run_time=2)` at the same thread count. It prints both medians, the harness's IQR and the
ratio, and whether Timer's median lies inside the harness's reported IQR (the spread a reader
is given for that moment of the machine); interleaving the two keeps slow drifts of the machine
out of the ratio, and the summary line gives the range each read across rounds.
"""

from __future__ import annotations

import argparse
import json
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


def harness_ms(out: Path) -> tuple[float, float, float]:
    subprocess.run([sys.executable, "-m", "harness.cli", "run", "--backend", "sdpa-flash",
                    "--checks", "throughput", "--explore", "0", "--max-gflop", "0", "--out",
                    str(out), "--case", CASE], check=True, capture_output=True)
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
    args = parser.parse_args(argv)
    print("| round | harness median ms | harness IQR ms | Timer median ms | ratio | Timer inside "
          "the IQR |")
    print("|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            median, q1, q3 = harness_ms(Path(tmp) / f"run{i}")
            independent = timer_ms()
            inside = q1 <= independent <= q3
            rows.append((median, independent, inside))
            print(f"| {i + 1} | {median:.2f} | {q1:.2f}-{q3:.2f} | {independent:.2f} | "
                  f"{median / independent:.3f} | {'yes' if inside else 'no'} |", flush=True)
    within = sum(abs(m / t - 1) <= 0.10 for m, t, _ in rows)
    print(f"\nratio within 10%: {within} of {len(rows)}; Timer's median inside the harness's "
          f"reported IQR: {sum(x for _, _, x in rows)} of {len(rows)}; across rounds the harness "
          f"read {min(m for m, _, _ in rows):.2f}-{max(m for m, _, _ in rows):.2f} ms and Timer "
          f"{min(t for _, t, _ in rows):.2f}-{max(t for _, t, _ in rows):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
