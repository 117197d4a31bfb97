"""A normal install works anywhere: the built wheel carries the suites, known issues, schema and
parity tests; installed into a fresh virtual environment, `attn-harness run` works from an empty
folder, the shipped parity tests run, and an unrelated project's pytest imports nothing of the
harness.

The fresh environment gets the wheel with ``pip install --no-deps``; its dependencies (torch,
pytest, hypothesis, tabulate) come from this checkout's environment through a ``.pth`` line,
because installing torch again would download gigabytes. That line adds the directory only: the
editable install of this checkout there (its finder ``.pth``) is not processed, so ``harness``
resolves to the wheel. Slow (about a minute); `.ci/run` runs it.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _run(cmd, cwd: Path, timeout: float = 600, env: dict | None = None):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                   "-q", "-w", out, REPO], cwd=build)
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("attn_harness-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin directory."""
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(root)
    bindir = root / "bin"
    purelib = subprocess.run([bindir / "python", "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = list(dict.fromkeys(p for p in sys.path if p.endswith("site-packages")
                              and Path(p).is_dir()))
    assert any(Path(p, "torch").is_dir() for p in deps), "torch is not installed here"
    Path(purelib, "attn_harness_test_deps.pth").write_text("\n".join(deps) + "\n")
    result = _run([bindir / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                   wheel], cwd=root)
    assert result.returncode == 0, result.stderr
    return bindir


def test_the_wheel_carries_suites_known_issues_schema_and_parity_tests(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped_suites = {p.name for p in (REPO / "harness" / "case" / "library").glob("*.toml")}
    assert shipped_suites >= {"smoke.toml", "edge.toml", "models.toml", "known_issues.toml"}
    for name in shipped_suites:
        assert f"harness/case/library/{name}" in names, name
    for path in (REPO / "harness" / "case" / "library" / "regressions").glob("*.toml"):
        assert f"harness/case/library/regressions/{path.name}" in names
    for name in ("harness/results/schema/records.schema.json", "harness/py.typed",
                 "harness/parity/test_cases.py", "harness/parity/test_explore.py",
                 "attn_harness_pytestplugin.py"):
        assert name in names, name
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "attn_harness = attn_harness_pytestplugin" in text
    assert "attn-harness = harness.cli:main" in text


def test_installed_run_info_report_and_compare_work_from_an_empty_folder(installed, tmp_path):
    harness = installed / "attn-harness"
    result = _run([harness, "run", "--backend", "sdpa-math", "--checks", "fwd", "--explore", "2",
                   "--out", "out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "explored 2 generated case(s)" in result.stderr  # smoke suite + exploration
    results = tmp_path / "out" / "results.jsonl"
    assert len(results.read_text().splitlines()) > 10
    assert "## Verdicts" in (tmp_path / "out" / "report.md").read_text()
    assert _run([harness, "info"], cwd=tmp_path).returncode == 0
    assert _run([harness, "report", results, "-o", "merged/report.md"],
                cwd=tmp_path).returncode == 0
    assert _run([harness, "compare", results, "--baseline", results], cwd=tmp_path).returncode == 0


def test_the_shipped_parity_tests_run_with_sdpa_math(installed, tmp_path):
    result = _run([installed / "python", "-m", "pytest", "--pyargs", "harness.parity",
                   "--attn-backend", "sdpa-math", "--attn-checks", "fwd", "--attn-explore", "2",
                   "--attn-out", "records", "-q", "-p", "no:cacheprovider"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
    assert (tmp_path / "records" / "report.md").is_file()


UNRELATED_TEST = '''
import sys


def test_only_the_light_options_are_imported():
    # The plugin registers the options the library declares (harness.options imports only the
    # vocabulary, the errors and the shard parser); nothing heavy, no suite, no backend.
    loaded = sorted(m for m in sys.modules if m == "harness" or m.startswith("harness.")
                    or m in ("torch", "hypothesis", "tabulate"))
    assert loaded == ["harness", "harness.errors", "harness.options", "harness.shard",
                      "harness.vocab"]
'''


def test_an_unrelated_project_imports_only_the_options(installed, tmp_path):
    (tmp_path / "test_unrelated.py").write_text(UNRELATED_TEST)
    python = installed / "python"
    help_text = _run([python, "-m", "pytest", "--help"], cwd=tmp_path).stdout
    assert "--attn-backend" in help_text  # the plugin is loaded, and only registers options
    result = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_plugin_startup_time_is_within_noise(installed, tmp_path):
    """Collecting an unrelated project takes no longer with the plugin than without it (best
    of five runs each, interleaved; 0.3 s of slack). Timed in the child's CPU seconds: its wall
    time on a machine shared with the other test worker swung 0.7-2.3 s run to run."""
    (tmp_path / "test_unrelated.py").write_text(UNRELATED_TEST)
    python = installed / "python"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(5):
        for label, extra in (("with", []), ("without", ["-p", "no:attn_harness"])):
            before = _children_cpu_s()
            result = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--collect-only", *extra], cwd=tmp_path, env=env)
            times[label].append(_children_cpu_s() - before)
            assert result.returncode == 0, result.stdout + result.stderr
    assert min(times["with"]) <= min(times["without"]) + 0.3, times
