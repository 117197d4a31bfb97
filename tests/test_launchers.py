"""The launchers in launchers/: Kubernetes manifests valid against the Kubernetes schemas, and
the Slurm scripts' shape (tests/test_slurm.py runs them on a real one-node cluster;
tests/test_sharding.py runs the harness with the environment the Indexed Job gives its pods).

``kubernetes-validate`` (the test extra) carries the Kubernetes JSON schemas; a missing tool fails
here rather than skipping, as tests/test_workflows.py does for actionlint.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_workflows import tool

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "launchers" / "kubernetes"
SLURM = REPO / "launchers" / "slurm"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
DEVICES = {"sweep-rocm.yaml": "amd.com/gpu", "sweep-cuda.yaml": "nvidia.com/gpu"}


def validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("kubernetes-validate"), "--strict", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def test_the_manifests_are_valid_kubernetes_objects():
    assert {p.name for p in MANIFESTS} >= {*DEVICES, "merge.yaml", "results-pvc.yaml"}
    result = validate(*MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == len(MANIFESTS)


def test_the_validation_is_not_blind(tmp_path):
    job = yaml.safe_load((KUBERNETES / "sweep-rocm.yaml").read_text())
    job["spec"]["completionMode"] = "Sharded"          # not an enum value
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8  # not a field
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(job))
    result = validate(bad)
    assert result.returncode != 0
    assert "gpus" in result.stdout + result.stderr


@pytest.mark.parametrize("name", DEVICES)
def test_the_indexed_jobs_request_gpus_and_take_their_share(name):
    job = yaml.safe_load((KUBERNETES / name).read_text())
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    (container,) = spec["template"]["spec"]["containers"]
    assert set(container["resources"]["limits"]) == {DEVICES[name]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ATTN_HARNESS_SHARD_COUNT"] == str(spec["completions"])  # what auto reads
    args = container["args"]
    assert args[:3] == ["run", "--shard", "auto"] and "--devices" in args
    assert args[args.index("--devices") + 1] == "all"
    out = args[args.index("--out") + 1]
    merge = yaml.safe_load((KUBERNETES / "merge.yaml").read_text())
    assert f"{out}/shard-*/results.jsonl" in merge["spec"]["template"]["spec"]["containers"][0][
        "args"][0]


def test_the_slurm_scripts_parse_and_chain_the_merge_after_any_end():
    for script in ("sweep.sbatch", "merge.sbatch"):
        subprocess.run(["bash", "-n", str(SLURM / script)], check=True, timeout=30)
    subprocess.run(["sh", "-n", str(SLURM / "submit.sh")], check=True, timeout=30)
    sweep = (SLURM / "sweep.sbatch").read_text()
    assert 'run --shard auto --devices all --out "$out" "$@"' in sweep
    assert "#SBATCH --nodes=1" in sweep and "#SBATCH --exclusive" in sweep
    submit = (SLURM / "submit.sh").read_text()
    assert '--array="0-$((shards - 1))"' in submit and '--dependency="afterany:$array"' in submit


def test_submit_says_how_to_use_it():
    result = subprocess.run(["sh", str(SLURM / "submit.sh")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("usage: launchers/slurm/submit.sh N [attn-harness run "
                                     "options...] (N >= 1 shards)")
