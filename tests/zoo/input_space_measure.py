"""Measurements for issue 12's input space: vacuous draws and the input-space zoo's catch rate.

A benchmark, not a test (pytest does not collect it). Run from the repository root:

    .venv/bin/python -m tests.zoo.input_space_measure vacuous --cases 200
    .venv/bin/python -m tests.zoo.input_space_measure catch --examples 20
    .venv/bin/python -m tests.zoo.input_space_measure false-positives --examples 300

``vacuous`` draws quick-profile cases for the zoo's ``correct`` kernel with the strategies of the
last commit (``git show HEAD:harness/strategies.py``, "before") and of the working tree
("after"), and counts the cases in which every enabled feature is effective: its removal changes
the exact reference output by more than the parity rule's tolerance (the feature-effect logic of
``harness.checks.parity.feature_effects``) for causal, window, softcap, alibi and scale; the
static rule of ``harness.run.strategies.vacuous_features`` for the strided layouts.

``catch`` and ``false-positives`` explore in this process (``harness.run.worker.execute`` per case,
checks fwd, bwd, determinism, seed 0, the quick profile's strategies) with the sound yardstick
of ``harness.exact.judge.sound_baseline`` patched into the checks' yardstick: a stand-in until
``harness/checks.py`` wires it in (see the closing report of issue 12).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from harness.backends import load_backend
from harness.case import Case
from harness.exact import judge, reference
from harness.exact.inputs import make_inputs

CHECKS = ("fwd", "bwd", "determinism")


def _strategies(before: bool, revision: str = "HEAD"):
    if not before:
        import harness.run.strategies as module

        return module
    text = subprocess.run(["git", "show", f"{revision}:harness/strategies.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "strategies_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("strategies_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["strategies_before"] = module
    spec.loader.exec_module(module)
    return module


def draw_cases(module, caps, n: int, seed: int = 0) -> list[Case]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    drawn: list[Case] = []

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(module.cases(caps, module.BUDGETS["quick"]))
    def body(case):
        drawn.append(case)

    body()
    return drawn


def effective(case: Case) -> tuple[bool, list[str]]:
    """Whether every feature the case turns on changes its output; the ones that do not."""
    from harness.checks import parity
    from harness.checks.context import CheckContext
    from harness.run.strategies import vacuous_features

    inputs = make_inputs(case)
    ref = reference.reference(inputs)
    base = reference.baseline(inputs)
    ctx = SimpleNamespace(case=case, inputs=inputs, exact_inputs=inputs, reference=ref)
    ctx.feature_variants = CheckContext.feature_variants.func(ctx)
    effects = parity.feature_effects(ctx)
    allowed = judge.compare("out", base.out, base.out, ref.out, k=judge.K_OUT,
                            atol=judge.ATOL[inputs.q.dtype]).allowed
    inert = judge.inert_features(effects, allowed)
    inert += [f for f in vacuous_features(case) if f in ("strided", "v-transposed",
                                                          "dout-strided")]
    return not inert, inert


def vacuous(args) -> int:
    caps = load_backend("tests/zoo/kernels.py:correct").capabilities
    runs = (("before", True), ("after", False))
    for label, before in [r for r in runs if args.only in ("", r[0])]:
        cases = draw_cases(_strategies(before, args.before), caps, args.cases, args.seed)
        start = time.perf_counter()
        ok, counts = 0, {}
        with_features = 0
        for n, case in enumerate(cases, 1):
            if n % 25 == 0:
                print(f"  {label}: {ok} of {n - 1} so far", flush=True)
            good, inert = effective(case)
            ok += good
            with_features += bool(case.features & {"causal", "window", "softcap", "alibi",
                                                   "scale", "strided", "v-transposed",
                                                   "dout-strided"})
            for f in inert:
                counts[f] = counts.get(f, 0) + 1
            if inert and args.verbose:
                print(f"    inert {inert}: {case.label}", flush=True)
        print(f"{label}: {ok} of {len(cases)} generated cases ({100 * ok / len(cases):.0f}%) "
              f"have every enabled feature effective; {with_features} enable a judged feature; "
              f"vacuous by feature: {counts} ({time.perf_counter() - start:.0f}s)", flush=True)
    return 0


def patch_yardstick() -> None:
    """Wrap the checks' yardstick with :func:`harness.exact.judge.sound_baseline`."""
    from harness.checks import context as checks

    owner = next((c for c in vars(checks).values()
                  if isinstance(c, type) and hasattr(c, "yardstick")), None)
    if owner is None:  # pragma: no cover - depends on the lead's checks.py
        print("checks.py has no yardstick method: not patched", file=sys.stderr)
        return
    original = owner.yardstick

    def yardstick(self, ref, plain, *args, grads=False, rows=None, **kwargs):
        chosen = original(self, ref, plain, *args, grads=grads, rows=rows, **kwargs)
        if self.inputs.q.dtype == torch.float32 or not judge.overflowed(chosen, ref):
            return chosen
        widened = reference.baseline(self.inputs, grads=grads, rows=rows, widened=True)
        blockwise = reference.reference(self.inputs, dtype=torch.float32, grads=grads,
                                        rows=rows)
        return judge.sound_baseline(ref, chosen, widened, blockwise)[0]

    owner.yardstick = yardstick


def explore_in_process(spec: str, examples: int, seed: int, *, without: tuple[str, ...] = (),
                       shrink: bool = True):
    """Explore ``spec`` in this process. ``without``: features not drawn (to keep a failure
    elsewhere from masking the one measured); ``shrink=False``: stop at the first failure."""
    import dataclasses

    from harness.run import explore as explore_module
    from harness.run.worker import Task, execute
    from harness.target import detect

    target, backends = detect(), {}
    caps = load_backend(spec).capabilities
    caps = dataclasses.replace(caps, features=caps.features - set(without))
    if not shrink:
        from hypothesis import Phase

        original = explore_module.settings_for

        def settings_for(profile, examples=None):
            return original(profile, examples).__class__(
                original(profile, examples), phases=(Phase.generate,), database=None)

        explore_module.settings_for = settings_for
    explore = explore_module.explore

    def run_case(case):
        records = []
        for kind, record in execute(Task("explore", case, spec, CHECKS, seed, profile="quick"),
                                    target, backends):
            if kind == "record":
                records.append(record)
        return records

    start = time.perf_counter()
    result = explore(spec, caps, run_case, profile="quick", examples=examples, seed=seed)
    return result, time.perf_counter() - start


def catch(args) -> int:
    from tests.zoo.input_space_kernels import ZOO_INPUT_SPACE

    patch_yardstick()
    firsts = []
    names = args.kernels.split(",") if args.kernels else sorted(ZOO_INPUT_SPACE)
    for name in names:
        result, wall = explore_in_process(f"tests/zoo/input_space_kernels.py:{name}",
                                          args.examples, args.seed, without=args.without,
                                          shrink=not args.no_shrink)
        caught = result.minimal is not None
        checks = ",".join(sorted({r.check for r in result.failing})) or "-"
        if caught:
            firsts.append(result.seconds_to_first_failure)
            print(f"| {name} | yes | {result.seconds_to_first_failure:.1f} | "
                  f"{result.shrink_steps} | {checks} | `{result.minimal.label}` | {wall:.0f}s |",
                  flush=True)
        else:
            print(f"| {name} | NO | - | - | - | - | {wall:.0f}s |", flush=True)
    median = f"{statistics.median(firsts):.1f}s" if firsts else "-"
    print(f"caught {len(firsts)} of {len(names)}; median time to first failure {median}")
    return 0 if len(firsts) == len(names) else 1


def false_positives(args) -> int:
    from harness.results.records import FAILING

    patch_yardstick()
    result, wall = explore_in_process(args.backend, args.examples, args.seed)
    statuses: dict[str, int] = {}
    for r in result.records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    failing = [r for r in result.records if r.status in FAILING]
    print(f"{args.backend}: {result.examples} generated cases in {wall:.0f}s; records "
          f"{statuses}; flagged: {len(failing)}")
    for r in failing[:10]:
        print(f"  {r.check} {r.status} {Case(**r.case).label if isinstance(r.case, dict) else ''}"
              f": {r.reason[:300]}")
    return 1 if failing else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("vacuous", "catch", "false-positives"))
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--backend", default="tests/zoo/kernels.py:correct")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="vacuous: list inert cases")
    parser.add_argument("--before", default="HEAD", metavar="REV",
                        help="vacuous: the revision whose strategies are 'before' (default HEAD)")
    parser.add_argument("--only", choices=("", "before", "after"), default="",
                        help="vacuous: measure one of the two strategies only")
    parser.add_argument("--kernels", default="", help="catch: comma-separated zoo kernels")
    parser.add_argument("--without", type=lambda s: tuple(s.split(",")), default=(),
                        help="catch: features not drawn, comma-separated")
    parser.add_argument("--no-shrink", action="store_true",
                        help="catch: stop at the first failure (no shrinking)")
    args = parser.parse_args(argv)
    return {"vacuous": vacuous, "catch": catch, "false-positives": false_positives}[
        args.what](args)


if __name__ == "__main__":
    sys.exit(main())
