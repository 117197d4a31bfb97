"""What changed between a run and a baseline: status flips, error-ratio growth, throughput moves.

Records are matched by setup, backend (with flavor), case and check. Setups are paired by their
fingerprint (:func:`harness.results.records.setup_fingerprint`); a setup left unpaired is then
paired with the baseline setup of the same target id, and failing that with the one of the same
vendor, architecture and device, when exactly one such baseline setup is left: that is how a ROCm or
torch upgrade on one machine is compared with the night before.

Rules (the defaults are :class:`Thresholds`'s; every one is documented in the output):

* **Status**: statuses rank ``pass = xpass < xfail < fail = error < timeout = crash``; ``skip`` is
  not ranked. A check whose rank rises is a *regression* (pass -> fail, fail -> crash, and also
  pass -> xfail: the kernel fails now even if a known issue names it); one whose rank falls is
  an *improvement*. Ranked -> skip is *coverage lost* and skip -> ranked *coverage gained*:
  reported, but not regressions.
* **Error ratio** (fwd and bwd, ``err / baseline_err``): a regression when it grows by more than
  ``ratio_growth`` relative **and** more than ``ratio_growth_abs`` absolute. On the same inputs
  (the seed is in the record) a deterministic kernel reproduces its ratio exactly, so any growth
  is a change in the kernel or its libraries; the absolute floor ignores moves among tiny ratios.
* **Throughput** (median times of fwd, bwd and fwd+bwd): a move counts only when it is *beyond
  the measured spread*, meaning both (1) the relative change of the median exceeds ``slowdown``
  and (2) the two runs' interquartile ranges do not overlap (for a slowdown: the current first
  quartile is above the baseline's third quartile). (1) keeps day-to-day clock and thermal
  variation of a few percent from paging anyone; (2) keeps a noisy measurement, whose quartiles
  overlap, from counting however far its median wandered. Slower is a regression, faster an
  improvement, **only where both runs were steady**: a run timed while the machine's speed
  moved (an ``unsteady`` note, ``timing_drift`` beyond :data:`STEADY`), or a pair whose control
  workload itself moved beyond the threshold, makes the move *inconclusive*: listed with the
  reason, never a regression. On a CPU each block of calls is timed against a fixed control
  workload right after it (``timing_relative``, :func:`harness.checks.timing.attention_control`).
  Where both records carry it and the software is the same: if both runs were steady and the
  control took within :data:`CONTROL_SAME` of the same time in both (the machine ran at the
  same speed), the kernel's median time is judged, and its change corrected by the control's
  must still exceed the threshold; otherwise the ratio is what is judged (a busier machine
  slows kernel and control alike): a ratio beyond both spreads (quartiles apart, and medians
  farther apart than either interquartile range is wide) is the change, and a wall time
  that moved while the ratio did not is inconclusive (the machine, not the kernel); so is a
  ratio that moved while the control's own time changed by more than
  :data:`CONTROL_TOLERANCE` (under heavy contention the ratio depends on the load too).
* **Missing**: a baseline record with no counterpart in the run is a regression (an empty or
  partial results file must not read as "no regression"), unless the case or backend was
  dropped on purpose (``compare(..., allow_missing=True)``, the CLI's ``--allow-missing``): then
  it is a notice. When a shard of a sharded run is missing or stopped early
  (:func:`harness.shard.shard_runs`), nothing was dropped on purpose: its tasks' baseline
  records are regressions even with ``--allow-missing``, and the output names the shard.

``attn-harness compare`` prints :func:`render_markdown` and exits 1 when anything regressed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tabulate import tabulate

from harness import vocab
from harness.escape import md
from harness.results.records import (
    Record,
    backend_label,
    case_of,
    finite_or_none,
    merge_records,
    setup_fingerprint,
    setup_labels,
)
from harness.results.stats import shifted
from harness.shard import shard_runs

#: Rank of each status; higher is worse. ``skip`` is absent: it is not a result.
RANK = vocab.RANK
#: The throughput passes compared, and where their metrics live in a record.
PASSES = (("fwd", None), ("bwd", "bwd"), ("fwd+bwd", "fwd_bwd"))
#: The largest ``|timing_drift|`` (and ``|timing_relative_drift|``) of a steady run: the CPU
#: timing's own rule for calling a window's halves apart (harness.checks.timing.STEADY_SPREAD).
STEADY = 0.15
#: The largest change of the control workload's time between two runs at which their control
#: ratios are still compared. Under heavy contention the ratio itself depends on the load (a
#: kernel with many parallel regions waits at each barrier, a GEMM at few): on our 2-core VM at
#: load 9-10, identical runs whose control times differed by more than half read ratios 2-3x
#: apart (tests/bench/compare_noise.py).
CONTROL_TOLERANCE = 0.5
#: The largest change of the control workload's time between two runs at which the machine
#: counts as having run at the same speed in both. Then, if neither run was timed while the
#: machine moved, the kernel's own times are judged, corrected by the control's change: the
#: ratio of each block to the control block after it adds the control's jitter to the
#: kernel's (on our idle 2-core VM the ratio's IQR was +-10-15% where the wall time's was
#: +-3-6%), and a 25% slower kernel was called inconclusive in 4 of 10 idle pairs. Between
#: idle runs of identical code the control's time moved by up to 15%
#: (tests/bench/compare_noise.py).
CONTROL_SAME = 0.20


@dataclass(frozen=True)
class Thresholds:
    """When a change counts.

    Attributes:
        slowdown: relative change of a median time that may count as a move (0.10 = 10%).
        ratio_growth: relative growth of the error ratio that counts (0.25 = 25%).
        ratio_growth_abs: absolute growth of the error ratio that counts, too.
    """

    slowdown: float = 0.10
    ratio_growth: float = 0.25
    ratio_growth_abs: float = 0.1


@dataclass(frozen=True)
class Change:
    """One difference between the run and the baseline.

    Attributes:
        kind: regression, improvement, inconclusive (a throughput move the runs cannot
            support: reported with the reason, never a regression) or notice (reported,
            never a regression).
        what: status, ratio, throughput, coverage or missing.
        setup: the current setup's label.
        backend: backend name with its flavor.
        case_id, case: the case and its label.
        check: the check (and for throughput the pass: ``throughput fwd``).
        before, after: the two values as text.
        detail: why it counts.
    """

    kind: str
    what: str
    setup: str
    backend: str
    case_id: str
    case: str
    check: str
    before: str
    after: str
    detail: str


@dataclass
class Comparison:
    """Everything :func:`compare` found."""

    changes: list[Change] = field(default_factory=list)
    matched: int = 0
    new: int = 0
    missing: int = 0
    pairs: list[tuple[str, str]] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    #: Whether missing baseline records were allowed (notices, not regressions).
    allow_missing: bool = False
    #: One line per sharded run of the current records: which shards are present.
    shards: list[str] = field(default_factory=list)
    #: Whether a shard of the current records is missing or stopped early.
    shard_gaps: bool = False

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "regression"]

    @property
    def regressed(self) -> bool:
        return bool(self.regressions)


def _identity(t: dict) -> tuple[str, str, str]:
    return (t.get("vendor", ""), t.get("arch", ""), t.get("device_name", ""))


def pair_setups(current: Sequence[Record], baseline: Sequence[Record]) -> dict[tuple, tuple]:
    """``{current fingerprint: baseline fingerprint}`` (see the module docstring)."""
    cur = {setup_fingerprint(r.target): r.target for r in current}
    base = {setup_fingerprint(r.target): r.target for r in baseline}
    pairs = {fp: fp for fp in cur if fp in base}
    for key in (lambda t: t.get("target_id", ""), _identity):
        left = [fp for fp in base if fp not in pairs.values()]
        for fp, t in cur.items():
            if fp in pairs:
                continue
            candidates = [b for b in left if key(base[b]) == key(t)]
            if len(candidates) == 1:
                pairs[fp] = candidates[0]
                left.remove(candidates[0])
    return pairs


def compare(current: Iterable[Record], baseline: Iterable[Record],
            thresholds: Thresholds | None = None, *, allow_missing: bool = False) -> Comparison:
    """Every change from ``baseline`` to ``current`` (see the module docstring for the rules).

    Args:
        current, baseline: the records of the run and of the baseline.
        thresholds: when a change counts (default :class:`Thresholds`).
        allow_missing: baseline records the run lacks are notices, not regressions (the case
            or backend was dropped deliberately).
    """
    current, _ = merge_records(current)
    baseline, _ = merge_records(baseline)
    th = thresholds or Thresholds()
    pairs = pair_setups(current, baseline)
    labels = setup_labels(r.target for r in current)
    base_labels = setup_labels(r.target for r in baseline)
    out = Comparison(thresholds=th)
    out.pairs = sorted({(labels[c], base_labels[b]) for c, b in pairs.items()})
    out.unpaired = sorted({labels[setup_fingerprint(r.target)] for r in current
                           if setup_fingerprint(r.target) not in pairs})

    def key(r: Record, fp: tuple) -> tuple:
        return (fp, r.backend_name, r.backend_flavor, r.case_id, r.check)

    base_by_key = {key(r, setup_fingerprint(r.target)): r for r in baseline}
    seen = set()
    for r in current:
        fp = setup_fingerprint(r.target)
        b = base_by_key.get(key(r, pairs[fp])) if fp in pairs else None
        if b is None:
            out.new += 1
            continue
        seen.add(key(b, setup_fingerprint(b.target)))
        out.matched += 1
        out.changes.extend(changes_between(r, b, labels[fp], th))
    out.missing = len(base_by_key) - len(seen)
    out.allow_missing = allow_missing
    runs = shard_runs(current, lambda r: labels[setup_fingerprint(r.target)])
    gaps = [run for run in runs if run.missing or run.incomplete]
    out.shards = [f"`{run.run_id}` on `{run.setup}`: {run.line()}" for run in runs]
    out.shard_gaps = bool(gaps)
    shard_note = "; ".join(
        f"run {run.run_id} on {run.setup} lacks shard(s) "
        f"{', '.join(str(i) for i in [*run.missing, *(i for i, _, _ in run.incomplete)])} "
        f"of {run.count}" for run in gaps)
    for k, b in base_by_key.items():
        if k not in seen:
            out.changes.append(missing_change(b, base_labels[k[0]], allow_missing and not gaps,
                                              shard_note))
    order = {"regression": 0, "improvement": 1, "inconclusive": 2, "notice": 3}
    out.changes.sort(key=lambda c: (order[c.kind], c.what, c.setup, c.backend, c.case, c.check))
    return out


def missing_change(before: Record, setup: str, allowed: bool, shards: str = "") -> Change:
    """A baseline record the run has no counterpart for (``setup``: the baseline's label;
    ``shards``: which shards of the run are missing or incomplete, when some are)."""

    if shards:
        detail = (f"the run has no record of this check, and {shards}: its tasks count as "
                  "missing (run the shard again, or give its results file)")
    else:
        detail = ("dropped on purpose (--allow-missing)" if allowed else
                  "the run has no record of this check; pass --allow-missing if the case or "
                  "backend was dropped on purpose")
    return Change("notice" if allowed else "regression", "missing", setup, backend_label(before),
                  before.case_id, case_of(before).label, before.check, before.status, "not run",
                  detail)


def changes_between(now: Record, before: Record, setup: str, th: Thresholds) -> list[Change]:
    """The changes of one matched record."""

    label = case_of(now).label

    def change(kind: str, what: str, check: str, a: str, b: str, detail: str) -> Change:
        return Change(kind, what, setup, backend_label(now), now.case_id, label, check, a, b,
                      detail)

    out = []
    if now.status != before.status:
        rank_now, rank_before = RANK.get(now.status), RANK.get(before.status)
        if rank_now is None or rank_before is None:
            detail = ("now runs" if rank_now is not None
                      else f"no longer runs: {now.reason or 'no reason recorded'}")
            out.append(change("notice", "coverage", now.check, before.status, now.status, detail))
        elif rank_now != rank_before:
            kind = "regression" if rank_now > rank_before else "improvement"
            out.append(change(kind, "status", now.check, before.status, now.status,
                              now.reason or "–"))
    if now.check in vocab.RATIO_CHECKS and now.status != "skip" and before.status != "skip":
        r_now = finite_or_none(now.metrics.get("ratio"))
        r_before = finite_or_none(before.metrics.get("ratio"))
        if (r_now is not None and r_before is not None
                and r_now > r_before * (1 + th.ratio_growth)
                and r_now - r_before > th.ratio_growth_abs):
            out.append(change("regression", "ratio", now.check, f"{r_before:.3g}", f"{r_now:.3g}",
                              f"err / baseline_err grew {r_now / r_before - 1:+.0%} "
                              f"(threshold +{th.ratio_growth:.0%} and +{th.ratio_growth_abs:g})"
                              if r_before > 0 else "grew from 0"))
    if now.check in vocab.TIMED and now.status == "pass" and before.status == "pass":
        same = setup_fingerprint(now.target) == setup_fingerprint(before.target)
        for name, sub in PASSES:
            moved = throughput_move(_metrics(now, sub), _metrics(before, sub), th.slowdown,
                                    same_software=same)
            if moved is not None:
                kind, detail, a, b = moved
                out.append(change(kind, "throughput", f"{now.check} {name}", a, b, detail))
    return out


def _metrics(r: Record, sub: str | None) -> dict:
    return r.metrics if sub is None else (r.metrics.get(sub) or {})


def _quartiles(m: dict) -> tuple[float, float, float] | None:
    median = finite_or_none(m.get("time_ms"))
    if not median:
        return None
    q1 = finite_or_none(m.get("timing_q1_ms"))
    q3 = finite_or_none(m.get("timing_q3_ms"))
    if q1 is None or q3 is None:  # no spread recorded: a point interval
        q1 = q3 = median
    return q1, median, q3


def _relative(m: dict) -> tuple[float, float, float] | None:
    """The control ratio's quartiles (``timing_relative``), None where not recorded."""
    values = [finite_or_none(m.get(k)) for k in ("timing_relative_q1", "timing_relative",
                                                  "timing_relative_q3")]
    if any(v is None for v in values) or not values[1]:
        return None
    return values[0], values[1], values[2]


def _unsteady(m: dict, drift_key: str = "timing_drift") -> bool:
    drift = finite_or_none(m.get(drift_key))
    return (drift_key == "timing_drift" and "unsteady" in str(m.get("timing_note", ""))) or (
        drift is not None and abs(drift) > STEADY)


def _runs(sides: list[str]) -> str:
    return f"the {' and '.join(sides)} run{'s were' if len(sides) > 1 else ' was'}"


def throughput_move(now: dict, before: dict, threshold: float, *, same_software: bool = True):
    """``(kind, detail, before, after)`` when a median time moved beyond the spread (see the
    module docstring: regression, improvement or inconclusive), else None.

    Beyond the spread = the relative change exceeds ``threshold`` and the interquartile ranges
    do not overlap. ``same_software``: both records come from one setup (same fingerprint), so
    their control workloads are the same code and the control ratio may be judged.
    """
    a, b = _quartiles(before), _quartiles(now)
    if a is None or b is None:
        return None
    (a1, am, a3), (b1, bm, b3) = a, b
    wall = shifted(a, b, threshold)
    change = bm / am - 1
    text = (f"{am:.4g} ms (IQR {a1:.4g}-{a3:.4g})", f"{bm:.4g} ms (IQR {b1:.4g}-{b3:.4g})")
    ra, rb = _relative(before), _relative(now)
    ca, cb = finite_or_none(before.get("timing_control_ms")), \
        finite_or_none(now.get("timing_control_ms"))
    if ra is not None and rb is not None and same_software and ca and cb \
            and abs(cb / ca - 1) <= CONTROL_SAME and not _unsteady(before) \
            and not _unsteady(now):
        return _same_speed_move(wall, change, (bm / am) / (cb / ca) - 1, cb / ca - 1,
                                threshold, text)
    if ra is not None and rb is not None and same_software:
        relative = _beyond_both(ra, rb, threshold)
        moved = rb[1] / ra[1] - 1
        ratio = (f"time relative to the control workload timed alongside {moved:+.1%} (ratio "
                 f"{ra[1]:.3g} -> {rb[1]:.3g}, IQR {ra[0]:.3g}-{ra[2]:.3g} -> "
                 f"{rb[0]:.3g}-{rb[2]:.3g})")
        if relative:
            drifting = [side for side, m in (("baseline", before), ("current", now))
                        if _unsteady(m, "timing_relative_drift")]
            if drifting:
                return ("inconclusive", f"{ratio}; but in {_runs(drifting)} the ratio itself "
                        f"moved by more than {STEADY:.0%} within the window; wall time "
                        f"{change:+.1%}", *text)
            if ca and cb and abs(cb / ca - 1) > CONTROL_TOLERANCE:
                return ("inconclusive", f"{ratio}; but the control workload itself took "
                        f"{cb / ca - 1:+.0%} between the runs: the machine's load differed by "
                        f"more than the ratio corrects for (over {CONTROL_TOLERANCE:.0%}); "
                        f"wall time {change:+.1%}", *text)
            kind, way = ("regression", "slower") if relative > 0 else ("improvement", "faster")
            return (kind, f"{ratio} ({way}; beyond {threshold:.0%} with interquartile ranges "
                    f"apart); wall time {change:+.1%}", *text)
        if wall:
            return ("inconclusive", f"wall time {change:+.1%} beyond the spread, but the "
                    f"{ratio}, within the spread: the machine's speed differed between the "
                    "runs, not the kernel's", *text)
        return None
    if not wall:
        return None
    reasons = []
    moved = [side for side, m in (("baseline", before), ("current", now)) if _unsteady(m)]
    if moved:
        reasons.append(f"{_runs(moved)} timed while the machine's speed moved (an unsteady "
                       f"note or a drift beyond {STEADY:.0%})")
    if ca and cb and abs(cb / ca - 1) > threshold:
        reasons.append(f"the control workload itself took {cb / ca - 1:+.0%}: the machine "
                       "(or its libraries) differed between the runs")
    detail = (f"median time {change:+.1%} ({'slower' if wall > 0 else 'faster'}); "
              f"interquartile ranges do not overlap (threshold {threshold:.0%})")
    if reasons:
        return ("inconclusive", f"{detail}; but {'; and '.join(reasons)}", *text)
    kind = "regression" if wall > 0 else "improvement"
    return (kind, detail, *text)


def _beyond_both(before: tuple[float, float, float], after: tuple[float, float, float],
                 threshold: float) -> int:
    """:func:`shifted`, and the medians farther apart than either interquartile range is wide:
    beyond both spreads. For the control ratio between runs at different machine speeds: under
    contention one run's ratio can spread over 4x (kernel and control wait at different
    barriers) while the other's is tight, and quartiles that merely do not overlap then read
    identical code as 4x slower (tests/bench/compare_noise.py at load 5-7)."""
    move = shifted(before, after, threshold)
    wide = max(before[2] - before[0], after[2] - after[0])
    return move if move and abs(after[1] - before[1]) > wide else 0


def _same_speed_move(wall: int, change: float, corrected: float, control: float,
                     threshold: float, text: tuple[str, str]):
    """The move between two steady runs whose control workload took within
    :data:`CONTROL_SAME` of the same time: the kernel's median time, beyond the spread and,
    corrected by the control's change, beyond ``threshold``; None when the wall time did not
    move beyond the spread."""
    if not wall:
        return None
    speed = (f"the control workload timed alongside took {control:+.1%} (within "
             f"{CONTROL_SAME:.0%}: the machine ran at the same speed in both runs)")
    detail = (f"median time {change:+.1%} ({'slower' if wall > 0 else 'faster'}); "
              f"interquartile ranges do not overlap (threshold {threshold:.0%}); {speed}")
    if abs(corrected) <= threshold or (corrected > 0) != (wall > 0):
        return ("inconclusive", f"{detail}, and corrected by it the change is "
                f"{corrected:+.1%}, within the threshold", *text)
    kind = "regression" if wall > 0 else "improvement"
    return (kind, f"{detail}; {corrected:+.1%} corrected by it", *text)


def render_markdown(c: Comparison, *, level: int = 1) -> str:
    """The comparison as markdown; ``level`` is the heading level of its title."""
    h = "#" * level
    regressions = c.regressions
    verdict = (f"**{len(regressions)} regression(s)**" if regressions else "no regression")
    counts = {k: sum(1 for x in c.changes if x.kind == k)
              for k in ("regression", "improvement", "inconclusive", "notice")}
    parts = [f"{h} Changes against the baseline\n\n{verdict}: {counts['regression']} "
             f"regression(s), {counts['improvement']} improvement(s), "
             f"{counts['inconclusive']} inconclusive throughput change(s), {counts['notice']} "
             f"coverage notice(s) over {c.matched} matched record(s); {c.new} record(s) have no "
             f"baseline, {c.missing} baseline record(s) were not run."]
    if c.pairs:
        parts.append("Setups compared: " + "; ".join(
            md(a, code=True) if a == b else f"{md(a, code=True)} against {md(b, code=True)}"
            for a, b in c.pairs) + ".")
    if c.unpaired:
        parts.append("No baseline for: " + ", ".join(md(u, code=True) for u in c.unpaired)
                     + ".")
    if c.shards:
        parts.append("\n".join(f"- Run {line}." if not c.shard_gaps else f"- **Run {line}.**"
                               for line in c.shards))
    th = c.thresholds
    parts.append(f"Rules: a status whose rank rises (pass < xfail < fail/error < crash/timeout) "
                 f"is a regression; an error ratio that grows by more than "
                 f"{th.ratio_growth:.0%} and {th.ratio_growth_abs:g} is a regression; a median "
                 f"time that moves by more than {th.slowdown:.0%} with interquartile ranges that "
                 f"do not overlap is a regression (slower) or an improvement (faster) only "
                 f"where both runs were steady, else inconclusive (on a CPU the time relative "
                 f"to a control workload timed alongside is what is judged); a "
                 f"baseline record the run lacks is "
                 f"{'a notice (--allow-missing)' if c.allow_missing else 'a regression'}.")
    titles = {"regression": "Regressions", "improvement": "Improvements",
              "inconclusive": "Inconclusive throughput changes (not regressions)",
              "notice": "Coverage changes (not regressions)"}
    for kind, title in titles.items():
        # Setups, backends, cases and details come from the records: every one escaped.
        rows = [[x.what, md(x.setup, code=True), md(x.backend, code=True),
                 f"{md(x.case_id, code=True)} {md(x.case)}", md(x.check), md(x.before),
                 md(x.after), md(x.detail[:300])]
                for x in c.changes if x.kind == kind]
        if rows:
            parts.append(f"{h}# {title}\n\n" + tabulate(
                rows, headers=["what", "setup", "backend", "case", "check", "before", "after",
                               "detail"], tablefmt="github", disable_numparse=True))
    return "\n\n".join(parts)
