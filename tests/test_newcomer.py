"""Small things a newcomer tripped on (issue 24, point 6): help without markup, the package's
metadata, which runs explore by default, and promoting a regression on purpose."""

from __future__ import annotations

import sys

from harness.options import EXPLORE_PROFILE, RunOptions
from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_help_shows_no_rest_markup():
    from harness.cli import build_parser

    text = build_parser().format_help()
    assert "``" not in text
    assert "The attn-harness command: run, info, report, compare, promote." in text


def test_the_package_depends_on_numpy_and_names_its_license_in_spdx():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "BSD-3-Clause"
    assert any(d.split(">")[0].split("=")[0].strip() == "numpy" for d in project["dependencies"])


def test_only_the_main_job_explores_by_default():
    assert RunOptions().examples == 20  # the main job: the quick profile's count
    assert RunOptions(suites=("regressions",)).examples == 0
    assert RunOptions().examples_for(inline=True) == 0  # a replay (--case)
    assert RunOptions(suites=("edge",), explore=5).examples == 5  # --explore N forces it
    assert RunOptions(explore=3).examples_for(inline=True) == 3
    assert RunOptions(suites=("edge",), explore=EXPLORE_PROFILE, profile="nightly").examples == 300


def test_the_quick_main_job_does_not_explore_a_backend_compiling_per_structure_on_a_cpu():
    """Issue 24, point 5: flex-attention's 20 draws were ~17 structures of their own, each a
    ~5 s compile on a first run (~100 CPU-seconds). The quick main job leaves them out on a
    CPU; asking for exploration, or the nightly profile, still explores it."""
    from harness.run.session import compiles_on_cpu, not_explored_note

    assert RunOptions().examples_for(compiles_on_cpu=True) == 0
    assert RunOptions(explore=EXPLORE_PROFILE).examples_for(compiles_on_cpu=True) == 20
    assert RunOptions(explore=4).examples_for(compiles_on_cpu=True) == 4
    assert RunOptions(profile="nightly").examples_for(compiles_on_cpu=True) == 300
    flex = {"compiles_per_structure": True}
    assert compiles_on_cpu(flex, {"vendor": "cpu"})
    assert not compiles_on_cpu(flex, {"vendor": "nvidia"})
    assert not compiles_on_cpu({"compiles_per_structure": False}, {"vendor": "cpu"})
    assert "--explore profile" in not_explored_note("flex-attention")


def test_explore_profile_parses_and_nonsense_is_refused():
    import argparse

    import pytest

    from harness.options import parse_explore

    assert parse_explore("profile") == EXPLORE_PROFILE
    assert parse_explore("7") == 7
    with pytest.raises(argparse.ArgumentTypeError, match="could not parse 'lots'"):
        parse_explore("lots")
