"""Compile time apart from run time: each case's first call against its steady calls.

JIT-compiled kernels pay for compilation in the first call of each specialisation:
FlashAttention-4's CuTe DSL kernels compile per (dtype, head dims, mask, ...) on first use, about
8 s each, and cache them on disk with ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``
(``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR`` chooses where; flash_attn/cute/cache_utils.py);
FlashInfer builds its JIT modules; flex-attention runs torch.compile. The harness's own timing
warms up before it measures, so its throughput is the run time; this tool records what the
warm-up cost. For each case of a suite it builds the inputs, times the backend's first forward
call (synchronised), then ``--repeats`` more, and reports the first call, the median of the
rest and their difference, the compile (or cache-load) time:

    python -m harness.run.firstcall --backend flash-attn4 --suite smoke --json out.json

An unavailable backend is reported, not an error (exit 0): a machine without the package or a
GPU says so. Exit 2 for bad usage. It runs in-process: a kernel that aborts ends it, so run it
under a time limit (``.ci/gpu-check`` does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from harness.backends import load_backend
from harness.case.suites import load_suite
from harness.errors import HarnessError
from harness.target import detect


def time_case(backend, case, device, repeats: int) -> dict[str, Any]:
    """``{"case", "first_s", "run_s", "compile_s"}`` for one case: the first forward call's wall
    time, the median of ``repeats`` later ones, and the first minus that median (>= 0)."""
    import torch

    from harness.exact.fp8 import is_fp8_case, make_fp8_inputs
    from harness.exact.inputs import make_inputs

    inputs = (make_fp8_inputs if is_fp8_case(case) else make_inputs)(case, device)

    def call() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            backend.forward(inputs.clone())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = call()
    steady = statistics.median(call() for _ in range(max(1, repeats)))
    return {"case": case.label, "case_id": case.case_id, "first_s": first, "run_s": steady,
            "compile_s": max(0.0, first - steady)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness.run.firstcall",
        description="Time each case's first forward call (compilation of JIT kernels included) "
                    "apart from its steady calls.")
    parser.add_argument("--backend", required=True, metavar="NAME|FAMILY@MODULE",
                        help="the backend to time (e.g. flash-attn4)")
    parser.add_argument("--suite", default="smoke", metavar="NAME|FILE.toml",
                        help="the cases (default: smoke)")
    parser.add_argument("--limit", type=int, default=0, metavar="N",
                        help="time at most N cases the backend claims (default: 0, all)")
    parser.add_argument("--repeats", type=int, default=3, metavar="N",
                        help="steady calls after the first, whose median is the run time "
                             "(default: 3)")
    parser.add_argument("--json", default="", metavar="FILE",
                        help="also write the results as JSON (default: none)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    try:
        backend = load_backend(args.backend)
        cases = [c for suite in load_suite(args.suite) for c in suite.cases]
    except HarnessError as exc:
        print(f"python -m harness.run.firstcall: error: {exc}", file=sys.stderr)
        return 2
    target = detect()
    result: dict[str, Any] = {"backend": backend.describe(), "target": target.target_id,
                              "suite": args.suite, "cases": [], "skipped": ""}
    unavailable = backend.availability()
    if unavailable:
        result["skipped"] = f"{backend.name} is unavailable here: {unavailable}"
        print(f"not timed: {result['skipped']}")
    else:
        device = torch.device(target.device_type)
        claimed = [c for c in cases if not backend.unsupported_reasons(c, target)]
        for case in claimed[: args.limit or None]:
            try:
                row = time_case(backend, case, device, args.repeats)
            except Exception as exc:  # noqa: BLE001 - a refusing kernel is a note, not a crash
                first = (str(exc).strip().splitlines() or [""])[0]
                row = {"case": case.label, "case_id": case.case_id,
                       "error": f"{type(exc).__name__}: {first}"[:300]}
            result["cases"].append(row)
            print(_line(row), flush=True)
        timed = [r for r in result["cases"] if "compile_s" in r]
        result["compile_s"] = sum(r["compile_s"] for r in timed)
        result["run_s"] = sum(r["run_s"] for r in timed)
        print(f"{backend.name} on {target.target_id}: {len(timed)} case(s) timed, compile "
              f"{result['compile_s']:.1f} s in all, steady calls {result['run_s'] * 1e3:.1f} ms "
              "in all")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  {row['case']}: {row['error']}"
    return (f"  {row['case']}: first {row['first_s']:.3f} s, then {row['run_s'] * 1e3:.3f} ms, "
            f"compile {row['compile_s']:.3f} s")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
