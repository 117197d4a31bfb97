"""Known issues: matching and strict expected failures."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import pytest

from harness.case import Case, known_issues
from harness.errors import InvalidCase
from harness.results.records import Record
from harness.run.worker import expected_failure
from harness.target import Target

CK = {"name": "flash-attn", "flavor": "rocm-ck", "version": "2.7.4"}
MI300X = Target(vendor="amd", device_name="AMD Instinct MI300X", arch="gfx942",
                runtime_version="6.2")


def test_the_shipped_file_parses_and_matches_ck_softcap():
    issues = known_issues.load()
    assert {i.id for i in issues} >= {"ck-softcap-ignored"}
    case = Case(seqlen_q=16, softcap=5.0)
    found = known_issues.match(case, CK, MI300X)
    assert found is not None and found.id == "ck-softcap-ignored"
    assert known_issues.match(case.replace(softcap=0.0), CK, MI300X) is None
    assert known_issues.match(case, {**CK, "flavor": "cuda"}, MI300X) is None


@pytest.mark.parametrize(("value", "want", "matches"), [
    (5.0, ">0", True), (0.0, ">0", False), (128, ">=128", True), (64, "!=64", False),
    ("float16", ["float16", "bfloat16"], True), (True, True, True), ([4, 0], [4, 0], True),
])
def test_predicates(value, want, matches):
    assert known_issues.matches_value(value, want) is matches


def test_version_ranges():
    assert known_issues.version_in("2.8.3", ">=2.6.0, <3")
    assert not known_issues.version_in("2.5.9.post1", ">=2.6.0, <3")
    assert not known_issues.version_in("", ">=2.6")  # an unknown version matches no range
    with pytest.raises(InvalidCase, match="is not like"):
        known_issues.version_in("2.8", "about 2.8")


def test_malformed_entries_are_named():
    with pytest.raises(InvalidCase, match=r"k.toml, issue 1 \(x\): 'link' is required"):
        known_issues.parse({"issue": [{"id": "x", "backend": "b"}]}, "k.toml")
    with pytest.raises(InvalidCase, match="'when' has unknown case field 'softcaps'"):
        known_issues.parse({"issue": [{"id": "x", "backend": "b", "link": "l",
                                       "when": {"softcaps": ">0"}}]}, "k.toml")


def _record(status: str, check: str = "fwd") -> Record:
    return Record(case_id="c", case={}, backend=CK, target={"target_id": "t"}, check=check,
                  status=status, reason="why")


def test_matching_cases_are_strict_expected_failures():
    assert expected_failure(_record("fail"), "k (link)").status == "xfail"
    fixed = expected_failure(_record("pass"), "k (link)")
    assert fixed.status == "xpass" and "may be fixed" in fixed.reason
    assert expected_failure(_record("pass", "throughput"), "k").status == "pass"
    assert expected_failure(_record("skip"), "k").status == "skip"
    assert replace(_record("crash")).status == "crash"
    assert expected_failure(_record("crash"), "k").status == "crash"  # a crash is never expected


def test_non_strict_entries_expect_failures_without_demanding_them():
    assert expected_failure(_record("fail"), "k", strict=False).status == "xfail"
    assert expected_failure(_record("pass"), "k", strict=False).status == "pass"


def test_checks_and_strict_keys_are_validated():
    (issue,) = known_issues.parse({"issue": [{"id": "x", "backend": "b", "link": "l",
                                              "checks": ["bwd"], "strict": False}]}, "k.toml")
    assert issue.checks == ("bwd",) and issue.strict is False
    with pytest.raises(InvalidCase, match="'checks' has 'speed'"):
        known_issues.parse({"issue": [{"id": "x", "backend": "b", "link": "l",
                                       "checks": ["speed"]}]}, "k.toml")


def test_a_derived_property_selects_cudnn_rows_without_keys():
    cudnn = {"name": "sdpa-cudnn", "flavor": "cuda", "version": "2.11.0+cu130"}
    h200 = Target(vendor="nvidia", device_name="NVIDIA H200", arch="sm_90", runtime_version="13.0")
    # The smoke case where cuDNN failed: 203 queries, 113 keys, causal -> 90 rows see no key.
    leading = Case(batch=2, seqlen_q=203, seqlen_k=113, heads_q=4, head_dim=64, causal=True)
    found = known_issues.match(leading, cudnn, h200)
    assert found is not None and found.id == "cudnn-rows-without-keys"
    assert known_issues.match(leading.replace(seqlen_q=113), cudnn, h200) is None  # every row sees
    assert known_issues.match(leading.replace(alibi=True), cudnn, h200) is None  # zeros with ALiBi
    with pytest.raises(InvalidCase, match="rows_without_key"):
        known_issues.parse({"issue": [{"id": "x", "backend": "b", "link": "l",
                                       "when": {"rows_without_key": True}}]}, "f.toml")


def test_an_entry_for_one_check_does_not_hide_an_entry_for_another():
    """The shipped sdpa-flash entries: the backward one (every case) comes first and used to be
    the only match, so the forward one for ill-conditioned float32 never applied and the case's
    fwd failure stayed a failure."""
    cpu_flash = {"name": "sdpa-flash", "flavor": "cpu", "version": "2.13.0+cpu"}
    cpu = Target(vendor="cpu", device_name="AMD EPYC", arch="x86_64")
    case = Case(batch=8193, seqlen_q=2, seqlen_k=2, heads_q=8, head_dim=16, dtype="float32",
                window=(0, 7), layout="packed-kv", values="scaled", value_scale=100.0)
    assert known_issues.match(case, cpu_flash, cpu, check="bwd").id == \
        "torch-cpu-flash-backward-precision"
    assert known_issues.match(case, cpu_flash, cpu, check="fwd").id == \
        "torch-cpu-flash-forward-float32-ill-conditioned"
    assert known_issues.match(case.replace(values="normal", value_scale=None), cpu_flash, cpu,
                              check="fwd") is None  # well-conditioned float32 stays judged
    assert known_issues.match(case, cpu_flash, cpu, check="determinism") is None


# ------------------------------------------------- files: validation, project entries, report

GOOD = '''# a comment
[[issue]]
id = "first"
backend = "sdpa-math"
link = "l"
when = { head_dim = 8 }

[[issue]]
id = "second"
backend = "sdpa-math"
link = "l"
{line}
'''


@pytest.mark.parametrize(("bad", "where", "says"), [
    ('when = { features = "causal" }', r"k\.toml:12, issue 2 \(second\)",
     "'features' is 'causal'; it must be a list"),
    ('when = { head_dim = ">=abc" }', r"k\.toml:12, issue 2 \(second\)",
     "head_dim = '>=abc' is not a comparison like '>=128'"),
    ('when = { causal = "yes" }', r"k\.toml:12, issue 2 \(second\)", "causal = 'yes' must be true"),
    ('checks = "fwd"', r"k\.toml:12, issue 2 \(second\)", "'checks' is 'fwd'; it must be a list"),
    ('flavour = ["cpu"]', r"k\.toml:12, issue 2 \(second\)",
     "unknown key 'flavour' \\(did you mean 'flavors'"),
    ('strict = 1', r"k\.toml:12, issue 2 \(second\)", "'strict' is 1"),
    ('when = { features = ["causall"] }', r"k\.toml:12", "feature 'causall' is not one of"),
    ('id = 3', r"k\.toml:11, issue 2:", "'id' is required"),
    ('when = { head_dim = 64 ', r"k\.toml:12:\d+: not valid TOML", "fix the syntax"),
])
def test_a_broken_known_issues_file_names_file_line_and_key(tmp_path, bad, where, says):
    path = tmp_path / "k.toml"
    text = GOOD.replace('id = "second"\n', "") if bad.startswith("id =") else GOOD
    path.write_text(text.replace("{line}", bad))
    with pytest.raises(InvalidCase, match=where) as info:
        known_issues.validate([path])
    assert "\n" not in str(info.value)
    assert re.search(says, str(info.value)), str(info.value)


def test_a_good_file_validates_and_entries_know_their_line(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(GOOD.replace("{line}", 'when = { head_dim = [8, 16], softcap = ">0" }'))
    first, second = known_issues.validate([path])
    assert first.source.endswith("k.toml:3") and second.source.endswith("k.toml:9")


def test_the_shipped_file_and_the_project_file_both_count(tmp_path, monkeypatch):
    shipped = known_issues.load()
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "known_issues.toml").write_text(GOOD.replace("{line}", ""))
    monkeypatch.chdir(tmp_path)
    both = known_issues.load()
    assert [i.id for i in both] == [i.id for i in shipped] + ["first", "second"]
    assert known_issues.default_paths()[0] == known_issues.shipped_path()
    assert known_issues.match(Case(seqlen_q=4, head_dim=8), {"name": "sdpa-math"},
                              MI300X).id == "first"
    (tmp_path / "cases" / "known_issues.toml").write_text(
        GOOD.replace("{line}", "").replace('"second"', '"ck-softcap-ignored"'))
    with pytest.raises(InvalidCase, match="'ck-softcap-ignored' is already the id"):
        known_issues.validate()


def test_records_carry_the_matched_entry_and_the_report_lists_the_rest(tmp_path, monkeypatch):
    from harness.run.worker import Task, execute
    from harness.target import detect

    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "known_issues.toml").write_text(
        GOOD.replace("{line}", "when = { head_dim = 512 }"))
    monkeypatch.chdir(tmp_path)
    case = Case(seqlen_q=4, heads_q=1, head_dim=8, dtype="float32")
    records = [r for kind, r in execute(Task("t", case, "sdpa-math", ("fwd",)), detect(), {})
               if kind == "record"]
    (record,) = records
    assert record.metrics["known_issue"] == "first"
    assert record.status == "xpass"
    assert "cases/known_issues.toml:3" in record.reason
    stale = known_issues.unmatched(records, known_issues.load())
    assert [i.id for i in stale] == ["second"]  # consulted (sdpa-math here), matched nothing
    text = known_issues.section(records, known_issues.load())
    assert "## Known issues that matched nothing" in text and "`second`" in text
    assert "`first`" not in text and "ck-softcap-ignored" not in text  # other backends: silent
    from harness.results.report import render

    assert "`second`" in render(records, known_issues=known_issues.load())
    assert "matched nothing" not in render(records)


def test_cases_dir_known_issues_reach_the_workers(tmp_path, monkeypatch):
    from harness.case import suites

    (tmp_path / "known_issues.toml").write_text(GOOD.replace("{line}", ""))
    monkeypatch.setenv(suites.PROJECT_DIR_ENV, "")  # restored after the test
    try:
        suites.set_project_dir(tmp_path)
        assert known_issues.default_paths()[-1] == tmp_path.resolve() / "known_issues.toml"
        inherited = os.environ[suites.PROJECT_DIR_ENV]  # what a spawned worker starts with
    finally:
        suites.set_project_dir(None)
    monkeypatch.setenv(suites.PROJECT_DIR_ENV, inherited)  # in the worker: no set_project_dir
    assert [i.id for i in known_issues.load()][-2:] == ["first", "second"]
