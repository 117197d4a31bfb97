"""python -m harness.run.fidelity: its plumbing and output (the numbers themselves are a
benchmark)."""

from __future__ import annotations

import sys

from harness.run import fidelity
from harness.run.fidelity import TOLERANCE, Row, table, within


def test_tolerances_are_the_targets():
    assert TOLERANCE == {"cpu": 0.10, "cuda": 0.03}
    assert within(1.099, 0.10) and within(0.901, 0.10) and not within(1.11, 0.10)
    assert not within(1.031, 0.03)


def test_table_marks_rows_outside_the_target():
    rows = [Row("b1 q8", "sdpa-flash", "fwd", 1.0, 1.02, 0.01, 9, 0.98),
            Row("b1 q8", "sdpa-flash", "bwd", 2.0, 1.6, 0.01, 9, 1.25)]
    text = table(rows, 0.10, "torch Timer")
    lines = text.splitlines()
    assert "torch Timer ms" in lines[0] and "ratio" in lines[0]
    assert lines[2].split("|")[-2].strip() == "ok" and "0.980" in lines[2]
    assert "OFF by more than 10%" in lines[3] and "1.250" in lines[3]


def test_a_cpu_run_compares_with_torch_timer_without_importing_triton(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "triton", None)  # any import of triton would now fail
    monkeypatch.setitem(sys.modules, "triton.testing", None)
    code = fidelity.main(["--case", "{batch = 1, seqlen_q = 8, heads_q = 1, head_dim = 8, "
                                    "dtype = \"float32\"}",
                          "--rounds", "1", "--warmup-ms", "1", "--rep-ms", "2"])
    out = capsys.readouterr().out
    assert code in (0, 1)  # whether 2 ms budgets agree within 10% is not this test's business
    assert "harness vs torch Timer" in out and "| b1 q8 k8 h1 d64 f32" not in out
    rows = [line for line in out.splitlines() if line.startswith("| b1 q8 k8 h1 d8 f32")]
    assert [r.split("|")[3].strip() for r in rows] == ["fwd", "bwd"]


def test_a_bad_case_is_one_line_and_exit_2(capsys):
    assert fidelity.main(["--case", "{heads_q = 0}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m harness.run.fidelity: error: ") and err.count("\n") == 1


def test_a_kernel_that_raises_is_a_note_and_the_others_are_still_timed(tmp_path, capsys):
    # One backend fails at its first call (as flash-attn's Triton AMD kernels do on NVIDIA);
    # the table still holds the other backend's rows and the failure is named, not a traceback.
    kernel = tmp_path / "broken.py"
    kernel.write_text("def attn(q, k, v, **kwargs):\n"
                      "    raise KeyError('Keyword argument waves_per_eu was specified')\n")
    code = fidelity.main(["--backend", f"{kernel}:attn", "--backend", "sdpa-math",
                          "--case", "{batch = 1, seqlen_q = 8, heads_q = 1, head_dim = 8, "
                                    "dtype = \"float32\"}",
                          "--rounds", "1", "--warmup-ms", "1", "--rep-ms", "2"])
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "not timed, the call raised KeyError" in out and "waves_per_eu" in out
    assert [line.split("|")[2].strip() for line in out.splitlines()
            if line.startswith("| b1 q8")] == ["`sdpa-math`", "`sdpa-math`"]
