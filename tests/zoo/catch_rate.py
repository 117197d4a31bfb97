"""Measure exploration against the bug zoo: catch rate, time to the first failure, minimal cases;
and the false-positive rate of a correct kernel over many generated cases.

A benchmark, not a test (pytest does not collect it). Run from the repository root:

    .venv/bin/python -m tests.zoo.catch_rate                       # every zoo kernel, quick profile
    .venv/bin/python -m tests.zoo.catch_rate --false-positives 2000 --backend sdpa-math
    .venv/bin/python -m tests.zoo.catch_rate --zoo input-space     # also: dropout, fa2, fp8, fa4
    .venv/bin/python -m tests.zoo.catch_rate --zoo problems --suites smoke,edge   # issue 26

Each kernel is explored exactly as ``attn-harness run`` explores (same strategies, worker
process, checks fwd,bwd,determinism, seed 0; ``--budget S`` gives the free draws a time budget
as ``--explore-budget`` does). A kernel counts as caught only when its minimal
case fails one of the checks its zoo table expects (a ``fail`` verdict): an exploration that ended
on a timeout or crash of the slow fixture kernel says so in its row and is not a catch. Times are
wall-clock on this machine and include the worker's start.

``--suites smoke,edge`` also runs each kernel on those suites' cases (the default job's smoke
suite and the shipped edge suite), in file order, and reports the first case that fails one of
the expected checks and the seconds until it did (the same worker, so comparable to
exploration's time to first failure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from harness.backends import load_backend
from harness.case import case_from_dict
from harness.results.records import FAILING
from harness.run.explore import explore
from harness.run.worker import ExplorationWorker, Task
from tests.zoo.input_space_kernels import ZOO_INPUT_SPACE
from tests.zoo.kernels import ZOO


def _module_zoo(path: str) -> dict[str, object]:
    """The ZOO table of a directory of module variants (loaded by path: tests/zoo/fa2 has no
    package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("attn_harness_zoo_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ZOO


def _dropout_zoo() -> dict[str, object]:
    from tests.zoo.dropout_kernels import ZOO as DROPOUT

    # "unseeded" is the kernel whose dropout is not seed-determined: the statistical fallback
    # judges it, and it is correct, so it is not a bug to catch.
    return {k: v for k, v in DROPOUT.items() if v != "recovery"}


def _fp8_zoo() -> dict[str, object]:
    return {p.stem: ("fwd",) for p in sorted(Path("tests/zoo/fp8").glob("*.py"))
            if not p.stem.startswith("_")}


#: --zoo name -> (kernel -> backend spec, kernel -> expected checks).
ZOOS = {
    "classic": (lambda k: f"tests/zoo/kernels.py:{k}", lambda: ZOO),
    "input-space": (lambda k: f"tests/zoo/input_space_kernels.py:{k}", lambda: ZOO_INPUT_SPACE),
    "dropout": (lambda k: f"tests/zoo/dropout_kernels.py:{k}", _dropout_zoo),
    "fa2": (lambda k: f"flash-attn@tests/zoo/fa2/{k}.py",
            lambda: _module_zoo("tests/zoo/fa2/ZOO.py")),
    # e4m3fnuz is gfx942's format, which FA3 does not take: that kernel runs through AITER's
    # fp8 entry
    "fp8": (lambda k: f"{'aiter' if k == 'fnuz_as_fn' else 'flash-attn3'}@tests/zoo/fp8/{k}.py",
            _fp8_zoo),
    "problems": (lambda k: f"flash-attn@tests/zoo/problems/{k}.py",
                 lambda: _module_zoo("tests/zoo/problems/ZOO.py")),
    "fa4": (lambda k: f"flash-attn4@tests/zoo/fa4/{k}.py",
            lambda: _module_zoo("tests/zoo/fa4/ZOO.py")),
}

CHECKS = ("fwd", "bwd", "determinism")


def run_one(spec: str, examples: int, seed: int, profile: str, progress: int = 0,
            timeout: float = 300.0, budget_s: float | None = None):
    """Explore ``spec`` (its free draws under ``budget_s``, as ``--explore-budget`` gives it); with
    ``progress``, print a line every ``progress`` cases (so a sweep stopped early still says how
    far it got)."""
    caps = load_backend(spec).capabilities
    start = time.perf_counter()
    seen: set[str] = set()
    flagged: set[str] = set()

    def on_record(record) -> None:
        seen.add(record.case_id)
        if record.status in FAILING:
            flagged.add(record.case_id)
        if progress and record.check == CHECKS[-1] and len(seen) % progress == 0:
            print(f"  {len(seen)} cases in {time.perf_counter() - start:.0f}s, "
                  f"{len(flagged)} flagged", flush=True)

    with ExplorationWorker(timeout) as worker:
        def run_case(case):
            return worker.run(Task("explore", case, spec, CHECKS, seed, profile=profile),
                              lambda r: None)

        result = explore(spec, caps, run_case, profile=profile, examples=examples, seed=seed,
                         on_record=on_record, budget_s=budget_s)
    return result, time.perf_counter() - start


def is_caught(result, expected) -> bool:
    """Whether ``result``'s minimal case fails one of the ``expected`` checks (a check name or
    a tuple of them) with a ``fail`` verdict: a timeout, crash or error of the slow fixture
    kernel ends an exploration too, but it is not the bug being caught."""
    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    return result.minimal is not None and any(
        r.check in expected and r.status == "fail" for r in result.failing)


def run_suites(spec: str, suites: list[str], expected, seed: int, profile: str,
               timeout: float = 300.0) -> tuple[str, float] | None:
    """The first case of ``suites`` (in order) on which ``spec`` fails an ``expected`` check,
    and the seconds until then (worker start included); None when no case does."""
    from harness.case.suites import load_suite

    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    start = time.perf_counter()
    with ExplorationWorker(timeout) as worker:
        for name in suites:
            for suite in load_suite(name):
                for case in suite.cases:
                    records = worker.run(Task(name, case, spec, CHECKS, seed, profile=profile),
                                         lambda r: None)
                    if any(r.check in expected and r.status == "fail" for r in records):
                        return f"{name}: {case.name or case.label}", time.perf_counter() - start
    return None


def catch_rate(args) -> int:
    rows, firsts = [], []
    spec_of, table = ZOOS[args.zoo]
    zoo = table()
    if args.kernels:
        zoo = {name: zoo[name] for name in args.kernels.split(",")}
    suites = [s for s in args.suites.split(",") if s]
    for name in sorted(zoo):
        if suites:
            found = run_suites(spec_of(name), suites, zoo[name], args.seed, args.profile,
                               timeout=args.timeout)
            print(f"| {name} | suites | " + (f"caught on `{found[0]}` after {found[1]:.1f}s |"
                                            if found else "not caught by the suites |"),
                  flush=True)
        result, wall = run_one(spec_of(name), args.examples, args.seed, args.profile,
                               timeout=args.timeout, budget_s=args.budget or None)
        caught = is_caught(result, zoo[name])
        if caught:
            firsts.append(result.seconds_to_first_failure + (wall - result.seconds))
            minimal = result.minimal.label
            checks = ",".join(sorted({r.check for r in result.failing}))
            rows.append(f"| {name} | yes | {result.examples} | {firsts[-1]:.1f} | "
                        f"{result.shrink_steps} | {checks} | `{minimal}` |")
        elif result.minimal is not None:  # the exploration ended on something else
            ended = ", ".join(sorted({f"{r.check} {r.status}" for r in result.failing}))
            rows.append(f"| {name} | NO (ended on {ended} at example {result.examples}) | - | "
                        f"- | - | - | `{result.minimal.label}` |")
        else:
            spent = (f" (the {result.budget_s:g} s budget of free draws was spent after "
                     f"{result.free_judged})" if result.budget_spent else "")
            rows.append(f"| {name} | NO{spent} | - | - | - | - | - |")
        print(rows[-1], flush=True)
    print()
    print(f"caught {len(firsts)} of {len(zoo)}; median time to first failure "
          f"{statistics.median(firsts):.1f}s (worker start included)" if firsts else "caught none")
    return 0 if len(firsts) == len(zoo) else 1


def false_positives(args) -> int:
    result, wall = run_one(args.backend, args.false_positives, args.seed, args.profile,
                           progress=50, timeout=args.timeout)
    distinct = len({r.case_id for r in result.records})
    failing = [r for r in result.records if r.status in FAILING]
    statuses: dict[str, int] = {}
    for r in result.records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    if args.records:  # to count distinct cases over sweeps of several seeds
        with open(args.records, "w", encoding="utf-8") as fh:
            for r in result.records:
                fh.write(json.dumps({"case_id": r.case_id, "check": r.check,
                                     "status": r.status}) + "\n")
    print(f"{args.backend}: {result.examples} generated cases ({distinct} distinct) in "
          f"{wall:.0f}s; records {statuses}; flagged: {len(failing)}")
    peak = max(result.records, default=None,
               key=lambda r: r.metrics.get("process_peak_rss_bytes", 0))
    if peak is not None and peak.metrics.get("process_peak_rss_bytes"):
        # the worker's lifetime peak: the first record that reaches it names the case
        print(f"worker peak RSS {peak.metrics['process_peak_rss_bytes'] / 2**30:.1f} GiB, "
              f"first reached on {case_from_dict(peak.case).label}")
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
                        help="which zoo: the classic porting bugs (default), the input space, "
                             "dropout masks, flash-attn module variants (fa2), fp8, issue 26's "
                             "problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=0.0, metavar="S",
                        help="seconds for each kernel's free draws, as `attn-harness run "
                             "--explore-budget S` gives them (default 0: no limit)")
    parser.add_argument("--kernels", default="", metavar="A,B",
                        help="only these kernels of the zoo (default: all)")
    parser.add_argument("--records", default="", metavar="FILE",
                        help="with --false-positives: write each record's case_id, check and "
                             "status to FILE (JSON lines)")
    parser.add_argument("--suites", default="", metavar="A,B",
                        help="also run each zoo kernel on these suites (e.g. smoke,edge) and "
                             "report the first case that catches it")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one case's checks may take in the worker (default: 300)")
    args = parser.parse_args(argv)
    if args.false_positives:
        return false_positives(args)
    print("| kernel | caught | at example | seconds to first failure | shrink steps | checks "
          "| minimal case |")
    print("|---|---|---|---|---|---|---|")
    return catch_rate(args)


if __name__ == "__main__":
    sys.exit(main())
