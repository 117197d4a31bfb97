"""Hostile and malformed text (issue 22): text the harness did not write stays inert in
report.md, compare's output and regression files; files that are not what they claim are one
line and exit 2; suites too large to build are refused before they are built.

The hostile corpus below is text anyone could put into a case name, a kernel's exception
message or flavor, a known issue or another machine's results file. report.md is rendered
with markdown-it-py (CommonMark with GitHub's tables, raw HTML on, as GitHub renders job
summaries) and the HTML it makes is checked: no tag the text brought, no row broken, no
control character.
"""

from __future__ import annotations

import errno
import html
import json
import re
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from harness.case import Case, case_from_dict
from harness.cli import main
from harness.errors import InvalidCase, RecordsError
from harness.escape import fence, md, one_line
from harness.results.records import Record, read_records

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    "a | b || c",
    "back\\|slash \\",
    "`tick` ``two`` ```three",
    "```\n# heading after a fence",
    "\x1b[31mred\x1b[0m and \x07bell \x00nul \x7fdel \x9bcsi",
    "line\nbreak\r\nand\u2028separator\u2029para\x85nel\vvt\fff",
    "\u202eevil-right-to-left\u202c \u2066isolate\u2069",
    "[click](javascript:alert(3)) ![pixel](http://tracker.invalid/p.png)",
    "# not a heading *not bold* _not em_ ~~not struck~~",
    "&lt;script&gt; &amp; &#60;b&#62;",
    "<!-- comment --> <a href='x'>link</a> <details open>",
    "\t tab and   spaces ",
    "",
]
_PARSER = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
#: Tags a piece of text must never bring (within one escaped piece: no markup at all).
_FOREIGN_TAGS = re.compile(r"<(script|img|a|details|em|strong|h\d|s|iframe|!--)\b", re.I)
#: Tags hostile text must not bring into a whole report (which has headings and emphasis of
#: its own).
_LIVE_TAGS = re.compile(r"<(script|img|a|details open|s|iframe|!--)\b", re.I)


def render_html(markdown: str) -> str:
    return _PARSER.render(markdown)


def assert_inert(rendered: str, tags: re.Pattern = _FOREIGN_TAGS) -> None:
    """No tag, link or emphasis the text brought, no control character but newlines."""
    assert not tags.search(rendered), tags.search(rendered)
    bad = [ch for ch in rendered if unicodedata.category(ch) in ("Cc", "Cs") and ch != "\n"]
    assert not bad, bad
    assert not any(ch in rendered for ch in "\u202e\u2066\u2028\u2029")


def assert_tables_whole(rendered: str) -> None:
    """Every body row of every table has as many cells as its header."""
    for table in re.findall(r"<table>.*?</table>", rendered, re.S):
        width = len(re.findall(r"<th[ >]", table))
        for row in re.findall(r"<tbody>.*?</tbody>", table, re.S)[0].split("</tr>")[:-1]:
            assert len(re.findall(r"<td[ >]", row)) == width, row


# ----------------------------------------------------------------- the escaping function


@pytest.mark.parametrize("code", [False, True], ids=["text", "code"])
@pytest.mark.parametrize("text", HOSTILE)
def test_md_renders_hostile_text_as_that_text_in_one_table_cell(text, code):
    rendered = render_html(f"| a | b |\n|---|---|\n| {md(text, code=code)} | end |\n")
    assert_inert(rendered)
    assert_tables_whole(rendered)
    (cell,) = re.findall(r"<tr>\n<td>(.*?)</td>\n<td>end</td>", rendered, re.S)
    if code:
        cell = re.fullmatch(r"<code>(.*)</code>", cell, re.S).group(1) if text else cell
    shown = html.unescape(cell)
    assert shown.strip() == one_line(text).strip()  # exactly the text, made printable


@pytest.mark.parametrize("text", HOSTILE)
def test_md_keeps_hostile_text_inert_in_prose_and_fences_it_in_code_blocks(text):
    assert_inert(render_html(f"Reason: {md(text)}\n\nafter\n"))
    rendered = render_html(fence(f"# {text}\n{text}", "toml") + "\n\n# Next\n")
    assert rendered.count("<pre>") == 1 and rendered.endswith("<h1>Next</h1>\n")
    assert "<script" not in rendered and "<img" not in rendered


# ------------------------------------------------------------------- report and compare


def _records() -> list[Record]:
    """Records as another machine's file could hold them: every free-text field hostile."""
    evil = " ".join(HOSTILE[:10])
    case = Case(seqlen_q=16, heads_q=2, head_dim=32, name=evil)
    target = {"target_id": "evil|<script>x</script>", "vendor": "amd", "device_name": evil,
              "arch": "<img src=x onerror=alert(1)>", "runtime": "a|b\nc", "torch": evil,
              "libraries": {"flash_attn": evil}}
    backend = {"name": "k|<b>", "flavor": evil, "version": "\x1b[2J"}
    base = dict(case_id=case.case_id, case=case.to_dict(), backend=backend, target=target,
                suite=evil, profile="quick")
    metrics = {"time_ms": 1.0, "tflops": 2.0, "timing_method": evil, "timing_note": evil}
    return [Record(check="fwd", status="fail", reason=evil, metrics={"ratio": 3.0,
                                                                     "inert_features": [evil]},
                   **base),
            Record(check="bwd", status="skip", reason=evil, **base),
            Record(check="throughput", status="pass", metrics=metrics, **base)]


def test_the_report_keeps_hostile_text_from_records_inert():
    from harness.results.report import render

    records = _records()
    baseline = [Record(**{**r.__dict__, "status": "pass", "reason": ""}) for r in records]
    text = render(records, baseline=baseline)
    assert "\x1b" not in text and "\u202e" not in text
    rendered = render_html(text)
    assert_inert(rendered, _LIVE_TAGS)
    assert_tables_whole(rendered)
    assert rendered.count("<pre>") == 2  # the failure's case and replay command, nothing more


def test_compare_keeps_hostile_text_inert():
    from harness.results.compare import compare, render_markdown

    records = _records()
    baseline = [Record(**{**r.__dict__, "status": "pass"}) for r in records[:1]]
    text = render_markdown(compare(records, baseline))
    assert "Regressions" in text
    rendered = render_html(text)
    assert_inert(rendered, _LIVE_TAGS)
    assert_tables_whole(rendered)


def test_known_issue_and_jury_sections_keep_hostile_text_inert():
    from harness.case.known_issues import KnownIssue
    from harness.case.known_issues import section as known_section
    from harness.results.jury import JuryVerdict, section

    evil = " ".join(HOSTILE[:10])
    issue = KnownIssue(id="a|<b>", backend="k|<b>", link=evil, description=evil,
                       flavors=(evil,), source=evil)
    target = {"target_id": "t"}
    rec = Record(case_id="0" * 12, case={}, backend={"name": "k|<b>", "flavor": evil},
                 target=target,
                 check="fwd", status="pass")
    rendered = render_html(known_section([rec], [issue]))
    assert "matched nothing" in rendered
    assert_inert(rendered, _LIVE_TAGS)
    assert_tables_whole(rendered)
    verdict = JuryVerdict(case_id="0" * 12, label=evil, kind=evil, allowed=0.1,
                          to_reference={evil: 0.5, "ok": 0.0}, outlier=evil, finding=evil)
    rendered = render_html(section([verdict]))
    assert_inert(rendered, _LIVE_TAGS)
    assert_tables_whole(rendered)


# --------------------------------------------------------------------------------- TOML


def test_a_flavor_with_a_newline_stays_in_its_comment_of_a_regression_file(tmp_path):
    from harness.case.suites import load_file
    from harness.run.explore import write_regression

    case = Case(seqlen_q=5, heads_q=2, head_dim=32, causal=True)
    flavor = "x\n[[case]]\nseqlen_q = 1\r\nwindow = [1, 0]\x1b[2J\u2028[[case]]\x00"
    failing = [Record(case_id=case.case_id, case=case.to_dict(),
                      backend={"name": "k", "family": "flash-attn\n[[case]]", "flavor": flavor,
                               "version": "1\n[x]"},
                      target={"target_id": "t\n[[case]]", "device_name": "d\n"},
                      check="fwd", status="fail", reason=f"wrong\n[[case]]\n{flavor}")]
    path = write_regression(tmp_path, "k\n[[case]]", case, failing)
    text = path.read_text(encoding="utf-8")
    data = tomllib.loads(text)  # read back what was written
    assert len(data["case"]) == 1
    (loaded,) = load_file(path).cases
    assert loaded == case
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert len(comments) == 5 and all(ch.isprintable() for line in comments for ch in line)
    assert text.count("[[case]]\n") == 1


@settings(max_examples=60, deadline=None)
@given(name=st.text(), source=st.text(max_size=20))
def test_any_name_survives_toml_and_the_inline_case(name, source):
    from harness.case.suites import parse_inline_case

    case = Case(seqlen_q=7, heads_q=2, window=(3, 0), name=name, source=source)
    table = tomllib.loads(case.to_toml())["case"][0]
    assert case_from_dict(table) == case and table.get("name", "") == name
    inline = case.to_inline_toml()
    assert inline.isascii() and "\n" not in inline
    again = parse_inline_case(inline)
    assert again.name == name and again.source == source


# ----------------------------------------------------------------- malformed input files


def _one_line_exit_2(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("content", [
    b"\x00\x01\xff\xfe binary \x89PNG\r\n\x1a\n",
    "[[case]]\nseqlen_q = 4\nname = \"caf\u00e9\"\n".encode("latin-1"),
], ids=["binary", "latin-1"])
def test_a_suite_file_that_is_not_utf8_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    line = _one_line_exit_2(["run", "--suite", str(path), "--out", str(tmp_path / "out")], capsys)
    assert "bad.toml" in line and "not UTF-8" in line


def test_toml_nested_50000_deep_is_one_line(tmp_path, capsys):
    deep = "[" * 50_000 + "]" * 50_000
    path = tmp_path / "deep.toml"
    path.write_text(f"[[case]]\nseqlen_q = 4\nwindow = {deep}\n")
    line = _one_line_exit_2(["run", "--suite", str(path), "--out", str(tmp_path / "out")], capsys)
    assert "deep.toml" in line and "nested too deeply" in line
    line = _one_line_exit_2(["run", "--case", "{window = " + deep + "}", "--out",
                             str(tmp_path / "out")], capsys)
    assert "nested too deeply" in line
    from harness.case.known_issues import load_file

    issues = tmp_path / "known_issues.toml"
    issues.write_text(f"x = {deep}\n")
    with pytest.raises(InvalidCase, match="nested too deeply"):
        load_file(issues)


@pytest.fixture(scope="module")
def good_line(tmp_path_factory) -> str:
    """One valid record, as JSON text."""
    case = Case(seqlen_q=16, heads_q=2, head_dim=32)
    return Record(case_id=case.case_id, case=case.to_dict(), backend={"name": "sdpa-math"},
                  target={"target_id": "cpu-x86_64"}, check="fwd", status="pass").to_json()


@pytest.mark.parametrize("kind", ["deep", "surrogate"])
@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_results_file_too_deep_or_with_a_lone_surrogate_is_one_line(tmp_path, capsys,
                                                                       good_line, kind,
                                                                       command):
    good = tmp_path / "good.jsonl"
    good.write_text(good_line + "\n")
    if kind == "deep":
        bad_line = good_line[:-1] + ', "metrics": ' + "[" * 100_000 + "]" * 100_000 + "}"
    else:
        bad_line = good_line.replace('"reason": ""', '"reason": "half \\ud800 a pair"')
        assert "\\ud800" in bad_line
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good_line + "\n" + bad_line + "\n")
    argv = ["report", str(bad)] if command == "report" else \
        ["compare", str(bad), "--baseline", str(good)]
    line = _one_line_exit_2(argv, capsys)
    assert "bad.jsonl:2" in line
    assert ("nested too deeply" if kind == "deep" else "lone surrogate") in line
    with pytest.raises(RecordsError, match="bad.jsonl:2"):
        read_records(bad)


# ------------------------------------------------------------------------------ full disk


class _FullDisk:
    """A file on a full disk: every write fails with ENOSPC."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def test_a_full_disk_while_writing_the_report_is_one_line_and_keeps_the_records(
        tmp_path, capsys, monkeypatch):
    from harness.results import outdir

    out = tmp_path / "out"
    suite = tmp_path / "one.toml"
    suite.write_text("[[case]]\nseqlen_q = 16\nheads_q = 2\nhead_dim = 32\n")
    monkeypatch.setattr(outdir, "open_for_writing", _FullDisk)
    line = _one_line_exit_2(["run", "--backend", "sdpa-math", "--suite", str(suite),
                             "--checks", "fwd", "--explore", "0", "--out", str(out),
                             "--no-isolation"], capsys)
    assert "report.md" in line and "No space left on device" in line
    assert "the records are kept" in line
    assert [r.status for r in read_records(out / "results.jsonl")] == ["pass"]


def test_a_full_tmpfs_while_writing_the_report_is_a_records_error(tmp_path):
    """The same on a real full file system (a 64 KiB tmpfs), where one can be mounted."""
    from harness.run.session import write_report

    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace')}")
    try:
        filler = mount / "filler"
        with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
        records = _records()
        with pytest.raises(RecordsError, match="No space left on device.*records are kept"):
            write_report(records, mount)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# ------------------------------------------------------------------- suites too large


def _grid(tmp_path: Path, axes: dict[str, list]) -> Path:
    path = tmp_path / "grid.toml"
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in axes.items())
    path.write_text(f"[[grid]]\n{body}\n")
    return path


@pytest.fixture
def built(monkeypatch) -> list[int]:
    """Counts the cases suites build (``harness.case.suites._build`` calls)."""
    from harness.case import suites

    count = [0]
    real = suites._build

    def counting(values, label):
        count[0] += 1
        return real(values, label)

    monkeypatch.setattr(suites, "_build", counting)
    return count


@pytest.mark.timeout(60)
def test_a_grid_of_10_to_the_12_cases_is_refused_before_it_is_built(tmp_path, built):
    from harness.case.suites import load_file

    axis = list(range(1, 1001))
    path = _grid(tmp_path, {"seqlen_q": axis, "seqlen_k": axis, "heads_q": axis,
                            "batch": axis})
    start = time.perf_counter()
    with pytest.raises(InvalidCase, match=r"grid\.toml: holds 1,000,000,000,000 cases; grid 1 "
                                          r"alone is 1,000 x 1,000 x 1,000 x 1,000, more than "
                                          r"--max-cases 1,000,000"):
        load_file(path)
    assert built == [0]  # counted, not built (before: not done in 90 s)
    assert time.perf_counter() - start < 5


@pytest.mark.timeout(120)
def test_a_bad_last_value_of_a_large_grid_is_found_without_building_the_grid(tmp_path, built):
    from harness.case.suites import load_file

    # the bad value ends the first axis: the product reaches it after 999,000 cases
    path = _grid(tmp_path, {"head_dim": [*range(1, 1000), -5],
                            "seqlen_q": list(range(1, 1001))})
    with pytest.raises(InvalidCase, match=r"grid 1 \(.*head_dim=-5.*\): head_dim=-5 must be an "
                                          r"integer >= 1"):
        load_file(path)
    assert built[0] < 1000 + 1000  # each axis value tried once, not the 10^6 combinations


def test_max_cases_is_a_run_option_counting_every_suite(tmp_path, capsys):
    one = tmp_path / "one.toml"
    one.write_text("[[grid]]\nseqlen_q = [1, 2, 3]\n")
    two = tmp_path / "two.toml"
    two.write_text("[[case]]\nseqlen_q = 9\n[[case]]\nseqlen_q = 10\n")
    argv = ["run", "--suite", str(one), "--suite", str(two), "--out", str(tmp_path / "out")]
    line = _one_line_exit_2([*argv, "--max-cases", "4"], capsys)
    assert "two.toml: holds 2 cases, more than --max-cases 4 allows after the 3 case(s)" in line
    from harness.case.suites import iter_cases

    assert len(iter_cases([str(one), str(two)], max_cases=5)) == 5
    assert len(iter_cases([str(one), str(two)], max_cases=0)) == 5  # 0: no limit
