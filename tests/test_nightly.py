"""The nightly workflow's final job, reproduced locally from (synthetic) fixture artifacts.

The job runs ``.ci/nightly-baseline baseline`` (fetch the previous night's merged results with
``gh``) and ``.ci/nightly-merge artifacts baseline merged`` (``attn-harness report`` over every
leg, ``attn-harness compare`` against the previous night). These tests run the same two
scripts, with the fixtures under ``tests/fixtures/nightly`` (see its README) and a fake ``gh``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "nightly"
LEGS = ["results-cpu-x86_64-none", "results-cuda12.8-sm90-h100-cuda",
        "results-rocm6.3-gfx942-mi300x-rocm-ck"]
SOFTCAP_CASE = "80d3a221e43e"  # the case that regresses on the CK leg between the two nights
HARNESS = Path(sys.executable).parent / "attn-harness"


def has_compare() -> bool:
    result = subprocess.run([str(HARNESS), "compare", "--help"], capture_output=True, timeout=60)
    return result.returncode == 0


needs_compare = pytest.mark.skipif(not HARNESS.exists() or not has_compare(),
                                   reason="attn-harness compare is not available in this build")


def night(tmp_path: Path, *, baseline: bool = True) -> Path:
    """A working folder laid out like the final job's: artifacts/ and baseline/."""
    shutil.copytree(FIXTURES / "artifacts", tmp_path / "artifacts")
    if baseline:
        shutil.copytree(FIXTURES / "baseline", tmp_path / "baseline")
    else:
        (tmp_path / "baseline").mkdir()
    return tmp_path


def merge(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATTN_HARNESS": str(HARNESS)}
    return subprocess.run(["sh", str(REPO / ".ci" / "nightly-merge"), "artifacts", "baseline",
                           "merged"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_fixtures_are_marked_synthetic():
    assert "SYNTHETIC" in (FIXTURES / "README.md").read_text()
    for path in FIXTURES.rglob("results.jsonl"):
        for line in path.read_text().splitlines():
            assert '"synthetic":' in line, f"{path}: a record without extra.synthetic"


def test_merge_collects_every_leg_and_renders_one_report(tmp_path):
    cwd = night(tmp_path, baseline=False)
    result = merge(cwd)
    assert result.returncode == 0, result.stderr
    merged = cwd / "merged"
    assert sorted(p.name for p in (merged / "results").iterdir()) == LEGS
    for leg in LEGS:
        assert (merged / "results" / leg / "results.jsonl").read_bytes() == \
            (FIXTURES / "artifacts" / leg / "results.jsonl").read_bytes()
    report = (merged / "report.md").read_text()
    for target in ("rocm6.3-gfx942-mi300x", "cuda12.8-sm90-h100", "cpu-x86_64"):
        assert target in report
    summary = (merged / "summary.md").read_text()
    assert summary.startswith(report)
    assert "No earlier nightly results to compare with" in summary
    assert "3 leg(s) merged" in result.stderr


def test_merge_without_any_leg_says_so_and_exits_2(tmp_path):
    (tmp_path / "artifacts" / "results-broken-leg").mkdir(parents=True)  # a leg without results
    (tmp_path / "baseline").mkdir()
    result = merge(tmp_path)
    assert result.returncode == 2
    assert "no leg left a results file" in result.stderr
    assert "every leg failed" in (tmp_path / "merged" / "summary.md").read_text()


def test_merge_usage_is_one_line(tmp_path):
    result = subprocess.run(["sh", str(REPO / ".ci" / "nightly-merge")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "usage: .ci/nightly-merge ARTIFACTS BASELINE OUT"


@needs_compare
def test_merge_reports_last_nights_regression_and_fails(tmp_path):
    cwd = night(tmp_path)
    result = merge(cwd)
    assert result.returncode == 1, result.stderr
    compare = (cwd / "merged" / "compare.md").read_text()
    assert SOFTCAP_CASE in compare
    summary = (cwd / "merged" / "summary.md").read_text()
    assert "## Against run 1000 (synthetic)" in summary and compare in summary


@needs_compare
def test_merge_against_an_identical_night_passes(tmp_path):
    cwd = night(tmp_path, baseline=False)
    shutil.copytree(FIXTURES / "artifacts", cwd / "baseline" / "results")
    result = merge(cwd)
    assert result.returncode == 0, result.stderr + (cwd / "merged" / "compare.md").read_text()


def sharded_night(tmp_path: Path, shards: list[int]) -> Path:
    """Artifacts as the exhaustive profile's legs leave them: the H100 leg's (synthetic) records
    split over two shard legs, each uploading results/shard-I-of-2/results.jsonl, stamped with
    the shard, the share's task count and one run id as attn-harness run --shard writes them."""
    leg = FIXTURES / "artifacts" / "results-cuda12.8-sm90-h100-cuda" / "results.jsonl"
    records = [json.loads(line) for line in leg.read_text().splitlines()]
    tasks = sorted({r["case_id"] for r in records})  # one case per shard: its checks together
    parts = [[r for r in records if tasks.index(r["case_id"]) % 2 == i] for i in range(2)]
    for index in shards:
        folder = (tmp_path / "artifacts" / f"results-cuda12.8-sm90-h100-cuda-shard{index}"
                  / f"shard-{index}-of-2")
        folder.mkdir(parents=True)
        tasks = len({(r["case_id"], r["backend"]["name"]) for r in parts[index]})
        lines = [json.dumps({**r, "run_id": "sweep-0123456789ab", "shard": f"{index}/2",
                             "shard_tasks": tasks}) for r in parts[index]]
        (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "baseline").mkdir()
    return tmp_path


def test_merge_collects_the_shard_legs_and_names_their_shards(tmp_path):
    cwd = sharded_night(tmp_path, [0, 1])
    result = merge(cwd)
    assert result.returncode == 0, result.stderr
    legs = sorted(p.name for p in (cwd / "merged" / "results").iterdir())
    assert legs == ["results-cuda12.8-sm90-h100-cuda-shard0",
                    "results-cuda12.8-sm90-h100-cuda-shard1"]
    report = (cwd / "merged" / "report.md").read_text()
    assert "Run `sweep-0123456789ab` on `cuda12.8-sm90-h100`: shards: 2 of 2 (0,1)." in report


def test_merge_names_a_shard_whose_leg_left_nothing(tmp_path):
    cwd = sharded_night(tmp_path, [1])
    result = merge(cwd)
    assert result.returncode == 0, result.stderr
    report = (cwd / "merged" / "report.md").read_text()
    assert "shards: 1 of 2 (1); missing 0/2: no record" in report


# ------------------------------------------------------------------------ nightly-baseline

FAKE_GH = """#!/bin/sh
# A stand-in for the gh CLI: logs its arguments, lists runs, downloads from a fixture folder.
echo "$*" >> "$FAKE_GH_LOG"
case "$1 $2" in
    "run list") printf '%s\\n' $FAKE_GH_RUNS ;;
    "run download")
        id=$3
        while [ $# -gt 0 ]; do
            case "$1" in --dir) dir=$2 ;; --name) name=$2 ;; esac
            shift
        done
        [ "$id" = "$FAKE_GH_HAS" ] && [ "$name" = nightly-merged ] || {
            echo "no valid artifacts found to download" >&2; exit 1; }
        cp -R "$FAKE_GH_FROM"/. "$dir"/ ;;
    *) echo "fake gh: unexpected: $*" >&2; exit 3 ;;
esac
"""


def fetch_baseline(tmp_path: Path, runs: str, has: str) -> tuple[subprocess.CompletedProcess,
                                                                   list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gh").write_text(FAKE_GH)
    (bin_dir / "gh").chmod(0o755)
    log = tmp_path / "gh.log"
    log.touch()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FAKE_GH_LOG": str(log), "FAKE_GH_RUNS": runs, "FAKE_GH_HAS": has,
           "FAKE_GH_FROM": str(FIXTURES / "baseline"), "GITHUB_REPOSITORY": "team/attn-harness",
           "GITHUB_RUN_ID": "103", "BRANCH": "main"}
    result = subprocess.run(["sh", str(REPO / ".ci" / "nightly-baseline"), "baseline"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return result, log.read_text().splitlines()


def test_baseline_walks_back_past_this_run_and_expired_artifacts(tmp_path):
    result, calls = fetch_baseline(tmp_path, runs="103 102 101", has="101")
    assert result.returncode == 0, result.stderr
    assert calls[0].startswith("run list --repo team/attn-harness --workflow nightly.yml "
                               "--branch main --status completed")
    assert [c.split()[2] for c in calls[1:]] == ["102", "101"]  # 103 is this run: not asked
    assert (tmp_path / "baseline" / "FROM").read_text().strip() == "run 101"
    assert sorted(p.name for p in (tmp_path / "baseline" / "results").iterdir()) == LEGS
    assert "baseline is run 101's nightly-merged" in result.stderr


def test_baseline_none_found_is_not_an_error(tmp_path):
    result, calls = fetch_baseline(tmp_path, runs="103", has="")
    assert result.returncode == 0
    assert "nothing to compare with" in result.stderr
    assert list((tmp_path / "baseline").iterdir()) == []
    assert len(calls) == 1


def test_info_target_id_names_the_artifacts():
    """Each leg names its artifact results-<target id>-<flavor> from this one line."""
    result = subprocess.run([str(HARNESS), "info", "--target-id"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"(cpu-[a-z0-9_-]+|rocm\d+\.\d+-gfx[0-9a-z]+-[a-z0-9-]+|"
                        r"cuda\d+\.\d+-sm\d+-[a-z0-9-]+)\n", result.stdout), result.stdout
