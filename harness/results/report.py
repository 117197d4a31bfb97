"""Rendering records as one markdown report (GitHub tables via tabulate), across machines.

Pure functions of records: the same records always render the same report, and every count in it
is a count of records. Records from any number of files and machines are merged first
(:func:`harness.results.records.merge_records`: a later record of the same check, case, backend and
setup replaces an earlier one, and the report says how many were replaced). A *setup* is a
machine with its software (:func:`harness.results.records.setup_labels`): flash-attn's CK and Triton
builds on one MI300X are two setups of one target.

Sections: machines; verdicts per setup and backend; checks; the portability matrix (case x
setup and backend); failures with their case and replay command; coverage (features exercised,
skips and why); throughput side by side with the AMD/NVIDIA ratio; plots; changes against a
baseline; cases that test less than they claim.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from harness.case import Case
from harness.case.known_issues import section
from harness.escape import fence, md
from harness.results.compare import compare, render_markdown
from harness.results.records import (
    FAILING,
    STATUSES,
    Record,
    backend_label,
    case_of,
    finite_or_none,
    merge_records,
    replay_command,
    setup_fingerprint,
    setup_labels,
)
from harness.results.units import rate as rate_text
from harness.shard import shard_runs
from harness.vocab import CHECK_NAMES, JUDGED, SEVERITY, TIMED

if TYPE_CHECKING:
    from harness.results.plot import PlotOutcome

CHECK_ORDER = CHECK_NAMES


def _table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}"


def _cell(text: object) -> str:
    """Text from records (or any other text not the harness's own), safe inside a markdown
    table cell and in prose (:func:`harness.escape.md`)."""
    return md(text)


def _code(text: object) -> str:
    """Such text as an inline code span (setups, backends)."""
    return md(text, code=True)


# ------------------------------------------------------------------------------ the view


@dataclass(frozen=True)
class View:
    """Merged records and the names the report uses for setups and backends."""

    records: tuple[Record, ...]
    superseded: int
    labels: dict[tuple[str, ...], str]

    @classmethod
    def of(cls, records: Iterable[Record]) -> View:
        kept, superseded = merge_records(records)
        return cls(tuple(kept), superseded, setup_labels(r.target for r in kept))

    def setup(self, r: Record) -> str:
        return self.labels[setup_fingerprint(r.target)]

    def column(self, r: Record) -> tuple[str, str]:
        """(setup, backend) where backend carries its flavor: ``flash-attn [rocm-ck]``."""
        return self.setup(r), backend_label(r)

    def setups(self) -> list[tuple[str, dict[str, Any]]]:
        seen: dict[str, dict[str, Any]] = {}
        for r in self.records:
            seen.setdefault(self.setup(r), r.target)
        return sorted(seen.items())


def _col(column: tuple[str, str]) -> str:
    return f"{_code(column[0])} {_code(column[1])}"


# -------------------------------------------------------------------------------- sections


def header_section(view: View, title: str) -> str:
    rs = view.records
    text = (f"# {title}\n\n{len(rs)} records from {len({r.target_id for r in rs})} machine(s) "
            f"({len(view.setups())} setup(s)), {len({r.backend_name for r in rs})} backend(s), "
            f"{len({r.case_id for r in rs})} case(s).")
    if view.superseded:
        text += (f" {view.superseded} earlier record(s) of the same check, case, backend and "
                 "setup were replaced by later ones and are not counted.")
    shards = shards_text(view)
    if shards:
        text += "\n\n" + shards
    synthetic = [label for label, t in view.setups() if _synthetic(t)]
    if synthetic:
        text += ("\n\n**Synthetic data**: the results of "
                 + ", ".join(_code(s) for s in synthetic)
                 + " are made-up fixtures, not measurements.")
    return text


def shards_text(view: View) -> str:
    """One line per sharded run and setup: which shards are present, and any missing, stopped
    early or doubled (``harness.shard.shard_runs``); shards of one setup share its columns."""
    lines = []
    for run in shard_runs(view.records, view.setup):
        line = f"Run `{run.run_id or 'without id'}` on `{run.setup}`: {run.line()}."
        lines.append(line if run.complete else f"**{line}**")
    return "\n".join(f"- {line}" for line in lines)


def _synthetic(target: dict[str, Any]) -> bool:
    extra = target.get("extra") or {}
    return str(extra.get("synthetic", "")).lower() in ("true", "1", "yes")


def machines_section(view: View) -> str:
    rows = []
    for label, t in view.setups():
        flash = libraries_text(t)
        note = "SYNTHETIC" if _synthetic(t) else ""
        rows.append([_code(label), _cell(t.get("device_name", "")), _cell(t.get("arch", "")),
                     _cell(t.get("runtime", "")), _cell(t.get("driver", "") or "–"),
                     _cell(t.get("torch", "")), _cell(t.get("triton", "") or "–"),
                     _cell(flash or "–"), _fmt(t.get("peak_tflops"), 4),
                     _cell(f"{t.get('harness', '')} {t.get('git_revision', '')}".strip()), note])
    return "## Machines\n\n" + _table(rows, ["setup", "device", "arch", "runtime", "driver",
                                              "torch", "triton", "libraries", "peak TFLOP/s",
                                              "harness", "note"])


def libraries_text(target: dict[str, Any]) -> str:
    """What the backend families reported about their libraries (``Target.libraries``), or the
    flash-attn fields of records written before that field existed."""
    libraries = dict(target.get("libraries") or {})
    for key in ("flash_attn", "flash_attn_flavor", "sdpa_rocm_library"):
        if target.get(key):
            libraries.setdefault(key, target[key])
    return ", ".join(f"{k} {v}" for k, v in sorted(libraries.items()))


def summary_section(view: View) -> str:
    groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in view.records:
        groups[view.column(r)][r.status] += 1
    used = [s for s in STATUSES if any(c[s] for c in groups.values())]
    known: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in view.records:
        if r.status == "xfail":
            known[view.column(r)].add(known_issue_id(r))
    rows = []
    for column, counts in sorted(groups.items()):
        verdict = "FAIL" if any(counts[s] for s in FAILING) else "ok"
        if known[column]:
            n = len(known[column])
            verdict += f" ({n} known issue{'s' if n > 1 else ''})"
        rows.append([_code(column[0]), _code(column[1]), verdict,
                     *[counts[s] or "" for s in used], sum(counts.values())])
    total = Counter(r.status for r in view.records)
    rows.append(["**all**", "", "", *[f"**{total[s]}**" if total[s] else "" for s in used],
                 f"**{len(view.records)}**"])
    return "## Verdicts\n\n" + _table(rows, ["setup", "backend", "verdict", *used, "records"])


def checks_section(view: View) -> str:
    """Per setup, backend and check: statuses and the worst error ratio to the baseline."""
    groups: dict[tuple[str, str, str], list[Record]] = defaultdict(list)
    for r in view.records:
        groups[(*view.column(r), r.check)].append(r)
    rows = []
    for (setup, backend, check), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], CHECK_ORDER.index(kv[0][2]))):
        counts = Counter(r.status for r in rs)
        ratios = [x for x in (finite_or_none(r.metrics.get("ratio")) for r in rs) if x is not None]
        status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(),
                                                         key=lambda kv: (-kv[1], kv[0])))
        rows.append([_code(setup), _code(backend), check, status,
                     _fmt(max(ratios)) if ratios else "–"])
    return ("## Checks\n\nThe ratio is `max|kernel - reference| / max|baseline - reference|` "
            "(worst case); the rule allows 2 for outputs and 3 for gradients, plus a small "
            "atol.\n\n"
            + _table(rows, ["setup", "backend", "check", "records", "worst ratio"]))


@dataclass(frozen=True)
class Cell:
    """One case on one setup and backend in the portability matrix."""

    status: str
    checks: tuple[str, ...]
    ratio: float | None
    #: Which variant of a shared row ran here (``e4m3fnuz out=f32``); empty for one-case rows.
    variant: str = ""
    #: The known issues of its expected failures (ids; see the known-issues section).
    known: tuple[str, ...] = ()

    def text(self) -> str:
        tag = f" `{self.variant}`" if self.variant else ""
        if self.status == "skip":
            return "skip" + tag
        ratio = f" {_fmt(self.ratio, 2)}" if self.ratio is not None else ""
        if self.status in FAILING:
            return f"**{self.status.upper()}** {'+'.join(self.checks)}{ratio}{tag}"
        known = "".join(f" (known issue {_code(k)})" for k in self.known)
        return f"{self.status}{ratio}{known}{tag}"


_FP8_SHORT = {"float8_e4m3fn": "e4m3fn", "float8_e4m3fnuz": "e4m3fnuz"}
_OUT_SHORT = {"bfloat16": "out=bf16", "float16": "out=f16", "float32": "out=f32"}


def matrix_row(case: Case) -> tuple[str, str]:
    """``(key, label)`` of the portability-matrix row a case belongs to. The e4m3fn and
    e4m3fnuz versions of one fp8 problem share a row whatever output dtype the kernel returns
    (``e4m3`` in the label, no ``out=``), so an H100 or MI355X (e4m3fn, FA3's bf16 out) and an
    MI300X (e4m3fnuz, AITER's fp32 out) appear side by side (issue 14); every other case is its
    own row."""
    if case.dtype in _FP8_SHORT:
        twin = case.replace(dtype="float8_e4m3fn", fp8_out="bfloat16")
        return "e4m3-" + twin.case_id, twin.label.replace(" e4m3fn ", " e4m3 ", 1)
    return case.case_id, case.label


def _variant(case: Case) -> str:
    return f"{_FP8_SHORT[case.dtype]} {_OUT_SHORT[case.fp8_out]}"


def matrix_rows(view: View, checks: Iterable[str] = JUDGED) -> dict[str, tuple[str, str]]:
    """``{case_id: (row key, row label)}`` for every case with a record of ``checks``: twins
    share a row (see :func:`matrix_row`) unless some column ran more than one of them, which
    then keeps its own rows rather than hiding one verdict under another."""
    checks = frozenset(checks)
    rows: dict[str, tuple[str, str]] = {}
    per_column: dict[tuple[str, tuple[str, str]], set[str]] = defaultdict(set)
    for r in view.records:
        if r.check not in checks:
            continue
        if r.case_id not in rows:
            rows[r.case_id] = matrix_row(case_of(r))
        per_column[(rows[r.case_id][0], view.column(r))].add(r.case_id)
    crowded = {key for (key, _), ids in per_column.items() if len(ids) > 1}
    members = Counter(key for key, _ in rows.values())
    for case_id, (key, _) in list(rows.items()):
        if key in crowded or members[key] < 2:  # a lone fp8 case keeps its own row and label
            rows[case_id] = (case_id, "")
    return rows


def matrix_cells(view: View) -> dict[str, dict[tuple[str, str], Cell]]:
    """``{row: {(setup, backend): Cell}}`` over the judged checks (fwd, bwd, determinism);
    a row is a case, or the fp8 twins :func:`matrix_rows` pairs."""
    rows = matrix_rows(view)
    shared = Counter(key for key, _ in rows.values())
    grouped: dict[str, dict[tuple[str, str], list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in view.records:
        if r.check in JUDGED:
            grouped[rows[r.case_id][0]][view.column(r)].append(r)
    cells: dict[str, dict[tuple[str, str], Cell]] = {}
    for key, columns in grouped.items():
        for column, rs in columns.items():
            worst = min((r.status for r in rs), key=SEVERITY.index)
            failing = tuple(r.check for r in rs if r.status == worst) if worst in FAILING else ()
            ratios = [x for x in (finite_or_none(r.metrics.get("ratio")) for r in rs
                                  if r.status != "skip") if x is not None]
            variant = _variant(case_of(rs[0])) if shared[key] > 1 else ""
            known = tuple(dict.fromkeys(known_issue_id(r) for r in rs if r.status == "xfail"))
            cells.setdefault(key, {})[column] = Cell(worst, failing,
                                                     max(ratios) if ratios else None, variant,
                                                     known if worst == "xfail" else ())
    return cells


def matrix_section(view: View) -> str:
    cells = matrix_cells(view)
    if not cells:
        return "## Portability matrix\n\nNo parity check (fwd, bwd, determinism) was recorded."
    rows_of = matrix_rows(view)
    columns = sorted({c for per_row in cells.values() for c in per_row})
    first: dict[str, Record] = {}
    for r in view.records:
        if r.case_id in rows_of:
            first.setdefault(rows_of[r.case_id][0], r)
    labels = {key: label for key, label in rows_of.values() if label}

    def label_of(key: str) -> str:
        return labels.get(key) or case_of(first[key]).label

    order = sorted(cells, key=lambda key: (first[key].suite, natural_key(label_of(key)), key))
    rows = []
    for key in order:
        case = case_of(first[key])
        name = f" *{_cell(case.name)}*" if case.name else ""
        shown = key if key in labels else first[key].case_id
        rows.append([f"`{shown}` {_cell(label_of(key))}{name}",
                     *[cells[key][c].text() if c in cells[key] else "–" for c in columns]])
    totals = []
    for c in columns:
        counts = Counter(cells[key][c].status for key in cells if c in cells[key])
        totals.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items(),
                                                             key=lambda kv: SEVERITY.index(kv[0]))))
    rows.append(["**cases**", *[f"**{t}**" for t in totals]])
    only_timed = len({r.case_id for r in view.records} - set(rows_of))
    note = (f" {only_timed} case(s) were only timed (throughput) and are not in the matrix."
            if only_timed else "")
    paired = (" The e4m3fn and e4m3fnuz versions of one fp8 problem share a row (`e4m3`), each "
              "cell naming the format and output dtype it ran with, so NVIDIA/MI350 (e4m3fn) and "
              "MI300 (e4m3fnuz) results line up." if any(k != v for k, (v, _) in rows_of.items())
              else "")
    return ("## Portability matrix\n\nOne row per case, one column per setup and backend. A cell "
            "is the worst status of the case's parity checks there (fwd, bwd, determinism; skips "
            "count only when everything was skipped), the failing checks when it failed, and the "
            "worst error ratio `err / baseline_err` over fwd and bwd (the rule allows 2 and 3). "
            f"`–`: not run there.{paired}{note}\n\n"
            + _table(rows, ["case", *[_col(c) for c in columns]]))


def failures_section(view: View) -> str:
    """One entry per failing case on a setup and backend: its failing checks with their
    reasons, its case in TOML once, and the command that replays those checks."""
    failing = [r for r in view.records if r.status in FAILING]
    if not failing:
        return "## Failures\n\nNone."
    groups: dict[tuple[str, str, str], list[Record]] = defaultdict(list)
    for r in failing:
        groups[(view.setup(r), backend_label(r), r.case_id)].append(r)
    parts = [f"## Failures\n\n{len(failing)} record(s) of {len(groups)} case(s) failed, "
             "crashed, timed out or passed unexpectedly. Each case comes once, with its failing "
             "checks, its case and the command that replays them."]
    for i, ((setup, backend, _), rs) in enumerate(groups.items(), 1):
        r = rs[0]
        case = case_of(r)
        checks = ", ".join(f"{x.check} {x.status.upper()}" for x in rs)
        reasons = "\n".join(f"- **{x.check}**: {_cell(x.reason or 'no reason recorded')}"
                             for x in rs)
        parts.append(
            f"### {i}. {_code(backend)} on {_code(setup)}: {_cell(case.label)}: {checks}\n\n"
            f"{reasons}\n\n"
            + fence(f"# case_id {r.case_id}, suite {r.suite or '–'}, seed {r.seed}\n"
                    f"{case.to_toml()}", "toml") + "\n\n"
            + fence(replay_checks(rs), "sh"))
    return "\n\n".join(parts)


def replay_checks(records: Sequence[Record]) -> str:
    """The replay command of one case's records, every one of their checks in it."""
    command = replay_command(records[0])
    checks = ",".join(dict.fromkeys(r.check for r in records))
    return command.replace(f"--checks {records[0].check} ", f"--checks {checks} ", 1)


# ---------------------------------------------------------------------------- known issues


def known_issue_id(r: Record) -> str:
    """The known issue an expected failure matched: ``metrics.known_issue``, else the id its
    reason starts with (records written before the metric existed)."""
    given = r.metrics.get("known_issue")
    if given:
        return str(given)
    match = re.match(r"known issue (\S+)", r.reason or "")
    return match.group(1) if match else "unnamed"


def known_issues_matched_section(view: View, issues: Sequence[Any] | None = None) -> str:
    """The known issues the expected failures matched: id, description, link, where, and how
    many records and cases, so that an ``xfail`` next to an ``ok`` verdict explains itself."""
    expected = [r for r in view.records if r.status == "xfail"]
    if not expected:
        return ""
    entries = {getattr(i, "id", ""): i for i in issues or ()}
    by_issue: dict[str, list[Record]] = defaultdict(list)
    for r in expected:
        by_issue[known_issue_id(r)].append(r)
    rows = []
    for issue_id, rs in sorted(by_issue.items()):
        entry = entries.get(issue_id)
        description = (rs[0].metrics.get("known_issue_description")
                       or getattr(entry, "description", "") or "")
        link = rs[0].metrics.get("known_issue_link") or getattr(entry, "link", "") or ""
        if not link:
            match = re.match(r"known issue \S+ \((.*?)\):", rs[0].reason or "")
            link = match.group(1) if match else "–"
        columns = sorted({f"{_code(b)} on {_code(s)}" for s, b in (view.column(r) for r in rs)})
        checks = ", ".join(sorted({r.check for r in rs}))
        ratios = [x for x in (finite_or_none(r.metrics.get("ratio")) for r in rs)
                  if x is not None]
        rows.append([_code(issue_id), _cell(" ".join(description.split())[:300]) or "–",
                     _link(link), "; ".join(columns), checks,
                     f"{len(rs)} ({len({r.case_id for r in rs})} case(s))",
                     _fmt(max(ratios)) if ratios else "–"])
    return ("## Known issues that matched\n\nThese expected failures (`xfail`) are failures "
            "a known-issues entry describes: the kernel computes something else there, for the "
            "reason given. They do not fail the run; a fix shows as `xpass`.\n\n"
            + _table(rows, ["issue", "description", "link", "where", "checks", "records",
                            "worst ratio"]))


def _link(text: str) -> str:
    """A link as an autolink where it is a plain URL, else as escaped text."""
    if re.fullmatch(r"https?://[^\s<>|`\\]+", text):
        return f"<{text}>"
    return _cell(text)


def coverage_rows(view: View) -> dict[str, dict[tuple[str, str], tuple[int, int]]]:
    """``{dimension: {(setup, backend): (cases exercised, cases)}}``: a case is exercised when
    at least one of its checks there was not skipped."""
    ran: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    for r in view.records:
        column = view.column(r)
        ran[column][r.case_id] = ran[column].get(r.case_id, False) or r.status != "skip"
    first = {}
    for r in view.records:
        first.setdefault(r.case_id, r)
    out: dict[str, dict[tuple[str, str], tuple[int, int]]] = defaultdict(dict)
    for column, cases in ran.items():
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for cid, exercised in cases.items():
            for dim in dimensions(case_of(first[cid])):
                counts[dim][0] += exercised
                counts[dim][1] += 1
        for dim, (n_ran, n_all) in counts.items():
            out[dim][column] = (n_ran, n_all)
    return out


def dimensions(case: Case) -> list[str]:
    """What a case covers: its features, entry point and dtype."""
    return [*(f"feature: {f}" for f in sorted(case.features)), f"entry: {case.entry}",
            f"dtype: {case.dtype}"]


def coverage_section(view: View) -> str:
    rows_by_dim = coverage_rows(view)
    columns = sorted({c for per_dim in rows_by_dim.values() for c in per_dim})
    order = sorted(rows_by_dim, key=lambda d: (not d.startswith("feature"), d))
    rows = [[dim, *[("{}/{}".format(*rows_by_dim[dim][c]) if c in rows_by_dim[dim] else "–")
                    for c in columns]] for dim in order]
    text = ("## Coverage\n\nCases exercised / cases with the feature, per setup and backend (a "
            "case is exercised when at least one of its checks ran there).\n\n"
            + _table(rows, ["covers", *[_col(c) for c in columns]]))
    reasons: Counter = Counter()
    for r in view.records:
        if r.status == "skip":
            reasons[(view.setup(r), backend_label(r), r.reason)] += 1
    if not reasons:
        return text + "\n\nNothing was skipped."
    rows = [[_code(s), _code(b), n, _cell(reason)]
            for (s, b, reason), n in sorted(reasons.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                             -kv[1], kv[0][2]))]
    return (text + "\n\n### Skipped, and why\n\nEvery skip carries its reason; counts are "
            "records.\n\n" + _table(rows, ["setup", "backend", "records", "reason"]))


def _rate(r: Record, timed: str) -> float | None:
    metrics = r.metrics if timed == "fwd" else (r.metrics.get(timed) or {})
    return finite_or_none(metrics.get("tflops"))


def throughput_section(view: View) -> str:
    timed = [r for r in view.records if r.check in TIMED and r.status == "pass"]
    if not timed:
        return "## Throughput\n\nNo throughput was measured."
    setups = sorted({view.setup(r) for r in timed})
    vendor = {label: t.get("vendor", "") for label, t in view.setups()}
    # fp8 twins (e4m3fn on NVIDIA/MI350, e4m3fnuz on MI300) share a row, as in the matrix
    rows_of = matrix_rows(view, TIMED)
    table: dict[tuple[str, str], dict[str, Record]] = defaultdict(dict)
    for r in timed:
        table[(rows_of[r.case_id][0], r.backend_name)][view.setup(r)] = r
    rows = []
    for (key, backend), by_setup in sorted(table.items(), key=lambda kv: (
            kv[0][1], _shape_key(next(iter(kv[1].values()))))):
        case = case_of(next(iter(by_setup.values())))
        label = next((lab for k, lab in rows_of.values() if k == key and lab), case.label)
        cells = []
        for s in setups:
            r = by_setup.get(s)
            if r is None:
                cells.append("–")
            else:
                bwd = _rate(r, "bwd")
                tag = f" `{_variant(case_of(r))}`" if label != case.label else ""
                cells.append(rate_text(_rate(r, "fwd")) + (f" / {rate_text(bwd)}" if bwd else "")
                             + tag)
        rows.append([_cell(label), _code(backend), *cells, _cell(vendor_ratio(by_setup, vendor))])
    text = ("## Throughput\n\nFLOP rates, forward / backward, at the median of repeated timed "
            "calls "
            "(device events and a 256 MB L2 flush per call on GPUs, `perf_counter` on CPUs). FLOPs "
            "as in flash-attn's benchmark: 4·batch·heads·head_dim·(visible query-key pairs), "
            "backward 2.5x. The last column divides AMD by NVIDIA where both timed the same case "
            "on the same backend.\n\n"
            + _table(rows, ["case", "backend", *[_code(s) for s in setups], "AMD/NVIDIA"]))
    return text + "\n\n" + throughput_details(view, timed)


def vendor_ratio(by_setup: dict[str, Record], vendor: dict[str, str]) -> str:
    """``AMD / NVIDIA`` forward (and backward) TFLOP/s for every AMD and NVIDIA setup pair,
    each tagged, when there are several, with its backend flavor (or its setup)."""
    amd = sorted(s for s in by_setup if vendor.get(s) == "amd")
    nvidia = sorted(s for s in by_setup if vendor.get(s) == "nvidia")
    parts = []
    for a in amd:
        for n in nvidia:
            fwd = _ratio(_rate(by_setup[a], "fwd"), _rate(by_setup[n], "fwd"))
            bwd = _ratio(_rate(by_setup[a], "bwd"), _rate(by_setup[n], "bwd"))
            text = f"{fwd:.2f}" if fwd is not None else "–"
            if bwd is not None:
                text += f" / {bwd:.2f}"
            tags = [_tag(a, amd, by_setup)] if len(amd) > 1 else []
            tags += [_tag(n, nvidia, by_setup)] if len(nvidia) > 1 else []
            parts.append(" ".join([text, *tags]))
    return "; ".join(parts) or "–"


def _tag(setup: str, group: list[str], by_setup: dict[str, Record]) -> str:
    flavors = [by_setup[s].backend_flavor for s in group]
    flavor = by_setup[setup].backend_flavor
    if flavor and flavors.count(flavor) == 1:
        return flavor
    match = re.search(r"\(([^()]*)\)$", setup)  # what setup_labels added to tell setups apart
    return f"({match.group(1)})" if match else setup


def natural_key(text: str) -> tuple:
    """Sort key that orders numbers by value: ``b2 q113`` before ``b16 q1024``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def _shape_key(r: Record) -> tuple:
    """Rows of one shape together, by sequence length: the label without batch and lengths."""
    label = case_of(r).label
    shape = " ".join(p for p in label.split(" ") if not re.fullmatch(r"[bqk]\d+", p))
    return (shape, r.case.get("seqlen_k", 0), r.case.get("seqlen_q", 0), natural_key(label))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def throughput_details(view: View, timed: Sequence[Record]) -> str:
    rows = []
    for r in sorted(timed, key=lambda r: (view.setup(r), r.backend_name, _shape_key(r))):
        m = r.metrics
        bwd = m.get("bwd") or {}
        both = m.get("fwd_bwd") or {}
        rows.append([_code(view.setup(r)), _code(backend_label(r)), _cell(case_of(r).label),
                     _fmt(m.get("time_ms")), _fmt(m.get("timing_iqr_ms"), 2),
                     _cell(m.get("timing_reps", "–")), rate_text(m.get("tflops")),
                     _fmt(m.get("pct_peak")), _fmt(bwd.get("time_ms")),
                     rate_text(bwd.get("tflops")), _fmt(both.get("time_ms")),
                     rate_text(both.get("tflops")),
                     _cell(str(m.get("timing_method", "")) + (
                         f" ({m['timing_note']})" if m.get("timing_note") else ""))])
    return ("<details><summary>Every timing: medians, spread, repetitions</summary>\n\n"
            + _table(rows, ["setup", "backend", "case", "fwd ms", "IQR ms", "reps", "fwd rate",
                            "% peak", "bwd ms", "bwd rate", "fwd+bwd ms", "fwd+bwd rate",
                            "method"])
            + "\n\n</details>")


def plots_section(plots: PlotOutcome | None) -> str:
    if plots is None:
        return ""
    if not plots.files:
        return f"## Plots\n\nNo plot: {plots.skipped}."
    images = "\n\n".join(f"![TFLOP/s against sequence length: {_cell(title)}]({name})"
                         for title, name in plots.files)
    return ("## Plots\n\nTFLOP/s against sequence length, one plot per shape; solid lines are the "
            "forward, dashed the backward; bands span the interquartile range.\n\n" + images)


def inert_section(view: View) -> str:
    rows = []
    for r in view.records:
        inert = r.metrics.get("inert_features")
        if inert:
            rows.append([r.case_id, _cell(case_of(r).label),
                         _cell(", ".join(map(str, inert)) if isinstance(inert, list) else inert)])
    if not rows:
        return ""
    unique = [list(x) for x in dict.fromkeys(tuple(row) for row in rows)]
    return ("## Cases that test less than they claim\n\nThese features change the reference by no "
            "more than the tolerance, so a kernel ignoring them would still pass.\n\n"
            + _table(unique, ["case_id", "case", "inert features"]))


def _known_issues_section(view: View, issues: Sequence[Any] | None) -> str:
    if issues is None:
        return ""
    return section(view.records, issues)


def render(records: Iterable[Record], *, title: str = "attn-harness report",
           baseline: Iterable[Record] | None = None, plots: PlotOutcome | None = None,
           extra_sections: Sequence[str] = (), known_issues: Sequence[Any] | None = None) -> str:
    """The whole report as markdown.

    Args:
        records: the records of any number of result files, from any number of machines.
        title: the report's heading.
        baseline: records to compare against (a "Changes against the baseline" section).
        plots: what :func:`harness.results.plot.write_plots` wrote next to the report, if it ran.
        extra_sections: markdown appended after the plots.
        known_issues: the known-issue entries the run used (``harness.case.known_issues.load()``):
            the ones that matched none of the records are listed after the failures.
    """
    view = View.of(records)
    if not view.records:
        return f"# {title}\n\nNo records.\n"
    changes = ""
    if baseline is not None:
        changes = render_markdown(compare(view.records, list(baseline)), level=2)
    sections = [
        header_section(view, title),
        machines_section(view),
        summary_section(view),
        matrix_section(view),
        failures_section(view),
        known_issues_matched_section(view, known_issues),
        _known_issues_section(view, known_issues),
        changes,
        coverage_section(view),
        checks_section(view),
        throughput_section(view),
        plots_section(plots),
        *extra_sections,
        inert_section(view),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"
