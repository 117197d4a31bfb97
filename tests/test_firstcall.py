"""python -m harness.run.firstcall: each case's first call (a JIT kernel's compilation) timed
apart from its steady calls, as .ci/gpu-check records it for flash-attn4."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from harness.run.firstcall import main

REF = Path(__file__).resolve().parent / "fixtures" / "fa4_ref.py"
FIXTURE = f"flash-attn4@{REF}"


def test_a_first_call_that_compiles_is_told_apart(tmp_path, monkeypatch):
    """A module that 'compiles' (sleeps 0.3 s) on the first call of each shape: the compile
    time is the first call's extra, the run time the steady calls'."""
    (tmp_path / "jit_fa4.py").write_text(textwrap.dedent(f"""
        import time, importlib.util
        _spec = importlib.util.spec_from_file_location("_jit_ref", {str(REF)!r})
        _ref = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_ref)
        _seen = set()
        def flash_attn_func(q, k, v, **kw):
            key = (q.shape, k.shape, tuple(sorted((n, str(x)) for n, x in kw.items()
                                                  if not hasattr(x, "shape"))))
            if key not in _seen:
                _seen.add(key)
                time.sleep(0.3)
            return _ref.flash_attn_func(q, k, v, **kw)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "times.json"
    assert main(["--backend", "flash-attn4@jit_fa4", "--limit", "2", "--repeats", "2",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["skipped"] == "" and len(result["cases"]) == 2
    for row in result["cases"]:
        assert row["compile_s"] >= 0.25 and row["run_s"] < row["first_s"] - 0.25, row
    assert result["compile_s"] >= 0.5


def test_an_unavailable_backend_is_reported_not_failed(tmp_path, capsys):
    out = tmp_path / "times.json"
    assert main(["--backend", "flash-attn4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    if result["skipped"]:  # no flash_attn.cute or no GPU here
        assert result["cases"] == [] and "flash-attn4 is unavailable here" in result["skipped"]
        assert capsys.readouterr().out.startswith("not timed: flash-attn4 is unavailable")
    assert main(["--backend", FIXTURE, "--suite", "no_such_suite"]) == 2
