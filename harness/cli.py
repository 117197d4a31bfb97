"""The attn-harness command: run, info, report, compare, promote.

Exit status: 0 when nothing failed, 1 when something failed, crashed, timed out or passed
unexpectedly (compare: when something regressed), 2 for bad usage or bad input (one line on
stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

from harness import __version__, options
from harness.backends import known_backends, load_backend
from harness.case.regressions import promote
from harness.errors import HarnessError, UsageError
from harness.results import outdir, storage
from harness.results.compare import Thresholds, compare, render_markdown
from harness.results.plot import PlotOutcome, sweeps, write_plots
from harness.results.records import RecordWriter, read_many, read_records
from harness.results.report import render
from harness.run import warmup
from harness.run.devices import parse_devices, resolve_devices
from harness.run.machine import detect
from harness.run.progress import Console
from harness.run.session import (
    check_backend_versions,
    choose_backends,
    collect_cases,
    compiles_on_cpu,
    count_statuses,
    deliberate,
    explore_checks,
    failed,
    make_task,
    not_explored_note,
    open_run,
    prepare_out_dir,
    prepare_output_file,
    resume_records,
    shard_out_dir,
    take_share,
    validate_known_issues,
    validate_options,
    write_report,
)
from harness.run.worker import (
    ExplorationWorker,
    Warmers,
    Worker,
    WorkerDied,
    run_in_process,
    run_tasks,
    run_tasks_on_devices,
)
from harness.vocab import gradients

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def device_list(value: str):
    try:
        return parse_devices(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


RUN_HELP = ("results files, run folders, run numbers of reports/<target-id>/ (7, latest) or "
            "TARGET/7 for another machine's")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attn-harness", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"attn-harness {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run suites of cases on backends and write results + report",
                         description="Run suites of cases on backends; write DIR/results.jsonl "
                                     "and DIR/report.md.")
    # The run options shared with the pytest plugin (there: --attn-NAME), declared once.
    options.add_options(run.add_argument, prefix="")
    run.add_argument("--case", action="append", metavar="'{...}'",
                     help="one case as a TOML inline table, repeatable (what replay commands "
                          "use); no exploration then unless --explore says so (default: none)")
    run.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN",
                     help="go on with a run: keep its results.jsonl and run only what it lacks "
                          "(the latest run, or run number RUN, under reports/<target-id>/; "
                          "with --out, DIR); its records must come from this machine, seed, "
                          "profile and backend builds (default: a new run)")
    run.add_argument("--retry-crashed", action="store_true",
                     help="with --resume: run crash and timeout records again (default: keep "
                          "them)")
    run.add_argument("--devices", type=device_list, default=None, metavar="all|0,1,...",
                     help="GPUs to spread the cases over, one worker process each: 'all' or "
                          "indices as torch numbers them (default: one worker on the current "
                          "device)")
    run.add_argument("--no-isolation", action="store_true",
                     help="run kernels in this process: no crash or timeout protection, for "
                          "debugging (default: a worker process)")

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
    report.add_argument("results", nargs="*", metavar="RUN",
                        help=RUN_HELP + " (default: the latest run)")
    report.add_argument("--baseline", nargs="+", default=None, metavar="RUN",
                        help="results to compare against, named the same way: adds what "
                             "changed (default: none)")
    report.add_argument("-o", "--output", metavar="FILE.md",
                        help="write the report here, plots next to it (default: stdout, no "
                             "plots)")

    compare = sub.add_parser(
        "compare", help="what changed against a baseline; exit 1 when something regressed",
        description="Compare results with a baseline: status flips, error-ratio growth, "
                    "throughput moves beyond the measured spread (see harness/results/compare.py). "
                    "Prints markdown; exits 1 when anything regressed, 0 otherwise.")
    compare.add_argument("results", nargs="*", metavar="RUN",
                         help=RUN_HELP + " (default: the latest run)")
    compare.add_argument("--baseline", nargs="+", default=None, metavar="RUN",
                         help="the results to compare against, named the same way (default: "
                              "the latest earlier run of this machine that asked for the same "
                              "backends, suites, checks, profile and seed, else the run before)")
    compare.add_argument("--slowdown", type=options.parse_positive, default=0.10,
                         metavar="FRACTION",
                         help="relative change of a median time that may count, when the "
                              "interquartile ranges do not overlap (default: 0.10)")
    compare.add_argument("--ratio-growth", type=options.parse_positive, default=0.25,
                         metavar="FRACTION",
                         help="relative growth of err/baseline_err that counts, when it also "
                              "grows by more than 0.1 (default: 0.25)")
    compare.add_argument("--allow-missing", action="store_true",
                         help="baseline records with no counterpart (a case or backend dropped "
                              "on purpose) are not regressions (default: they are)")
    compare.add_argument("-o", "--output", metavar="FILE.md",
                         help="also write the markdown here (default: stdout only)")
    promote = sub.add_parser(
        "promote", help="copy regressions found by exploration into cases/regressions/",
        description="Copy minimal failing cases that exploration wrote into a run's "
                    "regressions/ folder into the project's cases/regressions/, which "
                    "--suite regressions runs.")
    promote.add_argument("files", nargs="+", metavar="FILE.toml|RUN",
                         help="regression files (RUN-FOLDER/regressions/*.toml), or a run "
                              "(number or latest) for all of its regressions")
    promote.add_argument("--to", type=Path, default=None, metavar="DIR",
                         help="where to copy them (default: ./cases/regressions)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return {"run": cmd_run, "info": cmd_info, "report": cmd_report,
                "compare": cmd_compare, "promote": cmd_promote}[args.command](args)
    except HarnessError as exc:
        sys.stderr.write(f"attn-harness {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("attn-harness: interrupted; records so far are kept "
                         "(attn-harness run --resume continues)\n")
        return 130
    except BrokenPipeError:  # `attn-harness info --json | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


# -------------------------------------------------------------------------------------- run


def run_options(args):
    """The run options of ``args`` as the session's :class:`~harness.run.session.RunOptions`."""
    return validate_options(options.option_values(lambda dest: getattr(args, dest), ""))


def cmd_run(args) -> int:
    args.out_lock = None  # the output folder's lock, taken by _out_dir
    try:
        return _cmd_run(args)
    finally:
        if args.out_lock is not None:
            args.out_lock.release()


def _cmd_run(args) -> int:
    opts = run_options(args)  # known issues and backend specs checked before anything starts
    cases, notes = collect_cases(opts, args.case or ())  # every case file validated here too
    notes = list(opts.notes) + notes
    if args.retry_crashed and not args.resume:
        raise UsageError("--retry-crashed goes with --resume")
    if args.no_isolation:
        if args.devices is not None:
            raise UsageError("--devices runs one worker process per GPU, --no-isolation runs in "
                             "this process: drop one of them")
        return _run_in_process(args, opts, cases)
    worker = Worker()
    try:
        target = worker.start()
        specs, more, resolved = choose_backends(worker, opts.backends, opts.timeout)
        notes += more
        args.device_indices = _devices(args.devices, target, notes)
    except WorkerDied as exc:
        worker.kill()
        raise UsageError(str(exc)) from None
    except BaseException:
        worker.kill()
        raise
    try:
        return _run(args, opts, cases, target, specs, resolved, notes, worker)
    except BaseException:
        worker.kill()
        raise


def _devices(spec, target: dict, notes: list[str]) -> list[int]:
    """The device indices of ``--devices`` on this machine; [] means one worker as usual."""
    if spec is None:
        return []
    devices = resolve_devices(spec, int(target.get("device_count") or 0), target["vendor"])
    if not devices:
        notes.append("--devices all: no GPU here, so one worker runs on the CPU")
    else:
        notes.append(f"--devices: one worker on each of device(s) {','.join(map(str, devices))}")
    return devices


def _out_dir(args, opts, target: dict) -> Path:
    """Where this run writes: ``--out`` exactly, else a new numbered run (or the one
    ``--resume`` names) under ``reports/<target-id>/``; a shard's own folder under it when
    sharded. The folder is locked for this run (``args.out_lock``) and refused where a link
    stands in place of a file the run writes (:mod:`harness.results.outdir`)."""
    run = open_run(opts, target, resume=getattr(args, "resume", None),
                   inline=getattr(args, "case", None) or ())
    path = prepare_out_dir(shard_out_dir(run, opts))
    args.out_lock = outdir.lock(path)
    outdir.refuse_links(path)
    return path


def _run(args, opts, cases, target, specs, resolved, notes, worker) -> int:
    from harness.results import jury

    share = take_share(cases, specs, opts)
    opts = share.options
    notes += share.notes
    out_dir = _out_dir(args, opts, target)
    results = out_dir / "results.jsonl"
    done = _resumed(args, opts, target, results,
                    {s: info["describe"] for s, info in resolved.items() if "describe" in info},
                    notes)
    jury_dir = jury.prepare(out_dir) if len(specs) > 1 else None
    tasks = _tasks(cases, specs, opts, share.keys, done, jury_dir=str(jury_dir or ""))
    devices = getattr(args, "device_indices", None)
    ahead = [] if devices else warmup.plans(
        tasks, {s: resolved[s] for s in specs if s in resolved}, target,
        _exploration_of(args, opts, compiles_on_cpu=True))
    for plan in ahead:
        what = "the suite's and the exploration's" if plan.exploration else "the suite's"
        notes.append(f"{plan.backend} compiles a graph per structure: a second process compiles "
                     f"{what} graphs ahead, at idle priority")
    print(f"attn-harness {__version__} on {target['target_id']} ({target['device_name']}): "
          f"{len(cases)} case(s) x {len(specs)} backend(s) [{', '.join(specs)}]"
          f"{f', shard {opts.shard}' if opts.shard is not None else ''}, "
          f"checks {','.join(opts.checks)}, profile {opts.profile}, seed {opts.seed}",
          file=sys.stderr)
    print(f"writing to {out_dir}", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if done:
        print(f"resuming: {len(done)} record(s) kept, {len(tasks)} task(s) to go", file=sys.stderr)
    start = time.perf_counter()
    console = Console(start=start)
    console.suite(tasks)
    progress = console.task
    with RecordWriter(results, append=bool(args.resume)) as writer, Warmers(ahead):
        if devices:
            run_tasks_on_devices(tasks, writer.write, devices=devices, timeout_s=opts.timeout,
                                 progress=progress, first_worker=worker)
            worker = None
        else:
            worker = run_tasks(tasks, writer.write, timeout_s=opts.timeout, progress=progress,
                               first_worker=worker, keep_worker=True).worker
        console.close()
        findings = _explore(args, opts, specs, writer.write, done, worker, out_dir=out_dir,
                            console=console, target=target)
    console.close()
    if jury_dir is not None:
        deliberate(jury_dir, out_dir, keep_previous=bool(args.resume))
    records = read_records(results)
    write_report(records, out_dir)
    for finding in findings:  # the failures again, at the end, where they are seen
        print(finding, file=sys.stderr)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(count_statuses(records).items()))
    print(f"done in {time.perf_counter() - start:.1f}s: {counts or 'no records'}; "
          f"wrote {results} and {out_dir / 'report.md'}", file=sys.stderr)
    return EXIT_FAILED if failed(records) else EXIT_OK


def _exploration_of(args, opts, *, compiles_on_cpu: bool = False) -> warmup.Exploration | None:
    """What the run's exploration of a backend draws from (None: it does not explore it;
    ``compiles_on_cpu``: see :meth:`harness.options.RunOptions.examples_for`)."""
    examples = opts.examples_for(inline=bool(args.case), compiles_on_cpu=compiles_on_cpu)
    checks = explore_checks(opts)
    if examples <= 0 or not checks:
        return None
    return warmup.Exploration(profile=opts.profile, examples=examples, seed=opts.seed,
                              backward=gradients(checks), shard=opts.shard)


def _tasks(cases, specs, opts, keys, done, *, jury_dir: str = "") -> list:
    """A task for each case and backend of this run's share (``keys``: ``(case_id, spec)``)
    with the checks not recorded yet (``done``: ``(spec, case_id, check)`` kept by
    ``--resume``); none where every check is recorded."""
    tasks = []
    for suite, case in cases:
        for spec in specs:
            if (case.case_id, spec) not in keys:
                continue
            remaining = tuple(c for c in opts.checks if (spec, case.case_id, c) not in done)
            if remaining:
                tasks.append(make_task(suite, case, spec, opts, checks=remaining,
                                       jury_dir=jury_dir))
    return tasks


def _resumed(args, opts, target: dict, results: Path, describe: dict[str, dict[str, str]],
             notes: list[str]) -> dict:
    """With ``--resume``: the records of ``results`` this run keeps, by ``(backend, case_id,
    check)`` (after checking they come from this machine, seed, profile and backend builds);
    without, none. The same in a worker process and in this one (``--no-isolation``)."""
    if not (args.resume and results.exists()):
        return {}
    done, more = resume_records(results, target, opts, retry_crashed=args.retry_crashed)
    notes += more
    check_backend_versions(read_records(results), describe, results)
    if args.retry_crashed:
        _drop_crashed(results)
    return {key: r for r in read_records(results)
            if (key := (r.backend_name, r.case_id, r.check)) in done}


def _drop_crashed(results: Path) -> None:
    """--retry-crashed: the crash and timeout records leave the file; their checks run again."""
    kept = [r for r in read_records(results) if r.status not in ("crash", "timeout")]
    results.write_text("".join(r.to_json() + "\n" for r in kept), encoding="utf-8")


def _explore(args, opts, specs, sink, done, worker=None, *, out_dir: Path,
             console=None, target: dict | None = None) -> list[str]:
    """Run the profile's exploration for every backend, printing each judged case and each
    backend's summary as it ends; returns the summaries of those that found a failure.

    ``worker``: the suite's worker, still running, which the exploration goes on in (and
    stops)."""
    checks = explore_checks(opts)
    examples = opts.examples_for(inline=bool(args.case))
    if examples <= 0 or not checks:
        if worker is not None:
            worker.stop()
        return []
    from hypothesis.configuration import set_hypothesis_home_dir

    from harness.run.explore import explore, summary

    # Everything hypothesis keeps (its example database, the constants it caches) goes under
    # the run's folder, not into whatever folder the user runs from.
    set_hypothesis_home_dir(str(out_dir / ".hypothesis"))
    summaries = []
    with ExplorationWorker(opts.timeout, worker=worker) as runner:
        resolved = runner.resolve(specs)
        for spec in specs:
            info = resolved[spec]
            if "error" in info or info["availability"]:
                continue
            mine = opts.examples_for(inline=bool(args.case),
                                     compiles_on_cpu=compiles_on_cpu(info, target or {}))
            if mine <= 0:
                print(f"note: {not_explored_note(spec)}", file=sys.stderr)
                continue
            part = (f" (shard {opts.shard}: its part of {mine * opts.shard.count})"
                    if opts.shard is not None else "")
            budget = (f" (free draws for {opts.explore_budget_s:g} s at most)"
                      if opts.explore_budget_s is not None else "")
            print(f"exploring {spec}: up to {mine} generated case(s){part}{budget}, checks "
                  f"{','.join(checks)}, seed {opts.seed}", file=sys.stderr)

            def run_case(case, spec=spec):
                task = make_task("explore", case, spec, opts, checks=checks)
                return runner.run(task, lambda record: None, done)

            def record(r, spec=spec):
                # A resumed run sees its earlier records again (so the failure it found before
                # an interruption is found again and shrunk); they are in the file already.
                if (spec, r.case_id, r.check) not in done:
                    sink(r)

            def on_case(phase, case, records, step, spec=spec):
                if console is not None:
                    console.explored(spec, phase, case, records, step)

            if console is not None:
                console.exploring(spec, mine)
            # Only generated cases and the minimal failure are recorded, not each shrink step.
            result = explore(spec, info["capabilities"], run_case, profile=opts.profile,
                             examples=mine, seed=opts.seed, on_record=record,
                             regressions=opts.regressions or out_dir / "regressions",
                             database_dir=out_dir / ".hypothesis", backward=gradients(checks),
                             on_case=on_case, shard=opts.shard,
                             budget_s=opts.explore_budget_s)
            if console is not None:
                console.close()
            text = summary(result)
            print(text, file=sys.stderr, flush=True)  # now, not held back to the very end
            if result.minimal is not None:
                summaries.append(text)
    return summaries


def _run_in_process(args, opts, cases) -> int:
    target = detect().to_dict()
    for spec in opts.backends:  # a spec that does not load is bad usage, before any output
        load_backend(spec)
    specs = list(opts.backends) or [s for s in known_backends()
                                    if not load_backend(s).availability()]
    share = take_share(cases, specs, opts)
    opts = share.options
    out_dir = _out_dir(args, opts, target)
    results = out_dir / "results.jsonl"
    notes: list[str] = list(share.notes)
    done = _resumed(args, opts, target, results,
                    {s: load_backend(s).describe() for s in specs}, notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    tasks = _tasks(cases, specs, opts, share.keys, done)
    if done:
        print(f"resuming: {len(done)} record(s) kept, {len(tasks)} task(s) to go", file=sys.stderr)
    with RecordWriter(results, append=bool(args.resume)) as writer:
        run_in_process(tasks, writer.write)
    records = read_records(results)
    write_report(records, out_dir)
    print(f"wrote {results} and {out_dir / 'report.md'}", file=sys.stderr)
    return EXIT_FAILED if failed(records) else EXIT_OK


# ------------------------------------------------------------------------------------- info


def cmd_info(args) -> int:
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
                         "reason": info["availability"] or "",
                         "compiles_per_structure": bool(info.get("compiles_per_structure"))})
    if args.json:
        print(json.dumps({"target": target, "backends": backends}, indent=2))
        return EXIT_OK
    rows = [[k, v] for k, v in target.items()
            if k not in ("extra", "libraries") and v not in ("", None, {})]
    rows += [[k, v] for k, v in (target.get("libraries") or {}).items()]
    rows += [[k, v] for k, v in (target.get("extra") or {}).items()]
    print(tabulate(rows, headers=["machine", ""], tablefmt="simple"))
    print()
    rows = [[b["name"], "yes" if b["available"] else "no", b.get("flavor", ""),
             b.get("version", ""), b["reason"]] for b in backends]
    print(tabulate(rows, headers=["backend", "available", "flavor", "version", "reason"],
                   tablefmt="simple"))
    return EXIT_OK


# ----------------------------------------------------------------------------------- report


def _resolve(refs, what: str):
    """RUN arguments (:func:`harness.results.storage.resolve_many`) as runs and files; says on
    stderr which runs were taken."""
    found, files, notes = storage.resolve_many(refs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    named = [run.describe() for run in found if run is not None]
    if named and not refs and what == "report":
        print(f"{what}: {', '.join(named)}", file=sys.stderr)
    return found, files


def cmd_report(args) -> int:
    _, files = _resolve(args.results, "report")
    base_files = _resolve(args.baseline, "baseline")[1] if args.baseline else []
    records = read_many(files, require_records=True)
    baseline = read_many(base_files, require_records=True) if args.baseline else None
    known = validate_known_issues() or None
    if args.output:
        out = prepare_output_file(Path(args.output), inputs=[*files, *base_files])
        try:
            plots = write_plots(records, out.parent)
        except OSError as exc:  # a full disk
            raise UsageError(f"cannot write the plots next to {out} ({exc.strerror or exc}); "
                             "the results files are unchanged") from None
        _write_text(out, render(records, baseline=baseline, plots=plots, known_issues=known))
        written = ", ".join(name for _, name in plots.files)
        print(f"wrote {out}" + (f" and {written} next to it" if written else ""), file=sys.stderr)
    else:
        plots = (PlotOutcome(skipped="plots are written only next to a report file (-o FILE.md)")
                 if sweeps(records) else write_plots(records, "."))  # nothing to draw: no file
        sys.stdout.write(render(records, baseline=baseline, plots=plots, known_issues=known))
    return EXIT_OK


# ---------------------------------------------------------------------------------- compare


def cmd_compare(args) -> int:
    runs, files = _resolve(args.results, "compare")
    if args.baseline:
        base_files = _resolve(args.baseline, "baseline")[1]
    else:
        if len(runs) != 1 or runs[0] is None:
            raise UsageError("compare: give --baseline RUN (without it, the current results "
                             "must be one numbered run, compared with the run before it)")
        base, why = storage.previous(runs[0])
        print(f"compare: {runs[0].describe()} against {base.describe()}: {why}",
              file=sys.stderr)
        base_files = base.results()
    output = (prepare_output_file(Path(args.output), inputs=[*files, *base_files])
              if args.output else None)
    current = read_many(files, require_records=True)
    baseline = read_many(base_files, require_records=True)
    result = compare(current, baseline, Thresholds(slowdown=args.slowdown,
                                                    ratio_growth=args.ratio_growth),
                     allow_missing=args.allow_missing)
    text = render_markdown(result) + "\n"
    sys.stdout.write(text)
    if output is not None:
        _write_text(output, text)
    return EXIT_FAILED if result.regressed else EXIT_OK


# ---------------------------------------------------------------------------------- promote


def cmd_promote(args) -> int:
    files: list[Path] = []
    for ref in args.files:
        if (ref == storage.LATEST or ref.isdigit()) and not Path(ref).exists():
            directory, _ = storage.default_machine()
            run = storage.find_run(directory, ref)
            found = sorted((run.path / "regressions").glob("*.toml"))
            if not found:
                raise UsageError(f"promote {ref}: {run.describe()} found no regression")
            files.extend(found)
        else:
            files.append(Path(ref))
    for target, what in promote(files, args.to):
        print(f"{what}: {target}", file=sys.stderr)
    print("attn-harness run --suite regressions runs them", file=sys.stderr)
    return EXIT_OK


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}; the results files it was "
                         "rendered from are unchanged") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
