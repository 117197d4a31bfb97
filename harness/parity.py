"""Parity under pytest: the session behind the plugin's fixtures.

A :class:`ParitySession` owns one worker process (replaced when a kernel kills it, exactly as in
``attn-harness run``), runs suite cases and explorations through it, turns records into pytest
outcomes (fail with the case and its replay command, skip with the reasons, strict xfail for
known issues) and, with ``--attn-records DIR``, streams every record to ``DIR/results.jsonl``
(``results-<xdist worker>.jsonl`` under ``pytest -n``) and renders ``DIR/report.md`` at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.case import Case
from harness.errors import HarnessError
from harness.records import FAILING, Record, RecordWriter


@dataclass
class ParitySession:
    """State shared by the parity tests of one pytest process."""

    specs: list[str]
    checks: tuple[str, ...]
    profile: str
    seed: int
    timeout_s: float
    audit: bool = False
    max_gflop: float | None = None
    examples: int | None = None
    records_dir: Path | None = None
    regressions: Path | None = None
    backends: list[str] = field(default_factory=list)
    capabilities: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    _runner: Any = None
    _writer: RecordWriter | None = None
    _count: int = 0

    @classmethod
    def from_config(cls, config) -> ParitySession:
        from harness.profile import get_profile

        profile = get_profile(config.getoption("--attn-profile"))
        records = config.getoption("--attn-records")
        state = cls(
            specs=config.getoption("--attn-backend") or [],
            checks=tuple(config.getoption("--attn-checks")),
            profile=profile.name,
            seed=config.getoption("--attn-seed"),
            timeout_s=config.getoption("--attn-timeout") or profile.timeout_s,
            audit=config.getoption("--attn-audit"),
            max_gflop=config.getoption("--attn-max-gflop"),
            examples=config.getoption("--attn-examples"),
            records_dir=Path(records) if records else None,
            regressions=Path(config.getoption("--attn-regressions")),
        )
        state.start()
        return state

    # ------------------------------------------------------------------------------- set-up

    def start(self) -> None:
        from harness.backends import known_backends
        from harness.runner import ExplorationWorker

        self._runner = ExplorationWorker(self.timeout_s)
        requested = bool(self.specs)
        resolved = self._runner.resolve(self.specs or known_backends())
        for spec, info in resolved.items():
            if "error" in info:
                if requested:
                    raise pytest.UsageError(info["error"])
                continue
            if requested or not info["availability"]:
                self.backends.append(spec)
                self.capabilities[spec] = info["capabilities"]
                self.unavailable[spec] = info["availability"] or ""
        if not self.backends:
            raise pytest.UsageError("no backend is available here; attn-harness info says why")
        if self.records_dir is not None:
            worker = os.environ.get("PYTEST_XDIST_WORKER")
            name = f"results-{worker}.jsonl" if worker else "results.jsonl"
            self._writer = RecordWriter(self.records_dir / name)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.__exit__(None, None, None)
        if self._writer is not None:
            self._writer.close()

    # --------------------------------------------------------------------------------- runs

    def _sink(self, record: Record) -> None:
        self._count += 1
        if self._writer is not None:
            self._writer.write(record)

    def _task(self, suite: str, case: Case, spec: str, checks: tuple[str, ...]):
        from harness.runner import Task

        return Task(suite=suite, case=case, backend=spec, checks=checks, seed=self.seed,
                    audit=self.audit, profile=self.profile, max_gflop=self.max_gflop)

    def run(self, suite: str, case: Case, spec: str) -> list[Record]:
        """Run one case's checks on one backend; records are streamed as they come."""
        task = self._task(suite, case, spec, self.checks)
        return self._runner.run(task, self._sink)

    def check(self, suite_case: tuple[str, Case], spec: str) -> None:
        """Run a suite case and turn its records into the test's outcome."""
        suite, case = suite_case
        outcome(self.run(suite, case, spec), case, spec)

    def explore(self, spec: str) -> None:
        """Explore a backend; fail with the minimal case when something fails."""
        from harness.explore import explore, summary

        if self.unavailable.get(spec):
            pytest.skip(f"{spec} is unavailable: {self.unavailable[spec]}")
        checks = tuple(c for c in self.checks if c != "throughput")
        if not checks:
            pytest.skip("exploration needs fwd, bwd or determinism among --attn-checks")

        def run_case(case: Case) -> list[Record]:
            return self._runner.run(self._task("explore", case, spec, checks), lambda r: None)

        result = explore(spec, self.capabilities[spec], run_case, profile=self.profile,
                         examples=self.examples, seed=self.seed, on_record=self._sink,
                         regressions=self.regressions)
        text = summary(result)
        if result.minimal is not None:
            self.findings.append(text)
            pytest.fail(text, pytrace=False)

    def summary_lines(self) -> list[str]:
        lines = [f"{self._count} record(s) from backends {', '.join(self.backends)}"]
        for finding in self.findings:
            lines.extend(finding.splitlines())
        return lines


def outcome(records: list[Record], case: Case, spec: str) -> None:
    """pytest's verdict for a case's records: fail, skip, strict xfail, or pass."""
    from harness.report import replay_command

    failing = [r for r in records if r.status in FAILING]
    if failing:
        lines = [f"{spec} on {case.label} (case_id {case.case_id}):"]
        lines += [f"  {r.check} {r.status}: {r.reason}" for r in failing]
        lines += ["case:", case.to_toml().rstrip(), f"replay: {replay_command(failing[0])}"]
        pytest.fail("\n".join(lines), pytrace=False)
    expected = [r for r in records if r.status == "xfail"]
    if expected:
        pytest.xfail("; ".join(f"{r.check}: {r.reason}" for r in expected))
    if records and all(r.status == "skip" for r in records):
        reasons = dict.fromkeys(r.reason for r in records)
        pytest.skip("; ".join(reasons))


def write_report(directory: Path) -> Path:
    """Render ``report.md`` from every results file a session (or its xdist workers) wrote."""
    from harness.records import read_many
    from harness.report import render

    files = sorted(directory.glob("results*.jsonl"))
    records = read_many(files) if files else []
    try:
        from harness.plot import write_plots

        plots = write_plots(records, directory)
        text = render(records, plots=plots)
    except (ImportError, TypeError, HarnessError):
        text = render(records)
    path = directory / "report.md"
    path.write_text(text, encoding="utf-8")
    return path
