"""Suite files: the TOML format, grids, and one-line errors naming file, table and field."""

from __future__ import annotations

import re

import pytest

from harness.case.suites import load_file, load_suite, parse_inline_case, resolve_suite
from harness.errors import InvalidCase


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_smoke_suite_loads_by_name_and_covers_every_feature():
    (suite,) = load_suite("smoke")
    features = set().union(*(c.features for c in suite.cases))
    entries = {c.entry for c in suite.cases}
    dtypes = {c.dtype for c in suite.cases}
    assert {"causal", "window", "softcap", "alibi", "dropout", "gqa", "scale", "strided", "paged",
            "seqlen_q>seqlen_k"} <= features
    assert entries == {"dense", "varlen", "kvcache"}
    assert dtypes == {"float16", "bfloat16", "float32"}
    assert any(c.heads_kv == 1 < c.heads_q for c in suite.cases)  # MQA
    assert any(c.head_dim % 32 for c in suite.cases)
    assert any(c.seqlen_k >= 4096 for c in suite.cases)


def test_defaults_cases_and_grids(tmp_path):
    path = write(tmp_path, """
[defaults]
dtype = "bfloat16"
heads_q = 4

[[case]]
seqlen_q = 9

[[grid]]
head_dim = [32, 64]
causal = [false, true]
window = [[-1, -1], [4, 0]]
"seqlen_q,seqlen_k" = [[113, 203], [1, 147]]
""")
    suite = load_file(path)
    assert len(suite.cases) == 1 + 2 * 2 * 2 * 2
    assert all(c.dtype == "bfloat16" and c.heads_q == 4 for c in suite.cases)
    assert {(c.seqlen_q, c.seqlen_k) for c in suite.cases[1:]} == {(113, 203), (1, 147)}
    assert {c.window for c in suite.cases[1:]} == {(-1, -1), (4, 0)}


@pytest.mark.parametrize(("text", "message"), [
    ("[[case]]\nseqlen_q = 8\nheads_q = 6\nheads_kv = 4\n",
     "s.toml, case 1: heads_q=6 is not a multiple of heads_kv=4"),
    ("[[case]]\nseqlen_q = 8\n[[case]]\nseqln_q = 8\n",
     "s.toml, case 2: unknown field 'seqln_q' (did you mean 'seqlen_q'?"),
    ("[[case]]\nseqlen_q = 8\ncausal = \n", "s.toml: not valid TOML"),
    ("[[grid]]\nseqlen_q = [8]\nwindow = [4, 0]\n",
     "s.toml, grid 1: in a grid, 'window' takes a list of lists"),
    ("[[grid]]\n\"seqlen_q,seqlen_k\" = [[8, 9, 10]]\n",
     "'seqlen_q,seqlen_k' zips 2 fields"),
    ("[[grid]]\nseqlen_q = []\n", "grid axis 'seqlen_q' is empty"),
    ("[[grid]]\nseqlen_q = [8, 16]\nheads_q = [4]\nheads_kv = [3]\n",
     "s.toml, grid 1 (seqlen_q=8, heads_q=4, heads_kv=3): heads_q=4 is not a multiple"),
    ("[defaults]\nhead = 3\n[[case]]\nseqlen_q = 8\n", "s.toml, [defaults]: unknown field 'head'"),
    ("cases = 3\n", "s.toml: unknown top-level key 'cases'"),
    ("[suite]\ndescription = 'empty'\n", "s.toml: holds no cases"),
    ("[[case]]\nseqlen_q = 8\n[[case]]\nseqlen_q = 8\nname = 'again'\n",
     "s.toml, case 2: .* repeats s.toml, case 1"),
])
def test_malformed_files_name_file_table_and_field(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, text)
    with pytest.raises(InvalidCase) as info:
        load_file(path)
    pattern = ".*".join(re.escape(part) for part in message.split(".*"))
    assert re.search(pattern, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_suite_lists_the_known_ones():
    with pytest.raises(InvalidCase, match="no such suite.*smoke"):
        resolve_suite("no-such-suite")
    with pytest.raises(InvalidCase, match="no such case file"):
        resolve_suite("missing/file.toml")


def test_inline_case_errors():
    with pytest.raises(InvalidCase, match="not a TOML inline table"):
        parse_inline_case("{seqlen_q = }")
    with pytest.raises(InvalidCase, match="--case: heads_q=3 is not a multiple of heads_kv=2"):
        parse_inline_case("{seqlen_q = 4, heads_q = 3, heads_kv = 2}")
