"""Row-sampled verdicts for cases too large for the exact reference, and the jury of backends."""

from __future__ import annotations

import torch

from harness.case import Case
from harness.checks import context as checks
from harness.results import jury
from harness.run.worker import Task, execute
from harness.target import detect

ZOO = "tests/zoo/kernels.py"


def _entry(name, out, ref, allowed=0.01):
    return {"backend": name, "label": "case", "kind": "exact", "allowed": allowed, "out": out,
            "ref": ref}


def test_the_jury_names_the_outlier():
    ref = torch.zeros(4, 2, 8, dtype=torch.float64)
    entries = [_entry("a", ref + 1e-3, ref), _entry("b", ref - 1e-3, ref),
               _entry("c", ref + 0.5, ref)]
    v = jury.judge_case("x", entries)
    assert v.outlier == "c" and "c disagree(s)" in v.finding
    assert v.pairwise["a"]["b"] == 2e-3 and v.to_reference["c"] == 0.5


def test_the_jury_tells_agreeing_kernels_from_a_suspect_reference():
    ref = torch.zeros(3, dtype=torch.float64)
    together = [_entry("a", ref + 1.0, ref), _entry("b", ref + 1.0, ref)]
    assert "suspect the case's semantics" in jury.judge_case("x", together).finding
    apart = [_entry("a", ref + 1.0, ref), _entry("b", ref - 1.0, ref)]
    v = jury.judge_case("x", apart)
    assert "and with each other" in v.finding and v.outlier is None
    fine = [_entry("a", ref, ref), _entry("b", ref, ref)]
    assert jury.judge_case("x", fine).finding.startswith("all agree")


def _fwd(case, backend, target, monkeypatch, limit_gflop):
    monkeypatch.setitem(checks.EXACT_REFERENCE_GFLOP, "cpu", limit_gflop)
    monkeypatch.setattr(checks, "SAMPLED_ROWS", 12)
    records = [r for kind, r in execute(Task("t", case, backend, ("fwd",), 0), target, {})
               if kind == "record"]
    (record,) = records
    return record


def test_a_large_case_is_judged_on_sampled_rows_and_still_catches_bugs(monkeypatch):
    target = detect()
    case = Case(batch=2, seqlen_q=100, seqlen_k=300, heads_q=4, heads_kv=2, head_dim=32,
                causal=True, dtype="bfloat16")
    exact = _fwd(case, "sdpa-math", target, monkeypatch, 1e9)
    assert exact.metrics["verdict_kind"] == "exact"
    sampled = _fwd(case, "sdpa-math", target, monkeypatch, 1e-6)
    assert sampled.status == "pass", sampled.reason
    assert sampled.metrics["verdict_kind"] == "sampled-rows"
    assert 2 * 2 <= sampled.metrics["rows_judged"] <= 2 * 12 < sampled.metrics["rows_total"]
    assert "judged on" in sampled.reason
    wrong = _fwd(case, f"{ZOO}:topleft_causal", target, monkeypatch, 1e-6)
    assert wrong.status == "fail" and wrong.metrics["verdict_kind"] == "sampled-rows"


def test_a_run_with_several_backends_writes_the_jury(tmp_path):
    import subprocess
    import sys

    suite = tmp_path / "s.toml"
    suite.write_text("[[case]]\nseqlen_q = 20\nseqlen_k = 40\nheads_q = 4\nheads_kv = 2\n"
                     "causal = true\n")
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "harness.cli", "run", "--backend", "sdpa-math",
                    "--backend", f"{ZOO}:gqa_mapping", "--suite", str(suite), "--checks", "fwd",
                    "--explore", "0", "--out", str(out)], check=False, capture_output=True,
                   timeout=300)
    (verdict,) = jury.read(out / "jury.jsonl")
    assert verdict.outlier == f"{ZOO}:gqa_mapping"
    assert "## Jury" in (out / "report.md").read_text()
    assert not (out / "jury").exists()  # the tensors are gone once judged


def _leave_rows(directory, case_id="0123456789ab"):
    ref = torch.zeros(3, dtype=torch.float64)
    for name, out in (("a", ref), ("b", ref + 1.0)):
        path = directory / case_id / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_entry(name, out, ref), path)


def test_a_symlinked_jury_directory_is_refused(tmp_path):
    import pytest

    from harness.errors import HarnessError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    _leave_rows(elsewhere)
    out = tmp_path / "out"
    out.mkdir()
    (out / "jury").symlink_to(elsewhere)
    with pytest.raises(HarnessError, match=r"jury is a symlink .*remove the link") as info:
        jury.prepare(out)
    assert "\n" not in str(info.value)
    with pytest.raises(HarnessError, match="is a symlink"):
        jury.deliberate(out / "jury")
    assert (elsewhere / "precious.txt").read_text() == "keep me"
    assert len(list(elsewhere.glob("*/*.pt"))) == 2


def test_the_jury_deletes_only_what_it_wrote(tmp_path):
    out = tmp_path / "out"
    (out / "jury" / "0123456789ab").mkdir(parents=True)
    (out / "jury" / "notes.txt").write_text("mine")
    (out / "jury" / "0123456789ab" / "mine.txt").write_text("mine too")
    run_dir = jury.prepare(out)
    assert run_dir.parent == out / "jury" and (run_dir / jury.MARKER).is_file()
    assert jury.prepare(out) != run_dir  # every run its own directory
    _leave_rows(run_dir)
    (verdict,) = jury.deliberate(run_dir)
    assert verdict.case_id == "0123456789ab"
    assert not run_dir.exists()
    assert (out / "jury" / "notes.txt").read_text() == "mine"
    assert (out / "jury" / "0123456789ab" / "mine.txt").read_text() == "mine too"
    # The old layout (tensors straight under <out>/jury): still only the tensors go.
    _leave_rows(out / "jury")
    assert len(jury.deliberate(out / "jury")) == 1
    assert (out / "jury" / "0123456789ab" / "mine.txt").exists()
    assert not list((out / "jury").glob("*/*.pt"))
