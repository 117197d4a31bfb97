"""Known issues: matching and strict expected failures."""

from __future__ import annotations

from dataclasses import replace

import pytest

from harness import known_issues
from harness.case import Case
from harness.errors import InvalidCase
from harness.records import Record
from harness.runner import expected_failure
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
    with pytest.raises(InvalidCase, match="k.toml, issue 1: 'link' is required"):
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
