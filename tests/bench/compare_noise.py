"""Benchmark, not a test: does ``attn-harness compare`` cry wolf on this machine, and does it
still catch a kernel made 25% slower? (Issue 24, point 4.)

    .venv/bin/python -m tests.bench.compare_noise --pairs 10 --keep /tmp/compare-bench
    .venv/bin/python -m tests.bench.compare_noise --evaluate /tmp/compare-bench   # rules only

Each pair is three ``attn-harness run --checks throughput`` runs of the fixture kernel
``tests/bench/slowed_kernel.py:attention`` (SDPA math behind flash-attn's signature) on a few
modest float32 cases, each run a fresh process as a user's would be: *base*, *slow* (the same
kernel with ``ATTN_BENCH_SLOWDOWN=0.25``: 25% more of the same work per call) and *same* (the
code of *base* again). Then ``compare(same, base)`` must find no regression (inconclusive
changes are allowed: they do not fail a comparison) and ``compare(slow, base)`` must flag one.

It prints, per pair, both comparisons' regressions and inconclusive changes, the machine's load
average, and at the end: identical pairs with no regression (the target: all of them) and slowed
pairs flagged (the target: at least 9 of 10). The machine is whatever it is: on a shared one,
say so with the figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
KERNEL = "tests/bench/slowed_kernel.py:attention"
#: Modest float32 problems (a few milliseconds each on a 2-core CPU).
SUITE = """\
[defaults]
dtype = "float32"
head_dim = 64
[[case]]
batch = 2
seqlen_q = 256
heads_q = 4
[[case]]
batch = 1
seqlen_q = 512
heads_q = 4
[[case]]
batch = 4
seqlen_q = 128
seqlen_k = 384
heads_q = 4
"""


def run_once(out: Path, suite: Path, slowdown: float, profile: str = "quick") -> float:
    """One CLI run into ``out``; returns its wall time in seconds."""
    env = {**os.environ, "ATTN_BENCH_SLOWDOWN": str(slowdown)}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--backend", KERNEL, "--suite", str(suite),
         "--checks", "throughput", "--profile", profile, "--out", str(out)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        sys.exit(f"run into {out} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def judge(current: Path, baseline: Path):
    from harness.results.compare import compare
    from harness.results.records import read_records

    result = compare(read_records(current / "results.jsonl"),
                     read_records(baseline / "results.jsonl"))
    throughput = [c for c in result.changes if c.what == "throughput"]
    regressed = [c for c in throughput if c.kind == "regression"]
    unsure = [c for c in throughput if c.kind == "inconclusive"]
    return result.regressed, regressed, unsure


def describe(changes) -> str:
    return "; ".join(f"{c.case} {c.check.split()[-1]} {c.before.split()[0]}->"
                     f"{c.after.split()[0]} ms" for c in changes) or "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--slowdown", type=float, default=0.25)
    parser.add_argument("--profile", default="quick",
                        help="the runs' profile: exhaustive times each case for longer")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--evaluate", type=Path, default=None,
                        help="only compare the runs kept in this folder by an earlier --keep")
    args = parser.parse_args(argv)
    import tempfile

    root = args.evaluate or args.keep or Path(tempfile.mkdtemp(prefix="compare-bench-"))
    if args.evaluate is None:
        root.mkdir(parents=True, exist_ok=True)
        suite = root / "suite.toml"
        suite.write_text(SUITE)
        for i in range(args.pairs):
            pair = root / f"pair-{i:02d}"
            seconds = []
            before = load()
            for name, slowdown in (("base", 0.0), ("slow", args.slowdown), ("same", 0.0)):
                seconds.append(run_once(pair / name, suite, slowdown, args.profile))
            (pair / "load").write_text(f"{before} -> {load()}\n")
            print(f"pair {i}: runs of {', '.join(f'{s:.0f}' for s in seconds)} s, load "
                  f"{(pair / 'load').read_text().strip()}", file=sys.stderr, flush=True)
    pairs = sorted(p for p in root.glob("pair-*") if (p / "same" / "results.jsonl").exists())
    quiet = flagged = 0
    for pair in pairs:
        same_regressed, same_reg, same_unsure = judge(pair / "same", pair / "base")
        slow_regressed, slow_reg, slow_unsure = judge(pair / "slow", pair / "base")
        quiet += not same_regressed
        flagged += slow_regressed
        text = (pair / "load").read_text().strip() if (pair / "load").exists() else "?"
        print(f"{pair.name} (load {text}):\n"
              f"  identical: {'REGRESSION' if same_regressed else 'no regression'}; "
              f"regressions: {describe(same_reg)}; inconclusive: {describe(same_unsure)}\n"
              f"  slowed:    {'flagged' if slow_regressed else 'NOT FLAGGED'}; "
              f"regressions: {describe(slow_reg)}; inconclusive: {describe(slow_unsure)}")
    print(f"identical pairs without a regression: {quiet}/{len(pairs)}; slowed pairs flagged "
          f"({args.slowdown:.0%} slower): {flagged}/{len(pairs)}; runs kept in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
