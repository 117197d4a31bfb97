"""The vocabulary is declared once (harness/vocab.py) and everything else agrees with it: the
records schema's enums, the registered check functions, the option parser, and no module keeps a
copy of the check or status names."""

from __future__ import annotations

import re

import pytest

from harness import vocab
from harness.checks import context  # noqa: F401 - imports the checks, registering them
from harness.checks import registry as checks
from harness.results.records import load_schema
from tests.conftest import REPO


def test_the_schema_enums_are_the_vocabulary():
    schema = load_schema()
    assert tuple(schema["properties"]["check"]["enum"]) == vocab.CHECK_NAMES
    assert tuple(schema["properties"]["status"]["enum"]) == vocab.STATUSES


def test_every_declared_check_has_one_judging_function():
    assert tuple(checks.CHECK_FUNCTIONS) == vocab.CHECK_NAMES


def test_registering_an_undeclared_check_is_refused():
    with pytest.raises(ValueError, match="not declared"):
        checks.check("speed")


def test_statuses_derive_rank_failing_and_severity():
    assert vocab.FAILING == ("fail", "xpass", "crash", "timeout", "error")
    assert vocab.RANK["pass"] < vocab.RANK["xfail"] < vocab.RANK["fail"] < vocab.RANK["crash"]
    assert "skip" not in vocab.RANK
    assert vocab.SEVERITY[0] == "crash" and vocab.SEVERITY[-1] == "skip"
    assert set(vocab.SEVERITY) == set(vocab.STATUSES)


def test_the_option_parser_takes_its_choices_from_the_registry():
    from harness.options import parse_checks as parse

    assert parse("fwd,bwd") == ("fwd", "bwd")
    assert parse(",".join(vocab.CHECK_NAMES)) == vocab.CHECK_NAMES


def test_no_module_keeps_its_own_copy_of_the_names():
    copies = re.compile(r"""\(\s*["']fwd["']\s*,\s*["']bwd["']|["']pass["']\s*,\s*["']fail["']"""
                        r"""\s*,\s*["']skip["']""")
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "harness").rglob("*.py")
                 if p.name != "vocab.py" and copies.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_the_shipped_schema_file_carries_the_registry_enums():
    """Other validators read the file; the harness generates its enums from the registry
    (``x-registry``), so the two agree as long as the file was regenerated."""
    from harness.results.records import generated_schema, schema_file

    assert schema_file() == generated_schema(schema_file()), (
        "run: python -m harness.results.records --write-schema")
