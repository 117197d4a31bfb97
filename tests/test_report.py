"""The merged markdown report: machines, verdicts, matrix, failures, coverage, throughput, plots.

Inputs are the SYNTHETIC fixtures of tests/fixtures/results (three setups: MI300X with
flash-attn's CK build, the same MI300X with its Triton build, an H100) and the committed real CPU
sample. Every count the report prints is checked against a count of records.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from harness.cli import main
from harness.results.plot import PlotOutcome
from harness.results.records import FAILING, Record, read_many, read_records
from harness.results.report import (
    SEVERITY,
    View,
    known_issue_id,
    matrix_cells,
    render,
    replay_command,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "results"
CK = FIXTURES / "synthetic-rocm6.2-gfx942-mi300x-ck.jsonl"
TRITON = FIXTURES / "synthetic-rocm6.2-gfx942-mi300x-triton.jsonl"
H100 = FIXTURES / "synthetic-cuda12.4-sm90-h100.jsonl"
THREE = [CK, TRITON, H100]
SAMPLE = REPO / "reports" / "samples" / "cpu-x86_64" / "results.jsonl"


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return read_many(THREE)


@pytest.fixture(scope="module")
def text(records) -> str:
    return render(records)


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def table_rows(block: str) -> list[list[str]]:
    """Body rows of the first GitHub table in ``block``, cells stripped."""
    lines: list[str] = []
    for line in block.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]


def table_header(block: str) -> list[str]:
    line = next(line for line in block.splitlines() if line.startswith("|"))
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


# ------------------------------------------------------------------------------ merging


def test_three_files_from_three_setups_merge_into_one_report(records, text):
    assert text.startswith("# attn-harness report\n")
    assert f"{len(records)} records from 2 machine(s) (3 setup(s)), 2 backend(s)" in text
    machines = table_rows(section(text, "Machines"))
    assert [row[0] for row in machines] == [
        "`cuda12.4-sm90-h100`", "`rocm6.2-gfx942-mi300x (flash-attn rocm-ck)`",
        "`rocm6.2-gfx942-mi300x (flash-attn rocm-triton)`"]
    assert all(row[-1] == "SYNTHETIC" for row in machines)
    assert "**Synthetic data**" in text
    for title in ("Verdicts", "Portability matrix", "Failures", "Coverage", "Checks",
                  "Throughput"):
        section(text, title)


def test_a_single_run_still_renders_and_says_nothing_synthetic():
    records = read_records(SAMPLE) if SAMPLE.exists() else read_records(H100)
    text = render(records)
    assert "## Verdicts" in text and "## Portability matrix" in text
    if SAMPLE.exists():
        assert "Synthetic" not in text and "SYNTHETIC" not in text


def test_no_records():
    assert render([]) == "# attn-harness report\n\nNo records.\n"


# ---------------------------------------------------------------------- counts reconcile


def test_verdict_counts_reconcile_with_the_records(records, text):
    block = section(text, "Verdicts")
    header = table_header(block)
    rows = table_rows(block)
    statuses = header[3:-1]
    total = Counter(r.status for r in records)
    assert set(statuses) == set(total)
    all_row = rows[-1]
    assert all_row[0] == "**all**"
    for status, cell in zip(statuses, all_row[3:-1], strict=True):
        assert cell == f"**{total[status]}**"
    assert all_row[-1] == f"**{len(records)}**"
    per_status = Counter()
    for row in rows[:-1]:
        for status, cell in zip(statuses, row[3:-1], strict=True):
            per_status[status] += int(cell or 0)
        assert int(row[-1]) == sum(int(c or 0) for c in row[3:-1])
    assert per_status == total
    view = View.of(records)
    failing = {view.column(r) for r in records if r.status in FAILING}
    assert {(row[0], row[1]) for row in rows[:-1] if row[2] == "FAIL"} == {
        (f"`{s}`", f"`{b}`") for s, b in failing}


def test_failures_list_every_failing_record_with_case_and_replay(records, text):
    failing = [r for r in records if r.status in FAILING]
    block = section(text, "Failures")
    view = View.of(records)
    cases = {(view.setup(r), r.backend_name, r.case_id) for r in failing}
    assert block.strip().startswith(f"{len(failing)} record(s) of {len(cases)} case(s) failed")
    assert block.count("```toml") == block.count("```sh") == len(cases)
    ck_bwd = next(r for r in failing if r.backend_flavor == "rocm-ck" and r.check == "bwd")
    assert replay_command(ck_bwd) in block
    assert "head_dim = 256" in block and "ratio to baseline 4.41x" in block


def test_a_case_failing_several_checks_comes_once_with_all_of_them(records):
    failing = next(r for r in records if r.status == "fail")
    fwd = replace(failing, check="fwd", reason="out: 3 of 10 elements differ")
    bwd = replace(failing, check="bwd", reason="dq: 9 of 10 elements differ")
    block = section(render([fwd, bwd]), "Failures")
    assert block.count("```toml") == block.count("```sh") == 1
    assert "fwd FAIL, bwd FAIL" in block and "- **bwd**: dq: 9 of 10" in block
    assert "--checks fwd,bwd " in block


def test_expected_failures_name_their_known_issue_and_the_verdict_counts_them():
    from harness.case.known_issues import load

    records = [r for r in read_records(REPO / "reports" / "samples" / "cuda13.0-sm90-h200" /
                                       "results.jsonl") if r.status not in FAILING]
    expected = [r for r in records if r.status == "xfail"]
    ids = {known_issue_id(r) for r in expected}  # this sample predates metrics.known_issue
    text = render(records, known_issues=load())
    verdicts = table_rows(section(text, "Verdicts"))
    column = View.of(records).column(expected[0])
    row = next(row for row in verdicts if row[1] == f"`{column[1]}`")
    assert row[2] == f"ok ({len(ids)} known issue{'s' if len(ids) > 1 else ''})"
    block = section(text, "Known issues that matched")
    entry = next(i for i in load() if i.id in ids)
    assert f"`{entry.id}`" in block and entry.description.split()[0] in block
    assert entry.link in block
    assert f"(known issue `{entry.id}`)" in section(text, "Portability matrix")


def test_rates_read_in_one_unit_scaled_to_their_magnitude(records, text):
    from harness.results.units import rate

    assert (rate(4.72e-4), rate(1.4e-3), rate(1.31), rate(None)) == (
        "472 MFLOP/s", "1.4 GFLOP/s", "1.31 TFLOP/s", "–")
    r = next(r for r in records if r.check == "throughput" and r.status == "pass")
    assert rate(r.metrics["tflops"]) in section(text, "Throughput")


def test_matrix_has_a_row_per_judged_case_and_its_footer_counts_the_cells(records, text):
    block = section(text, "Portability matrix")
    header = table_header(block)
    rows = table_rows(block)
    view = View.of(records)
    cells = matrix_cells(view)
    columns = {view.column(r) for r in records if r.check in ("fwd", "bwd", "determinism")}
    assert len(header) == 1 + len(columns) == 7
    assert len(rows) - 1 == len(cells) == len({r.case_id for r in records
                                               if r.check != "throughput"})
    footer = rows[-1]
    assert footer[0] == "**cases**"
    counted = 0
    for cell in footer[1:]:
        counted += sum(int(n) for n in re.findall(rf"(\d+) (?:{'|'.join(SEVERITY)})", cell))
    assert counted == sum(len(per_case) for per_case in cells.values())
    only_timed = len({r.case_id for r in records}) - len(cells)
    assert f"{only_timed} case(s) were only timed" in block


def test_matrix_cells_show_status_failing_check_and_ratio(text):
    rows = {row[0].split(" ")[0]: row for row in table_rows(section(text, "Portability matrix"))}
    header = table_header(section(text, "Portability matrix"))
    d256 = rows["`98c3a09a18db`"]
    ck = header.index("`rocm6.2-gfx942-mi300x (flash-attn rocm-ck)` `flash-attn [rocm-ck]`")
    assert d256[ck] == "**FAIL** bwd 4.4"
    h100 = header.index("`cuda12.4-sm90-h100` `flash-attn [cuda]`")
    assert d256[h100] == "pass 0.92"
    softcap = rows["`80d3a221e43e`"]
    assert softcap[ck] == "skip" and softcap[h100].startswith("pass")


def test_duplicates_are_replaced_not_double_counted(records):
    twice = render(records + records)
    once = render(records)
    assert f"{len(records)} earlier record(s) of the same check" in twice
    assert section(twice, "Verdicts") == section(once, "Verdicts")


def test_coverage_counts_cases_per_feature_and_lists_skip_reasons(records, text):
    block = section(text, "Coverage")
    header = table_header(block)
    rows = {row[0]: row for row in table_rows(block)}
    ck = header.index("`rocm6.2-gfx942-mi300x (flash-attn rocm-ck)` `flash-attn [rocm-ck]`")
    h100 = header.index("`cuda12.4-sm90-h100` `flash-attn [cuda]`")
    assert rows["feature: softcap"][ck] == "0/1" and rows["feature: softcap"][h100] == "1/1"
    skips = [r for r in records if r.status == "skip"]
    reasons = block.split("### Skipped, and why")[1]
    assert sum(int(row[2]) for row in table_rows(reasons)) == len(skips)
    assert "softcap is accepted and silently ignored by rocm-ck" in reasons


# ------------------------------------------------------------------------------- throughput


def test_throughput_side_by_side_with_the_amd_nvidia_ratio(records, text):
    block = section(text, "Throughput")
    header = table_header(block)
    assert header[-1] == "AMD/NVIDIA"
    row = next(r for r in table_rows(block)
               if r[0] == "b2 q8192 k8192 h32/8 d128 bf16 causal" and r[1] == "`flash-attn`")

    def fwd(flavor):
        return next(r.metrics["tflops"] for r in records
                    if r.check == "throughput" and r.backend_flavor == flavor
                    and r.case.get("seqlen_q") == 8192)

    ratio_ck = fwd("rocm-ck") / fwd("cuda")
    assert f"{ratio_ck:.2f} / " in row[-1] and "rocm-ck" in row[-1] and "rocm-triton" in row[-1]
    assert "<details>" in block and "timing_method" not in block


def test_no_throughput_and_no_ratio_without_both_vendors():
    only_amd = read_many([CK])
    text = render(only_amd)
    rows = table_rows(section(text, "Throughput"))
    assert rows and all(row[-1] == "–" for row in rows)
    skips_only = [replace(r, status="skip", metrics={}) for r in only_amd]
    assert "No throughput was measured." in render(skips_only)


# ----------------------------------------------------------------------------------- plots


def test_plot_section_says_why_there_is_no_plot(records):
    skipped = ("the plot was skipped: matplotlib is not installed "
               "(pip install 'attn-harness[plot]')")
    text = render(records, plots=PlotOutcome(skipped=skipped))
    assert "No plot: the plot was skipped: matplotlib is not installed" in section(text, "Plots")
    assert "## Plots" not in render(records)  # no plot outcome given: no section


def test_plot_section_links_the_images(records):
    text = render(records, plots=PlotOutcome(files=(("h32/8 d128", "throughput-x.png"),)))
    assert "![TFLOP/s against sequence length: h32/8 d128](throughput-x.png)" in text


def test_a_baseline_adds_what_changed(records):
    text = render(records, baseline=records)
    assert "## Changes against the baseline" in text and "no regression" in text


# --------------------------------------------------------------------------------------- CLI


def test_report_command_merges_files_and_writes_plots_next_to_it(tmp_path, capsys):
    out = tmp_path / "merged" / "report.md"
    assert main(["report", *map(str, THREE), "-o", str(out)]) == 0
    text = out.read_text()
    assert "(3 setup(s))" in text and "## Portability matrix" in text
    plots = section(text, "Plots")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in plots
    else:
        png = next(out.parent.glob("throughput-*.png"))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.name in plots


def test_report_command_without_matplotlib_says_the_plot_was_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "report.md"
    assert main(["report", str(H100), "-o", str(out)]) == 0
    assert ("No plot: the plot was skipped: matplotlib is not installed "
            "(pip install 'attn-harness[plot]')") in out.read_text()
    assert not list(tmp_path.glob("*.png"))


def test_report_to_stdout_has_no_plots(capsys):
    assert main(["report", str(H100)]) == 0
    assert "plots are written only next to a report file (-o FILE.md)" in capsys.readouterr().out


def test_report_command_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(H100.read_text().splitlines()[0] + "\n{\"schema\": 1}\n")
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == (f"attn-harness report: error: {bad}:2: missing field 'case_id' (is this an "
                   "attn-harness results.jsonl?)\n")


@pytest.mark.parametrize("results", sorted((REPO / "reports" / "samples").glob("**/results.jsonl")),
                         ids=lambda p: str(p.parent.relative_to(REPO)))
def test_committed_sample_reports_reconcile_with_their_records(results):
    # Every committed sample's report.md was rendered from the results.jsonl beside it: its
    # totals row counts exactly the records there, status by status.
    records = read_records(results)
    counts = {s: sum(r.status == s for r in records) for s in {r.status for r in records}}
    totals = next(line for line in (results.parent / "report.md").read_text().splitlines()
                  if line.startswith("| **all**"))
    cells = [c.strip().strip("*") for c in totals.strip("|").split("|")]
    header = next(line for line in (results.parent / "report.md").read_text().splitlines()
                  if line.startswith("| setup") and "verdict" in line)
    names = [c.strip() for c in header.strip("|").split("|")]
    shown = {n: int(c) for n, c in zip(names, cells, strict=True) if c.isdigit()}
    assert shown.pop("records") == len(records)
    assert shown == counts
