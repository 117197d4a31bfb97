"""Rendering records as a markdown report (GitHub tables via tabulate).

Pure functions of records: the same records always render the same report, and every count in
it is a count of records.
"""

from __future__ import annotations

import shlex
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from tabulate import tabulate

from harness.case import Case, case_from_dict
from harness.records import FAILING, STATUSES, Record

CHECK_ORDER = ("fwd", "bwd", "determinism", "throughput")


def replay_command(record: Record) -> str:
    """The one command that replays a record's check on any machine."""
    case = case_from_dict(record.case)
    return " ".join([
        "attn-harness run",
        f"--backend {shlex.quote(record.backend_name)}",
        f"--checks {record.check}",
        f"--seed {record.seed}",
        f"--case {shlex.quote(case.to_inline_toml())}",
    ])


def case_of(record: Record) -> Case:
    return case_from_dict(record.case)


def _table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}"


def machines_section(records: Sequence[Record]) -> str:
    targets: dict[str, dict] = {}
    for r in records:
        targets.setdefault(r.target_id, r.target)
    rows = []
    for tid, t in sorted(targets.items()):
        flash = t.get("flash_attn") and f"{t.get('flash_attn')} ({t.get('flash_attn_flavor')})"
        rows.append([f"`{tid}`", t.get("device_name", ""), t.get("arch", ""), t.get("runtime", ""),
                     t.get("driver", "") or "–", t.get("torch", ""), t.get("triton", "") or "–",
                     flash or "–", _fmt(t.get("peak_tflops"), 4),
                     f"{t.get('harness', '')} {t.get('git_revision', '')}".strip()])
    return "## Machines\n\n" + _table(rows, ["target", "device", "arch", "runtime", "driver",
                                              "torch", "triton", "flash-attn", "peak TFLOP/s",
                                              "harness"])


def summary_section(records: Sequence[Record]) -> str:
    groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in records:
        groups[(r.target_id, r.backend_name)][r.status] += 1
    used = [s for s in STATUSES if any(c[s] for c in groups.values())]
    rows = []
    for (tid, backend), counts in sorted(groups.items()):
        verdict = "FAIL" if any(counts[s] for s in FAILING) else "ok"
        rows.append([f"`{tid}`", f"`{backend}`", verdict, *[counts[s] or "" for s in used],
                     sum(counts.values())])
    total = Counter(r.status for r in records)
    rows.append(["**all**", "", "", *[f"**{total[s]}**" if total[s] else "" for s in used],
                 f"**{len(records)}**"])
    return "## Verdicts\n\n" + _table(rows, ["target", "backend", "verdict", *used, "records"])


def checks_section(records: Sequence[Record]) -> str:
    """Per backend and check: statuses and the worst error ratio to the baseline."""
    groups: dict[tuple[str, str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.target_id, r.backend_name, r.check)].append(r)
    rows = []
    for (tid, backend, check), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], CHECK_ORDER.index(kv[0][2]))):
        counts = Counter(r.status for r in rs)
        ratios = [r.metrics.get("ratio") for r in rs if r.metrics.get("ratio") is not None]
        status = ", ".join(f"{n} {s}" for s, n in counts.most_common())
        rows.append([f"`{tid}`", f"`{backend}`", check, status,
                     _fmt(max(ratios)) if ratios else "–"])
    return ("## Checks\n\nThe ratio is `max|kernel - reference| / max|baseline - reference|` "
            "(worst case); the rule allows 2 for outputs and 3 for gradients, plus a small atol.\n\n"
            + _table(rows, ["target", "backend", "check", "records", "worst ratio"]))


def failures_section(records: Sequence[Record]) -> str:
    failing = [r for r in records if r.status in FAILING]
    if not failing:
        return "## Failures\n\nNone."
    parts = [f"## Failures\n\n{len(failing)} record(s) failed, crashed, timed out or passed "
             "unexpectedly. Each comes with its case and the command that replays it."]
    for i, r in enumerate(failing, 1):
        case = case_of(r)
        parts.append(
            f"### {i}. `{r.backend_name}` {r.check} {r.status.upper()} on `{r.target_id}`: "
            f"{case.label}\n\n"
            f"{r.reason or 'no reason recorded'}\n\n"
            f"```toml\n# case_id {r.case_id}, suite {r.suite or '–'}, seed {r.seed}\n"
            f"{case.to_toml()}```\n\n"
            f"```sh\n{replay_command(r)}\n```")
    return "\n\n".join(parts)


def throughput_section(records: Sequence[Record]) -> str:
    rows = []
    for r in records:
        if r.check != "throughput" or r.status != "pass":
            continue
        m = r.metrics
        bwd = m.get("bwd") or {}
        rows.append([f"`{r.target_id}`", f"`{r.backend_name}`", case_of(r).label,
                     _fmt(m.get("time_ms")), _fmt(m.get("timing_iqr_ms"), 2), _fmt(m.get("tflops")),
                     _fmt(m.get("pct_peak"), 3), _fmt(bwd.get("time_ms")), _fmt(bwd.get("tflops"))])
    if not rows:
        return "## Throughput\n\nNo throughput was measured."
    return ("## Throughput\n\nMedian of repeated timed calls after a warm-up (device events and an "
            "L2 flush on GPUs, `perf_counter` on CPUs); IQR is the interquartile range. FLOPs as in "
            "flash-attn's benchmark: 4·batch·heads·head_dim·(visible query-key pairs), "
            "backward 2.5x.\n\n"
            + _table(rows, ["target", "backend", "case", "fwd ms", "IQR ms", "fwd TFLOP/s",
                            "% peak", "bwd ms", "bwd TFLOP/s"]))


def skips_section(records: Sequence[Record]) -> str:
    reasons: Counter = Counter()
    for r in records:
        if r.status == "skip":
            reasons[(r.backend_name, r.reason)] += 1
    if not reasons:
        return "## Skipped\n\nNothing was skipped."
    rows = [[f"`{b}`", n, reason] for (b, reason), n in sorted(reasons.items(),
                                                               key=lambda kv: (kv[0][0], -kv[1]))]
    return "## Skipped\n\nEvery skip carries its reason.\n\n" + _table(rows, ["backend", "records",
                                                                             "reason"])


def inert_section(records: Sequence[Record]) -> str:
    rows = []
    for r in records:
        inert = r.metrics.get("inert_features") if r.check == "fwd" else None
        if inert:
            rows.append([r.case_id, case_of(r).label, ", ".join(inert)])
    if not rows:
        return ""
    unique = [list(x) for x in dict.fromkeys(tuple(row) for row in rows)]
    return ("## Cases that test less than they claim\n\nThese features change the reference by no "
            "more than the tolerance, so a kernel ignoring them would still pass.\n\n"
            + _table(unique, ["case_id", "case", "inert features"]))


def render(records: Iterable[Record], *, title: str = "attn-harness report",
           extra_sections: Sequence[str] = ()) -> str:
    """The whole report as markdown."""
    records = list(records)
    if not records:
        return f"# {title}\n\nNo records.\n"
    sections = [
        f"# {title}",
        f"{len(records)} records from {len({r.target_id for r in records})} machine(s), "
        f"{len({r.backend_name for r in records})} backend(s), {len({r.case_id for r in records})} "
        f"case(s).",
        machines_section(records),
        summary_section(records),
        checks_section(records),
        failures_section(records),
        throughput_section(records),
        *extra_sections,
        inert_section(records),
        skips_section(records),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"
