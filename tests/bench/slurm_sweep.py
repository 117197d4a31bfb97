"""Benchmark, not a test: one sweep on a local one-node Slurm cluster, run whole and as 4 shards,
with and without ``--durations``. (Issue 25's closing figures.)

    .venv/bin/python -m tests.bench.slurm_sweep --rounds 2 -- --suite smoke --checks fwd,bwd

Starts the cluster of tests/slurm_cluster.py (root, slurm-wlm and munge needed), then per round
submits ``launchers/slurm/submit.sh`` three times, one after the other: ``1`` shard (the whole
sweep), ``4`` shards packed by the harness's estimate, and ``4`` shards packed with
``--durations`` from that round's whole run (whose per-check ``seconds`` were measured alone on
the machine, so they rank the tasks, not predict the shared machine's times). For each it prints
the wall time from submission to the merge job's end and every array task's run time as Slurm
measured it (``RunTime``, whole seconds). The harness options after ``--`` are the sweep's
(default: the smoke suite on sdpa-math, fwd,bwd,determinism); ``--explore-per-shard E``
(default 4) gives each of the 4 shards E explored cases and the whole run 4 x E, so that both
sweeps do the same work.

The node is declared with 4 CPUs whatever the machine has, so the 4 shards run at once; on a
machine with fewer cores they share them, and the 4-shard wall time says how much a sweep gains
here, not on 4 nodes. The spread of the shards' run times is what the packing decides.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.slurm_cluster import LocalSlurm, missing

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launchers" / "slurm" / "submit.sh"
DEFAULT = ["--backend", "sdpa-math", "--suite", "smoke", "--checks", "fwd,bwd,determinism"]
SHARDS = 4


def seconds(text: str) -> int:
    parts = [int(p) for p in re.split(r"[-:]", text)]
    while len(parts) < 4:
        parts.insert(0, 0)
    d, h, m, s = parts
    return ((d * 24 + h) * 60 + m) * 60 + s


def sweep(cluster: LocalSlurm, root: Path, name: str, shards: int, args: list[str]
          ) -> tuple[float, list[int], Path]:
    """Submit one sweep and wait for its merge; (wall seconds, run time of each shard, out)."""
    out = root / name
    env = cluster.env(ATTN_HARNESS=str(Path(sys.executable).parent / "attn-harness"),
                      ATTN_HARNESS_OUT=str(out), CI="1", SWEEP_SBATCH_OPTIONS="--oversubscribe")
    start = time.monotonic()
    result = cluster.run("sh", str(SUBMIT), str(shards), *args,
                         "--regressions", str(root / "regressions"), cwd=root, env=env)
    array = re.match(r"array (\d+) ", result.stdout).group(1)
    cluster.wait_all(timeout_s=3600)
    wall = time.monotonic() - start
    text = cluster.run("scontrol", "-o", "show", "job", array).stdout
    runs = sorted((int(m.group(1)), seconds(m.group(2))) for m in re.finditer(
        r"ArrayTaskId=(\d+) .*?RunTime=(\S+)", text))
    return wall, [t for _, t in runs], out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--explore-per-shard", type=int, default=4)
    parser.add_argument("harness", nargs="*", help="attn-harness run options (after --)")
    args = parser.parse_args(argv)
    why = missing()
    if why:
        print(f"slurm_sweep: no local Slurm: {why}", file=sys.stderr)
        return 2
    options = args.harness or DEFAULT
    print(f"sweep: attn-harness run {' '.join(options)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="attn-slurm-") as tmp:
        root = Path(tmp)
        with LocalSlurm(root / "cluster") as cluster:
            explore = args.explore_per_shard
            sharded = [*options, "--explore", str(explore)]
            for round_ in range(args.rounds):
                whole = sweep(cluster, root, f"whole{round_}", 1,
                              [*options, "--explore", str(explore * SHARDS)])
                rows.append(("whole (1 shard)", whole[0], whole[1]))
                estimate = sweep(cluster, root, f"estimate{round_}", SHARDS, sharded)
                rows.append((f"{SHARDS} shards, estimate", estimate[0], estimate[1]))
                recorded = sweep(cluster, root, f"durations{round_}", SHARDS,
                                 [*sharded, "--durations", str(whole[2])])
                rows.append((f"{SHARDS} shards, --durations", recorded[0], recorded[1]))
                for label, wall, runs in rows[-3:]:
                    spread = (f"; shards {runs} s, max/mean {max(runs) / statistics.mean(runs):.2f}"
                              if len(runs) > 1 else f"; run time {runs[0]} s")
                    print(f"round {round_ + 1}: {label}: {wall:.1f} s from submission to the "
                          f"merge's end{spread}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
