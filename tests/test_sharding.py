"""A sharded sweep end to end on this CPU: the command line and the pytest plugin in subprocesses.

One module-scoped set of runs over a small suite on sdpa-math (fwd only, one explored case per
shard) is shared by every test: the whole run, shard 0/2 given explicitly, shard 1/2 taken from
the environment a Kubernetes Indexed Job gives its pods (``JOB_COMPLETION_INDEX`` with the count
from ``ATTN_HARNESS_SHARD_COUNT``, as ``launchers/kubernetes/`` sets it), and the plugin's two
shares. The real Slurm cluster is tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SUITE = """\
[defaults]
heads_q = 2
head_dim = 16
[[case]]
seqlen_q = 16
[[case]]
seqlen_q = 33
seqlen_k = 65
causal = true
[[case]]
seqlen_q = 64
seqlen_k = 48
window = [8, 0]
[[case]]
seqlen_q = 40
alibi = true
[[case]]
seqlen_q = 24
softcap = 5.0
[[case]]
batch = 3
seqlen_q = 20
seqlen_k = 70
heads_q = 4
heads_kv = 2
"""
COMMON = ("--backend", "sdpa-math", "--checks", "fwd", "--explore", "1")


def harness(*args: str, cwd: Path, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "JOB_COMPLETION_INDEX", "ATTN_HARNESS_SHARD"))}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd,
                          env={**environ, "CI": "1", **(env or {})}, capture_output=True,
                          text=True, timeout=600)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def suite_tasks(records: list[dict]) -> list[tuple[str, str, str]]:
    return sorted((r["case_id"], r["check"], r["status"]) for r in records
                  if r["suite"] != "explore")


def indexed_job_env() -> dict[str, str]:
    """What the Kubernetes manifest gives pod 1: its env entries and the Job controller's
    JOB_COMPLETION_INDEX (set on every pod of an Indexed Job)."""
    job = yaml.safe_load((REPO / "launchers" / "kubernetes" / "sweep-rocm.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}
    assert env["ATTN_HARNESS_SHARD_COUNT"] == str(job["spec"]["completions"])
    assert "auto" in container["args"][container["args"].index("--shard") + 1]
    env["ATTN_HARNESS_SHARD_COUNT"] = "2"  # this test's sweep has two shards
    return {**env, "JOB_COMPLETION_INDEX": "1"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    suite = root / "small.toml"
    suite.write_text(SUITE)
    common = (*COMMON, "--suite", str(suite), "--regressions", str(root / "regr"))
    whole = harness("run", *common, "--out", str(root / "whole"), cwd=root)
    zero = harness("run", *common, "--shard", "0/2", "--out", str(root / "shards"), cwd=root)
    one = harness("run", *common, "--shard", "auto", "--out", str(root / "shards"), cwd=root,
                  env=indexed_job_env())
    for result in (whole, zero, one):
        assert result.returncode == 0, result.stderr[-3000:]
    return root, whole, zero, one


def shard_file(root: Path, index: int) -> Path:
    return root / "shards" / f"shard-{index}-of-2" / "results.jsonl"


def test_the_shards_together_ran_what_the_whole_run_ran_each_task_once(sweep):
    root, _, zero, one = sweep
    whole = lines(root / "whole" / "results.jsonl")
    parts = [lines(shard_file(root, i)) for i in range(2)]
    union = suite_tasks(parts[0] + parts[1])
    assert union == suite_tasks(whole)  # same case ids, checks and statuses
    assert len(union) == len(set(union))  # no task ran twice
    assert all(suite_tasks(p) for p in parts)  # both shares hold tasks
    for i, part in enumerate(parts):
        assert {r["shard"] for r in part} == {f"{i}/2"}
        assert {r["shard_tasks"] for r in part} == {len(suite_tasks(part))}
        assert all(r["seconds"] >= 0 for r in part)
    run_ids = {r["run_id"] for p in parts for r in p}
    assert len(run_ids) == 1 and run_ids.pop().startswith("sweep-")
    assert not any("shard" in r or "run_id" in r for r in whole)  # unsharded: as before
    assert "shard 1/2 of run sweep-" in one.stderr and "packed by the harness's cost" in one.stderr


def test_each_shard_explores_its_own_part(sweep):
    root, whole, zero, one = sweep
    explored = [{r["case_id"] for r in lines(shard_file(root, i)) if r["suite"] == "explore"}
                for i in range(2)]
    assert all(len(ids) == 1 for ids in explored) and explored[0] != explored[1]
    assert "(shard 0/2: its part of 2)" in zero.stderr
    assert "explored 1 generated case(s) (1 distinct) (shard 1/2's part)" in one.stderr


def report(*files: Path, cwd: Path) -> str:
    result = harness("report", *map(str, files), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_report_merges_the_shards_into_one_column_and_names_them(sweep):
    root = sweep[0]
    text = report(shard_file(root, 0), shard_file(root, 1), cwd=root)
    assert "shards: 2 of 2 (0,1)." in text and "missing" not in text
    matrix = text.split("## Portability matrix")[1].split("##")[0]
    header = next(line for line in matrix.splitlines() if line.startswith("| case"))
    # one column for the setup and backend, not one per shard
    assert header.count("sdpa-math") == 1 and header.count("|") == 3, header


def test_a_missing_shard_is_named_in_the_report_and_its_tasks_missing_in_compare(sweep):
    root = sweep[0]
    text = report(shard_file(root, 0), cwd=root)
    assert "**Run `sweep-" in text and "shards: 1 of 2 (0); missing 1/2: no record" in text
    result = harness("compare", str(shard_file(root, 0)), "--allow-missing", "--baseline",
                     str(root / "whole" / "results.jsonl"), cwd=root)
    assert result.returncode == 1, result.stdout  # missing even with --allow-missing
    assert "lacks shard(s) 1 of 2: its tasks count as missing" in result.stdout
    ok = harness("compare", str(shard_file(root, 0)), str(shard_file(root, 1)), "--baseline",
                 str(root / "whole" / "results.jsonl"), cwd=root)
    assert ok.returncode == 0, ok.stdout  # the whole sweep against the whole run: no change


def test_a_shard_resumes_its_own_share_and_a_rerun_replaces_only_it(sweep):
    root, _, zero, _ = sweep
    common = (*COMMON, "--suite", str(root / "small.toml"), "--regressions", str(root / "regr"),
              "--out", str(root / "shards"))
    before = [shard_file(root, i).read_bytes() for i in range(2)]
    resumed = harness("run", *common, "--shard", "0/2", "--resume", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "task(s) to go" in resumed.stderr and ", 0 task(s) to go" in resumed.stderr
    assert shard_file(root, 0).read_bytes() == before[0]  # nothing ran again
    again = harness("run", *common, "--shard", "1/2", cwd=root)  # Slurm re-runs index 1
    assert again.returncode == 0, again.stderr[-2000:]
    assert shard_file(root, 0).read_bytes() == before[0]
    rerun = lines(shard_file(root, 1))
    assert suite_tasks(rerun) == suite_tasks([json.loads(x) for x in before[1].splitlines()])
    assert {r["run_id"] for r in rerun} == {r["run_id"] for r in lines(shard_file(root, 0))}
    wrong = harness("run", *common, "--shard", "1/2", "--resume", "--run-id", "other", cwd=root)
    assert wrong.returncode == 2 and "its records are of run sweep-" in wrong.stderr


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--shard", "2/2"], {}, "could not parse '2/2': the shard index is 0-based: 0 <= I < N, "
                             "so 0..1 for N=2, got 2"),
    (["--shard", "auto"], {}, "--shard auto: no scheduler variable is set; looked for "
                              "SLURM_ARRAY_TASK_ID"),
    (["--shard", "auto"], {"JOB_COMPLETION_INDEX": "0"}, "give --shard auto/N or set "
                                                         "ATTN_HARNESS_SHARD_COUNT=N"),
    (["--durations", "x.jsonl"], {}, "--durations balances the shares of a sharded run"),
    (["--shard", "0/2", "--durations", "missing.jsonl"], {},
     "--durations missing.jsonl: no such file or directory"),
    (["--run-id", "a b"], {}, "could not parse 'a b': a run id is"),
])
def test_bad_shard_options_are_one_line_and_exit_2(tmp_path, args, env, message):
    result = harness("run", *args, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------- the plugin


@pytest.fixture(scope="module")
def plugin_shards(sweep):
    root = sweep[0]
    tests = root / "parity"
    tests.mkdir()
    for name in ("test_cases.py", "test_explore.py"):
        (tests / name).write_text((REPO / "harness" / "parity" / name).read_text())
    out = []
    for index in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-rA",
             str(tests), "--attn-backend", "sdpa-math", "--attn-checks", "fwd",
             "--attn-explore", "1", f"--attn-suite={root / 'small.toml'}",
             f"--attn-shard={index}/2", f"--attn-out={root / 'plugin'}",
             f"--attn-regressions={root / 'regr'}"],
            cwd=root, env={**os.environ, "CI": "1"}, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:]
        out.append(result.stdout)
    return root, out


def test_the_plugins_shards_split_the_case_tests_and_each_explores(plugin_shards):
    root, outputs = plugin_shards
    ran = [{line.split()[1] for line in text.splitlines()
            if line.startswith(("PASSED", "SKIPPED")) and "test_cases.py" in line}
           for text in outputs]
    cli = [lines(shard_file(root, i)) for i in range(2)]
    for i, text in enumerate(outputs):
        assert "PASSED" in text and "test_explore.py::test_explore[sdpa-math]" in text
        assert f"{len(suite_tasks(cli[1 - i]))} deselected" in text
        records = lines(root / "plugin" / f"shard-{i}-of-2" / "results.jsonl")
        assert {r["shard"] for r in records} == {f"{i}/2"}
        # the same partition as the command line's: the same cases in shard i
        assert {r["case_id"] for r in records if r["suite"] != "explore"} == \
            {r["case_id"] for r in cli[i] if r["suite"] != "explore"}
    assert not ran[0] & ran[1]
