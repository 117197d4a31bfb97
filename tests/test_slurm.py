"""The repository's Slurm launcher on a real one-node Slurm cluster started here.

tests/slurm_cluster.py starts slurmctld, slurmd and munged (Debian's ``slurm-wlm`` and ``munge``)
on localhost with a private configuration. ``launchers/slurm/submit.sh`` then runs, as the
README says, a sweep over a handful of small cases on sdpa-math (fwd, two explored cases per
shard) as one shard, as a 4-task array, and as a 4-task array with one index cancelled; each
with its merge job (afterany). Runs where a cluster can start: as root with the two packages
installed (.ci/run installs them in CI); elsewhere each test is skipped saying why.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurm, missing

REPO = Path(__file__).resolve().parent.parent
SUBMIT = REPO / "launchers" / "slurm" / "submit.sh"
SUITE = """\
[defaults]
heads_q = 2
head_dim = 32
[[case]]
seqlen_q = 32
causal = true
[[case]]
seqlen_q = 17
seqlen_k = 70
[[case]]
seqlen_q = 64
window = [16, 0]
[[case]]
seqlen_q = 48
seqlen_k = 24
causal = true
[[case]]
seqlen_q = 40
alibi = true
[[case]]
seqlen_q = 30
softcap = 4.0
[[case]]
batch = 3
seqlen_q = 16
heads_q = 4
heads_kv = 1
[[case]]
seqlen_q = 1
seqlen_k = 90
"""

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(missing()), reason=f"no local Slurm: {missing()}")]


def submit(cluster: LocalSlurm, root: Path, name: str, shards: int, sbatch: str = ""
           ) -> tuple[str, str, Path]:
    """``launchers/slurm/submit.sh`` as a user types it; returns the array and merge job ids
    and the sweep's folder."""
    out = root / name
    env = cluster.env(ATTN_HARNESS=str(Path(sys.executable).parent / "attn-harness"),
                      ATTN_HARNESS_OUT=str(out), CI="1",
                      # one node here: let the shards share it, as several nodes would not
                      SWEEP_SBATCH_OPTIONS=f"--oversubscribe {sbatch}".strip())
    result = cluster.run("sh", str(SUBMIT), str(shards), "--backend", "sdpa-math", "--suite",
                         str(root / "small.toml"), "--checks", "fwd", "--explore", "2",
                         "--regressions", str(root / "regressions"), cwd=root, env=env)
    jobs = re.match(r"array (\d+) \(.*\), merge (\d+): ", result.stdout)
    assert jobs, result.stdout + result.stderr
    return jobs.group(1), jobs.group(2), out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    (root / "small.toml").write_text(SUITE)
    with LocalSlurm(root / "cluster") as slurm:
        whole = submit(slurm, root, "whole", 1)
        sweep = submit(slurm, root, "sweep", 4)
        held = submit(slurm, root, "cancelled", 4, "--hold")
        slurm.run("scancel", f"{held[0]}_2")  # kill one array task (before it starts: no race)
        slurm.run("scontrol", "release", held[0])
        slurm.wait_all(timeout_s=900)
        states = {job: slurm.states(job) for job in (whole[0], sweep[0], held[0], held[1])}
        yield root, whole, sweep, held, states


def records(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(out.glob("shard-*/results.jsonl"))
            for line in path.read_text().splitlines()]


def tasks(recs: list[dict]) -> list[tuple[str, str, str, str]]:
    return sorted((r["case_id"], r["backend"]["name"], r["check"], r["status"]) for r in recs
                  if r["suite"] != "explore")


def test_the_array_ran_every_task_of_the_whole_run_once(cluster):
    root, whole, sweep, _, states = cluster
    assert set(states[sweep[0]].values()) == {"COMPLETED"} and len(states[sweep[0]]) == 4
    shards = records(sweep[2])
    assert tasks(shards) == tasks(records(whole[2]))   # same case ids, same statuses
    assert len(tasks(shards)) == len(set(tasks(shards)))  # no task ran twice
    assert {r["shard"] for r in shards} == {f"{i}/4" for i in range(4)}
    assert len({r["run_id"] for r in shards}) == 1
    explored = [r["case_id"] for r in shards if r["suite"] == "explore"]
    assert len(set(explored)) >= 4 * 2 - 1  # each shard explored its own two cases


def test_the_merge_job_names_all_four_shards(cluster):
    sweep = cluster[2]
    report = (sweep[2] / "report.md").read_text()
    assert "shards: 4 of 4 (0,1,2,3)." in report and "missing" not in report
    whole = (cluster[1][2] / "report.md").read_text()
    assert "shards: 1 of 1 (0)." in whole


def test_a_cancelled_array_task_is_named_missing_in_the_merged_report(cluster):
    _, _, _, held, states = cluster
    # a task cancelled while pending leaves the array's list, or stays as CANCELLED
    assert states[held[0]].pop(f"{held[0]}_2", "CANCELLED") == "CANCELLED"
    assert sorted(states[held[0]].values()) == ["COMPLETED"] * 3
    assert states[held[1]][held[1]] == "COMPLETED"  # the merge ran after it (afterany)
    assert not (held[2] / "shard-2-of-4").exists()
    report = (held[2] / "report.md").read_text()
    assert "shards: 3 of 4 (0,1,3); missing 2/4: no record" in report
