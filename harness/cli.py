"""The ``attn-harness`` command: run, info, report, compare.

Exit status: 0 when nothing failed, 1 when something failed, crashed, timed out or passed
unexpectedly (compare: when something regressed), 2 for bad usage or bad input (one line on
stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness import __version__, options
from harness.errors import HarnessError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
CHECKS = options.CHECKS


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


parse_checks = options.checks
positive_float = options.positive
non_negative_float = options.non_negative


def device_list(value: str):
    from harness.devices import parse_devices

    try:
        return parse_devices(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attn-harness", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"attn-harness {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run suites of cases on backends and write results + report",
                         description="Run suites of cases on backends; write DIR/results.jsonl "
                                     "and DIR/report.md.")
    run.add_argument("--backend", action="append", metavar="NAME|FILE.py:FUNC",
                     help="backend to test, repeatable (default: every backend available here)")
    run.add_argument("--suite", action="append", metavar="NAME|FILE.toml",
                     help="case suite by name (cases/NAME.toml) or path, repeatable "
                          "(default: smoke)")
    run.add_argument("--case", action="append", metavar="'{...}'",
                     help="one case as a TOML inline table, repeatable (what replay commands use)")
    run.add_argument("--profile", default="quick", metavar="quick|nightly|exhaustive",
                     help="effort per check and exploration budget (default: quick)")
    run.add_argument("--checks", type=parse_checks, default=CHECKS, metavar="LIST",
                     help="comma-separated checks (default: fwd,bwd,determinism,throughput)")
    run.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                     help="seconds one check may run before it is recorded as a timeout "
                          "(default: the profile's, 300 for quick)")
    run.add_argument("--seed", type=int, default=0, metavar="N",
                     help="seed of every input tensor and dropout draw (default: 0)")
    run.add_argument("--out", default=None, metavar="DIR",
                     help="where results.jsonl and report.md go (default: reports/<target-id>/)")
    run.add_argument("--audit", action="store_true",
                     help="also run cases a backend does not claim, and classify how it "
                          "treats them (default: off)")
    run.add_argument("--resume", action="store_true",
                     help="keep DIR/results.jsonl and run only what it lacks (default: start over)")
    run.add_argument("--devices", type=device_list, default=None, metavar="all|0,1,...",
                     help="GPUs to spread the cases over, one worker process each: 'all' or "
                          "indices as torch numbers them (default: one worker on the current "
                          "device)")
    run.add_argument("--max-gflop", type=non_negative_float, default=None, metavar="N",
                     help="skip checks whose forward (or forward + backward) pass needs more "
                          "than N GFLOP, recording why; 0 = no limit (default: 2 on a CPU, "
                          "no limit on a GPU)")
    run.add_argument("--explore", type=options.count, default=None, metavar="N",
                     help="hypothesis-generated cases per backend after the suites, shrunk to "
                          "the minimal failure (default: the profile's, 20 for quick; 0 = none; "
                          "none when --case is given)")
    run.add_argument("--regressions", default="cases/regressions", metavar="DIR",
                     help="where minimal failing cases found by exploration are written as TOML "
                          "(default: cases/regressions)")
    run.add_argument("--no-isolation", action="store_true",
                     help="run kernels in this process: no crash or timeout protection, for "
                          "debugging (default: a worker process)")
    run.add_argument("--graph-replay", action="store_true",
                     help="throughput: capture each timed call in a CUDA/HIP graph and time its "
                          "replays, for tiny problems where launch overhead dominates; records "
                          "say when capture was impossible (default: plain calls)")

    info = sub.add_parser("info", help="this machine's fingerprint and the backends available here",
                          description="Print this machine's fingerprint and every backend family.")
    info.add_argument("--json", action="store_true", help="print JSON (default: text)")
    info.add_argument("--target-id", action="store_true",
                      help="print only this machine's target id, e.g. rocm6.3-gfx942-mi300x (what "
                           "CI names its artifacts by) (default: the full fingerprint)")

    report = sub.add_parser("report", help="render results files as one markdown report",
                            description="Merge results files from any machines into one report; "
                                        "with -o, plots of TFLOP/s against sequence length are "
                                        "written next to it.")
    report.add_argument("results", nargs="+", metavar="RESULTS.jsonl")
    report.add_argument("--baseline", nargs="+", default=None, metavar="RESULTS.jsonl",
                        help="results to compare against: adds what changed (default: none)")
    report.add_argument("-o", "--output", metavar="FILE.md",
                        help="write the report here, plots next to it (default: stdout, no "
                             "plots)")

    compare = sub.add_parser(
        "compare", help="what changed against a baseline; exit 1 when something regressed",
        description="Compare results with a baseline: status flips, error-ratio growth, "
                    "throughput moves beyond the measured spread (see harness/compare.py). "
                    "Prints markdown; exits 1 when anything regressed, 0 otherwise.")
    compare.add_argument("results", nargs="+", metavar="RESULTS.jsonl")
    compare.add_argument("--baseline", nargs="+", required=True, metavar="RESULTS.jsonl",
                         help="the results to compare against (required)")
    compare.add_argument("--slowdown", type=positive_float, default=0.10, metavar="FRACTION",
                         help="relative change of a median time that may count, when the "
                              "interquartile ranges do not overlap (default: 0.10)")
    compare.add_argument("--ratio-growth", type=positive_float, default=0.25, metavar="FRACTION",
                         help="relative growth of err/baseline_err that counts, when it also "
                              "grows by more than 0.1 (default: 0.25)")
    compare.add_argument("-o", "--output", metavar="FILE.md",
                         help="also write the markdown here (default: stdout only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return {"run": cmd_run, "info": cmd_info, "report": cmd_report,
                "compare": cmd_compare}[args.command](args)
    except HarnessError as exc:
        sys.stderr.write(f"attn-harness {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("attn-harness: interrupted; records so far are kept "
                         "(attn-harness run --resume continues)\n")
        return 130
    except BrokenPipeError:  # `attn-harness info --json | head`: the reader has gone
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


# -------------------------------------------------------------------------------------- run


def collect_cases(args) -> list[tuple[str, object]]:
    from harness.suites import iter_cases, parse_inline_case

    cases = [("inline", parse_inline_case(text)) for text in (args.case or [])]
    suites = args.suite or ([] if cases else ["smoke"])
    return iter_cases(suites) + cases


def cmd_run(args) -> int:
    from harness.profile import get_profile

    profile = get_profile(args.profile)
    cases = collect_cases(args)  # validates every case file before anything starts
    timeout_s = args.timeout or profile.timeout_s
    if args.no_isolation:
        if args.devices is not None:
            raise UsageError("--devices runs one worker process per GPU, --no-isolation runs in "
                             "this process: drop one of them")
        return _run_in_process(args, cases, profile)
    from harness.runner import Worker, WorkerDied

    worker = Worker()
    try:
        target = worker.start()
        specs, notes = _choose_backends(worker, args.backend)
        args.device_indices = _devices(args.devices, target, notes)
    except WorkerDied as exc:
        worker.kill()
        raise UsageError(str(exc)) from None
    except BaseException:
        worker.kill()
        raise
    return _run(args, cases, profile, timeout_s, target, specs, notes, worker)


def _devices(spec, target: dict, notes: list[str]) -> list[int]:
    """The device indices of ``--devices`` on this machine; [] means one worker as usual."""
    if spec is None:
        return []
    from harness.devices import resolve_devices

    devices = resolve_devices(spec, int(target.get("device_count") or 0), target["vendor"])
    if not devices:
        notes.append("--devices all: no GPU here, so one worker runs on the CPU")
    else:
        notes.append(f"--devices: one worker on each of device(s) {','.join(map(str, devices))}")
    return devices


def _choose_backends(worker, requested: list[str] | None) -> tuple[list[str], list[str]]:
    from harness.backends import known_backends

    specs = requested or known_backends()
    resolved = worker.resolve(specs)
    errors = [info["error"] for info in resolved.values() if "error" in info]
    if errors and requested:
        raise UsageError(errors[0])
    notes = []
    if requested:
        for spec, info in resolved.items():
            if info["availability"]:
                notes.append(f"{spec} is unavailable here ({info['availability']}): its cases "
                             "are recorded as skips")
        return specs, notes
    # Default selection: say what is left out and why, so nothing disappears silently.
    for spec, info in resolved.items():
        why = info.get("error") or info.get("availability")
        if why:
            notes.append(f"not run: {spec} ({why}); name it with --backend to record its "
                         "cases as skips")
    chosen = [s for s, info in resolved.items() if "error" not in info and not info["availability"]]
    if not chosen:
        raise UsageError("no backend is available here; attn-harness info says why")
    return chosen, notes


def _tasks(cases, specs, args, profile, jury_dir: str = ""):
    from harness.runner import Task

    for suite, case in cases:
        for spec in specs:
            yield Task(suite=suite, case=case, backend=spec, checks=tuple(args.checks),
                       jury_dir=jury_dir,
                       max_gflop=getattr(args, "max_gflop", None),
                       graph_replay=getattr(args, "graph_replay", False),
                       seed=args.seed, audit=args.audit, profile=profile.name)


def _out_dir(args, target: dict) -> Path:
    return Path(args.out) if args.out else Path("reports") / target["target_id"]


def _run(args, cases, profile, timeout_s, target, specs, notes, worker) -> int:
    from harness.records import FAILING, RecordWriter, read_records
    from harness.runner import run_tasks

    out_dir = _out_dir(args, target)
    results = out_dir / "results.jsonl"
    done: set[tuple[str, str, str]] = set()
    if args.resume and results.exists():
        done = {(r.backend_name, r.case_id, r.check) for r in read_records(results)}
    tasks = []
    jury_dir = str(out_dir / "jury") if len(specs) > 1 else ""
    for task in _tasks(cases, specs, args, profile, jury_dir):
        remaining = tuple(c for c in task.checks
                          if (task.backend, task.case.case_id, c) not in done)
        if remaining:
            tasks.append(task.__class__(**{**task.__dict__, "checks": remaining}))
    print(f"attn-harness {__version__} on {target['target_id']} ({target['device_name']}): "
          f"{len(cases)} case(s) x {len(specs)} backend(s) [{', '.join(specs)}], "
          f"checks {','.join(args.checks)}, profile {profile.name}, seed {args.seed}",
          file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if done:
        print(f"resuming: {len(done)} record(s) kept, {len(tasks)} task(s) to go", file=sys.stderr)
    start = time.perf_counter()
    progress = _Progress(len(tasks), start)
    devices = getattr(args, "device_indices", None)
    with RecordWriter(results, append=bool(args.resume)) as writer:
        if devices:
            from harness.runner import run_tasks_on_devices

            outcome = run_tasks_on_devices(tasks, writer.write, devices=devices,
                                           timeout_s=timeout_s, progress=progress,
                                           first_worker=worker)
        else:
            outcome = run_tasks(tasks, writer.write, timeout_s=timeout_s, progress=progress,
                                first_worker=worker)
        findings = _explore(args, profile, specs, writer.write, done, timeout_s)
    if jury_dir:
        from harness import jury

        verdicts = jury.deliberate(jury_dir)
        if verdicts or not args.resume:
            jury.write(verdicts, out_dir / "jury.jsonl")
    records = read_records(results)
    _write_report(records, out_dir)
    for finding in findings:
        print(finding, file=sys.stderr)
    failed = sum(1 for r in records if r.status in FAILING)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(_count(records).items()))
    print(f"done in {time.perf_counter() - start:.1f}s: {counts or 'no records'}; "
          f"wrote {results} and {out_dir / 'report.md'}", file=sys.stderr)
    del outcome
    return EXIT_FAILED if failed else EXIT_OK


def _explore(args, profile, specs, sink, done, timeout_s) -> list[str]:
    """Run the profile's exploration for every backend; returns one summary per backend."""
    examples = profile.explore_examples if args.explore is None else args.explore
    checks = tuple(c for c in args.checks if c != "throughput")
    if examples <= 0 or args.case or not checks:
        return []
    from harness.explore import explore, summary
    from harness.runner import ExplorationWorker

    summaries = []
    with ExplorationWorker(timeout_s) as runner:
        resolved = runner.resolve(specs)
        for spec in specs:
            info = resolved[spec]
            if "error" in info or info["availability"]:
                continue
            print(f"exploring {spec}: up to {examples} generated case(s), checks "
                  f"{','.join(checks)}, seed {args.seed}", file=sys.stderr)

            def run_case(case, spec=spec):
                task = _task("explore", case, spec, checks, args, profile)
                return runner.run(task, lambda record: None, done)

            # Only generated cases and the minimal failure are recorded, not each shrink step.
            result = explore(spec, info["capabilities"], run_case, profile=profile.name,
                             examples=examples, seed=args.seed, on_record=sink,
                             regressions=Path(args.regressions))
            summaries.append(summary(result))
    return summaries


def _task(suite, case, spec, checks, args, profile):
    from harness.runner import Task

    return Task(suite=suite, case=case, backend=spec, checks=checks,
                max_gflop=getattr(args, "max_gflop", None), seed=args.seed, audit=args.audit,
                profile=profile.name)


def _count(records) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def _write_report(records, out_dir: Path) -> None:
    from harness import jury
    from harness.plot import write_plots
    from harness.report import render

    plots = write_plots(records, out_dir)
    extra = [jury.section(jury.read(out_dir / "jury.jsonl"))]
    (out_dir / "report.md").write_text(render(records, plots=plots, extra_sections=extra),
                                       encoding="utf-8")


class _Progress:
    """One line per finished task on stderr."""

    SYMBOLS = {"pass": "ok", "fail": "FAIL", "skip": "skip", "xfail": "xfail", "xpass": "XPASS",
               "crash": "CRASH", "timeout": "TIMEOUT", "error": "ERROR"}

    def __init__(self, total: int, start: float) -> None:
        self.total = total
        self.done = 0
        self.start = start
        self.width = len(str(total))

    def __call__(self, task, records) -> None:
        self.done += 1
        parts = []
        for r in records:
            text = f"{r.check} {self.SYMBOLS[r.status]}"
            if r.check == "throughput" and r.status == "pass":
                tf = r.metrics.get("tflops")
                text = f"{r.check} {tf * 1e3:.3g} GFLOP/s" if tf else text
            parts.append(text)
        elapsed = time.perf_counter() - self.start
        print(f"[{self.done:>{self.width}}/{self.total}] {elapsed:6.1f}s {task.backend:<14} "
              f"{task.case.label:<40} {' | '.join(parts)}", file=sys.stderr, flush=True)


def _run_in_process(args, cases, profile) -> int:
    from harness.backends import known_backends, load_backend
    from harness.records import FAILING, RecordWriter, read_records
    from harness.runner import run_in_process
    from harness.target import detect

    target = detect().to_dict()
    specs = args.backend or [s for s in known_backends() if not load_backend(s).availability()]
    out_dir = _out_dir(args, target)
    results = out_dir / "results.jsonl"
    with RecordWriter(results) as writer:
        run_in_process(list(_tasks(cases, specs, args, profile)), writer.write)
    records = read_records(results)
    _write_report(records, out_dir)
    print(f"wrote {results} and {out_dir / 'report.md'}", file=sys.stderr)
    return EXIT_FAILED if any(r.status in FAILING for r in records) else EXIT_OK


# ------------------------------------------------------------------------------------- info


def cmd_info(args) -> int:
    from harness.backends import known_backends
    from harness.runner import Worker

    worker = Worker()
    try:
        target = worker.start()
        resolved = {} if args.target_id else worker.resolve(known_backends())
    finally:
        worker.stop()
    if args.target_id:
        print(target["target_id"])
        return EXIT_OK
    backends = []
    for spec, info in resolved.items():
        if "error" in info:
            backends.append({"name": spec, "available": False, "reason": info["error"],
                             "family": "", "flavor": "", "version": ""})
            continue
        d = info["describe"]
        backends.append({**d, "name": spec, "available": not info["availability"],
                         "reason": info["availability"] or ""})
    if args.json:
        print(json.dumps({"target": target, "backends": backends}, indent=2))
        return EXIT_OK
    from tabulate import tabulate

    rows = [[k, v] for k, v in target.items() if k != "extra" and v not in ("", None, {})]
    rows += [[k, v] for k, v in (target.get("extra") or {}).items()]
    print(tabulate(rows, headers=["machine", ""], tablefmt="simple"))
    print()
    rows = [[b["name"], "yes" if b["available"] else "no", b.get("flavor", ""),
             b.get("version", ""), b["reason"]] for b in backends]
    print(tabulate(rows, headers=["backend", "available", "flavor", "version", "reason"],
                   tablefmt="simple"))
    return EXIT_OK


# ----------------------------------------------------------------------------------- report


def cmd_report(args) -> int:
    from harness.plot import PlotOutcome, write_plots
    from harness.records import read_many
    from harness.report import render

    records = read_many(args.results)
    baseline = read_many(args.baseline) if args.baseline else None
    if args.output:
        out = Path(args.output)
        plots = write_plots(records, out.parent)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(records, baseline=baseline, plots=plots), encoding="utf-8")
        written = ", ".join(name for _, name in plots.files)
        print(f"wrote {out}" + (f" and {written} next to it" if written else ""), file=sys.stderr)
    else:
        from harness.plot import sweeps

        plots = (PlotOutcome(skipped="plots are written only next to a report file (-o FILE.md)")
                 if sweeps(records) else write_plots(records, "."))  # nothing to draw: no file
        sys.stdout.write(render(records, baseline=baseline, plots=plots))
    return EXIT_OK


# ---------------------------------------------------------------------------------- compare


def cmd_compare(args) -> int:
    from harness.compare import Thresholds, compare, render_markdown
    from harness.records import read_many

    current = read_many(args.results)
    baseline = read_many(args.baseline)
    result = compare(current, baseline, Thresholds(slowdown=args.slowdown,
                                                    ratio_growth=args.ratio_growth))
    text = render_markdown(result) + "\n"
    sys.stdout.write(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
    return EXIT_FAILED if result.regressed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
