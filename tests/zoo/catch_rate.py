"""Measure exploration against the bug zoo: catch rate, time to the first failure, minimal cases;
and the false-positive rate of a correct kernel over many generated cases.

A benchmark, not a test (pytest does not collect it). Run from the repository root:

    .venv/bin/python -m tests.zoo.catch_rate                       # every zoo kernel, quick profile
    .venv/bin/python -m tests.zoo.catch_rate --false-positives 2000 --backend sdpa-math
    .venv/bin/python -m tests.zoo.catch_rate --zoo input-space     # issue 12's input-space zoo

Each kernel is explored exactly as ``attn-harness run`` explores (same strategies, worker
process, checks fwd,bwd,determinism, seed 0). Times are wall-clock on this machine and include
the worker's start.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from harness.backends import load_backend
from harness.explore import explore
from harness.records import FAILING
from harness.runner import ExplorationWorker, Task
from tests.zoo.input_space_kernels import ZOO_INPUT_SPACE
from tests.zoo.kernels import ZOO

#: --zoo name -> (file, kernel -> expected checks).
ZOOS = {"classic": ("tests/zoo/kernels.py", ZOO),
        "input-space": ("tests/zoo/input_space_kernels.py", ZOO_INPUT_SPACE)}

CHECKS = ("fwd", "bwd", "determinism")


def run_one(spec: str, examples: int, seed: int, profile: str):
    caps = load_backend(spec).capabilities
    start = time.perf_counter()
    with ExplorationWorker(300.0) as worker:
        def run_case(case):
            return worker.run(Task("explore", case, spec, CHECKS, seed, profile=profile),
                              lambda r: None)

        result = explore(spec, caps, run_case, profile=profile, examples=examples, seed=seed)
    return result, time.perf_counter() - start


def catch_rate(args) -> int:
    rows, firsts = [], []
    path, zoo = ZOOS[args.zoo]
    for name in sorted(zoo):
        result, wall = run_one(f"{path}:{name}", args.examples, args.seed, args.profile)
        caught = result.minimal is not None
        if caught:
            firsts.append(result.seconds_to_first_failure + (wall - result.seconds))
        minimal = result.minimal.label if caught else "-"
        checks = ",".join(sorted({r.check for r in result.failing})) or "-"
        rows.append(f"| {name} | {'yes' if caught else 'NO'} | "
                    f"{result.examples if caught else '-'} | "
                    f"{firsts[-1]:.1f} | {result.shrink_steps} | {checks} | `{minimal}` |"
                    if caught else f"| {name} | NO | - | - | - | - | - |")
        print(rows[-1], flush=True)
    print()
    print(f"caught {len(firsts)} of {len(zoo)}; median time to first failure "
          f"{statistics.median(firsts):.1f}s (worker start included)" if firsts else "caught none")
    return 0 if len(firsts) == len(zoo) else 1


def false_positives(args) -> int:
    result, wall = run_one(args.backend, args.false_positives, args.seed, args.profile)
    distinct = len({r.case_id for r in result.records})
    failing = [r for r in result.records if r.status in FAILING]
    statuses: dict[str, int] = {}
    for r in result.records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    print(f"{args.backend}: {result.examples} generated cases ({distinct} distinct) in "
          f"{wall:.0f}s; records {statuses}; flagged: {len(failing)}")
    if result.minimal is not None:
        print(f"minimal failing case: {result.minimal.label}")
        for r in result.failing:
            print(f"  {r.check} {r.status}: {r.reason[:300]}")
    return 1 if failing else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=20,
                        help="cases per zoo kernel (default: 20, the quick profile's)")
    parser.add_argument("--false-positives", type=int, default=0, metavar="N",
                        help="instead: explore N cases of --backend and count failures")
    parser.add_argument("--backend", default="tests/zoo/kernels.py:correct")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--zoo", choices=sorted(ZOOS), default="classic",
                        help="which zoo: the classic porting bugs or issue 12's input space")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.false_positives:
        return false_positives(args)
    print("| kernel | caught | at example | seconds to first failure | shrink steps | checks "
          "| minimal case |")
    print("|---|---|---|---|---|---|---|")
    return catch_rate(args)


if __name__ == "__main__":
    sys.exit(main())
