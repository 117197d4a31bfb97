"""Plots of TFLOP/s against sequence length, one PNG per model shape, next to the report.

A *sweep* is any set of throughput records of one shape family (the case with its batch and
sequence lengths left out) timed at two or more sequence lengths on one setup and backend;
``cases/sweep.toml`` and ``cases/sweep-cpu.toml`` are made of them. :func:`sweeps` finds them
(pure); :func:`write_plots` draws them with matplotlib, an optional extra
(``pip install 'attn-harness[plot]'``): without it, nothing is written and the outcome says why,
which the report prints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.case import case_from_dict
from harness.results.records import Record, finite_or_none, setup_fingerprint, setup_labels
from harness.vocab import TIMED

#: Case fields a sweep varies; the rest define the shape family.
SWEPT_FIELDS = ("batch", "seqlen_q", "seqlen_k", "seqlens_q", "seqlens_k", "name", "source",
                "checks")
INSTALL_HINT = "pip install 'attn-harness[plot]'"


@dataclass(frozen=True)
class Point:
    """One timed sequence length: TFLOP/s at the median time and at the quartile times."""

    seqlen: int
    tflops: float
    tflops_lo: float
    tflops_hi: float


@dataclass(frozen=True)
class Series:
    """One line of a plot: a setup, a backend and a pass (fwd or bwd) across sequence lengths."""

    setup: str
    backend: str
    timed: str
    points: tuple[Point, ...]

    @property
    def label(self) -> str:
        return f"{self.backend} {self.timed} · {self.setup}"


@dataclass(frozen=True)
class PlotOutcome:
    """What :func:`write_plots` did: the files written (title, file name) or why none."""

    files: tuple[tuple[str, str], ...] = ()
    skipped: str = ""


def family_key(case: dict) -> str:
    """The shape family of a case: every field but the swept ones, plus whether q = k."""
    shape = {k: v for k, v in case.items() if k not in SWEPT_FIELDS}
    shape["q=k"] = case.get("seqlen_q") == case.get("seqlen_k")
    if not shape["q=k"]:
        shape["seqlen_q"] = case.get("seqlen_q")
    return json.dumps(shape, sort_keys=True)


def family_title(case: dict) -> str:
    """``h32/8 d128 bf16 causal, seqlen_q = seqlen_k`` for a case of the family."""
    label = case_from_dict(case).label.split(" ")
    shape = " ".join(p for p in label if not re.fullmatch(r"[bqk]\d+", p))
    if case.get("seqlen_q") == case.get("seqlen_k"):
        return f"{shape}, seqlen_q = seqlen_k"
    return f"{shape}, seqlen_q = {case.get('seqlen_q')}"


def _point(seqlen: int, metrics: dict) -> Point | None:
    time_ms = finite_or_none(metrics.get("time_ms"))
    rate = finite_or_none(metrics.get("tflops"))
    if not time_ms or rate is None:
        return None
    q1 = finite_or_none(metrics.get("timing_q1_ms")) or time_ms
    q3 = finite_or_none(metrics.get("timing_q3_ms")) or time_ms
    return Point(seqlen, rate, rate * time_ms / q3 if q3 else rate, rate * time_ms / q1)


def sweeps(records: Iterable[Record]) -> dict[str, tuple[str, list[Series]]]:
    """Shape families timed at two or more sequence lengths: ``{key: (title, series)}``."""
    records = [r for r in records if r.check in TIMED and r.status == "pass"]
    labels = setup_labels(r.target for r in records)
    grouped: dict[str, dict[tuple[str, str, str], dict[int, Point]]] = {}
    titles: dict[str, str] = {}
    for r in records:
        key = family_key(r.case)
        titles.setdefault(key, family_title(r.case))
        setup = labels[setup_fingerprint(r.target)]
        seqlen = int(r.case.get("seqlen_k") or 0)
        for timed, metrics in (("fwd", r.metrics), ("bwd", r.metrics.get("bwd") or {})):
            point = _point(seqlen, metrics)
            if point is not None:
                series = grouped.setdefault(key, {}).setdefault(
                    (setup, r.backend_name, timed), {})
                series[seqlen] = point
    out: dict[str, tuple[str, list[Series]]] = {}
    for key, by_series in grouped.items():
        lines = [Series(setup, backend, timed, tuple(sorted(points.values(),
                                                            key=lambda p: p.seqlen)))
                 for (setup, backend, timed), points in sorted(
                     by_series.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2] != "fwd"))]
        if any(len(s.points) >= 2 for s in lines):
            out[key] = (titles[key], lines)
    return out


def file_name(title: str) -> str:
    """``throughput-h32-8-d128-bf16-causal-seqlen-q-seqlen-k.png`` for a family title."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return f"throughput-{slug[:80]}.png"


def write_plots(records: Sequence[Record], out_dir: str | Path) -> PlotOutcome:
    """Draw every sweep in ``records`` as ``out_dir/throughput-<family>.png``."""
    found = sweeps(records)
    if not found:
        return PlotOutcome(skipped="no shape was timed at two or more sequence lengths (a sweep: "
                                   "attn-harness run --suite sweep --checks throughput, or "
                                   "--suite sweep-cpu on a CPU)")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return PlotOutcome(skipped=f"the plot was skipped: matplotlib is not installed "
                                   f"({INSTALL_HINT})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for title, lines in sorted(found.values()):
        name = file_name(title)
        _draw(Figure(figsize=(7.5, 4.5), dpi=100), title, lines).savefig(
            out_dir / name, format="png", metadata={"Software": None})
        files.append((title, name))
    return PlotOutcome(files=tuple(files))


def _draw(fig, title: str, lines: list[Series]):
    ax = fig.add_subplot()
    colors = {}
    for s in lines:
        key = (s.setup, s.backend)
        colors.setdefault(key, f"C{len(colors) % 10}")
        xs = [p.seqlen for p in s.points]
        style = "-" if s.timed == "fwd" else "--"
        ax.plot(xs, [p.tflops for p in s.points], style, marker="o", markersize=3,
                color=colors[key], label=s.label)
        ax.fill_between(xs, [p.tflops_lo for p in s.points], [p.tflops_hi for p in s.points],
                        color=colors[key], alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ticks = sorted({p.seqlen for s in lines for p in s.points})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("sequence length (keys)")
    ax.set_ylabel("TFLOP/s (median; band: interquartile)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
