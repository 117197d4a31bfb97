"""Sweeps found in throughput records, and the PNG plots (matplotlib is an optional extra)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from harness.case import Case
from harness.results.plot import family_key, family_title, file_name, sweeps, write_plots
from harness.results.records import read_many

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "results"
THREE = sorted(FIXTURES.glob("synthetic-*.jsonl"))


@pytest.fixture(scope="module")
def records():
    return read_many(THREE)


def test_a_family_ignores_batch_and_sequence_lengths_but_not_the_shape():
    a = Case(batch=32, seqlen_q=512, heads_q=32, heads_kv=8, head_dim=128, causal=True).to_dict()
    b = Case(batch=1, seqlen_q=16384, heads_q=32, heads_kv=8, head_dim=128, causal=True,
             name="other name").to_dict()
    c = Case(batch=1, seqlen_q=512, heads_q=32, heads_kv=8, head_dim=64, causal=True).to_dict()
    decode = Case(seqlen_q=1, seqlen_k=512, heads_q=32, heads_kv=8, head_dim=128).to_dict()
    assert family_key(a) == family_key(b) != family_key(c)
    assert family_key(decode) != family_key({**decode, "seqlen_q": 2, "seqlen_k": 2})
    assert family_title(a) == "h32/8 d128 f16 causal, seqlen_q = seqlen_k"
    assert family_title(decode) == "h32/8 d128 f16, seqlen_q = 1"
    assert file_name(family_title(a)) == "throughput-h32-8-d128-f16-causal-seqlen-q-seqlen-k.png"


def test_the_synthetic_sweep_is_one_family_with_a_line_per_setup_backend_and_pass(records):
    found = sweeps(records)
    assert len(found) == 1  # the smoke cases each have one sequence length
    title, lines = next(iter(found.values()))
    assert title == "h32/8 d128 bf16 causal, seqlen_q = seqlen_k"
    assert len(lines) == 3 * 2 * 2  # setups x backends x (fwd, bwd)
    for line in lines:
        assert [p.seqlen for p in line.points] == [512, 1024, 2048, 4096, 8192]
        assert all(p.tflops_lo <= p.tflops <= p.tflops_hi for p in line.points)
    ck = next(s for s in lines if s.backend == "flash-attn" and s.timed == "fwd"
              and "rocm-ck" in s.setup)
    assert ck.points[-1].tflops == pytest.approx(389.0)


def test_failed_or_skipped_throughput_makes_no_point(records):
    skipped = [replace(r, status="skip", metrics={}) if r.check == "throughput" else r
               for r in records]
    assert sweeps(skipped) == {}


def test_no_sweep_no_plot(tmp_path, records):
    single = [r for r in records if r.suite == "smoke"]
    outcome = write_plots(single, tmp_path)
    assert outcome.files == () and "no shape was timed at two or more" in outcome.skipped
    assert not list(tmp_path.iterdir())


def test_without_matplotlib_the_plot_is_skipped_and_says_how_to_get_it(tmp_path, records,
                                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    outcome = write_plots(records, tmp_path)
    assert outcome.files == ()
    assert outcome.skipped == ("the plot was skipped: matplotlib is not installed "
                               "(pip install 'attn-harness[plot]')")
    assert not list(tmp_path.iterdir())


def test_the_png_is_written(tmp_path, records):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib (the `plot` extra) is not installed; "
                    "pip install 'attn-harness[plot]' to test the PNG")
    outcome = write_plots(records, tmp_path / "out")
    assert outcome.skipped == ""
    [(title, name)] = outcome.files
    png = tmp_path / "out" / name
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert name == file_name(title)
