"""The dispatcher: which checks of a case run on a backend here, and why the others do not.

Targets other than this CPU come from the recorded platform facts (tests/fixtures/platforms);
flash-attn there is a fake module (see test_flash_attn_adapter.py), made available so that the
decision shown is the one that machine would make.
"""

from __future__ import annotations

import types
from dataclasses import replace
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from harness.backends import BUILTIN, load_backend
from harness.backends.flash_attn import FlashAttnBackend
from harness.case import Case
from harness.checks.plan import plan
from harness.target import from_facts

CPU = from_facts({"machine": "x86_64", "device_count": 0, "system_memory_bytes": 16 << 30})
CHECKS = ("fwd", "bwd", "determinism", "throughput")


def _recorded(platform_id: str):
    for path in (Path(__file__).parent / "fixtures" / "platforms").glob("*.toml"):
        for entry in tomllib.loads(path.read_text())["platform"]:
            if entry["id"] == platform_id:
                return from_facts(entry["facts"])
    raise KeyError(platform_id)


#: A stand-in for an installed flash-attn: the entry points exist (dispatch never calls them).
def _api(*args, **kwargs):  # takes every keyword, as flash-attn's functions do
    raise AssertionError("dispatch never calls the kernel")


_INSTALLED = types.SimpleNamespace(flash_attn_func=_api, flash_attn_varlen_func=_api,
                                   flash_attn_with_kvcache=_api)


def _flash_attn(flavor: str) -> FlashAttnBackend:
    backend = FlashAttnBackend(module=_INSTALLED, flavor=flavor)
    backend.availability = lambda: None  # as on that machine, where it imports and sees a GPU
    return backend


SMALL = Case(batch=1, seqlen_q=64, seqlen_k=64, heads_q=4, head_dim=64, dtype="bfloat16")


def test_supported_case_runs_every_check():
    p = plan(SMALL, load_backend("sdpa-math"), CPU, CHECKS)
    assert p.run == CHECKS and p.skips == {} and not p.audit


def test_unsupported_case_is_a_skip_of_every_check_with_the_reason():
    case = SMALL.replace(softcap=5.0)
    p = plan(case, load_backend("sdpa-math"), CPU, CHECKS)
    assert p.run == ()
    assert p.skips == {c: "softcap is not a parameter of SDPA" for c in CHECKS}


def test_every_reason_is_given_not_just_the_first():
    mi300x = _recorded("mi300x-rocm6.2")
    case = SMALL.replace(head_dim=320, dtype="float32", softcap=5.0)
    p = plan(case, _flash_attn("rocm-ck"), mi300x, ("fwd",))
    assert p.skips["fwd"] == "; ".join([
        "dtype=float32 is not supported by flash-attn (bfloat16, float16)",
        "head_dim=320 > 256",
        "softcap is accepted and silently ignored by rocm-ck (csrc/flash_attn_ck/mha_fwd.cpp)",
    ])


@pytest.mark.parametrize("platform_id, flavor, reason", [
    ("rx7900xtx-rocm6.0", "rocm-ck", "gfx1100 is not a CK target (gfx90a, gfx942, gfx950)"),
    ("t4-cuda11.8", "cuda",
     "sm_75 is older than flash-attn cuda supports (Ampere (sm_80) or newer)"),
    ("rx6750xt-rocm5.7", "rocm-triton", "ROCm 5.7 is older than flash-attn's minimum ROCm 6.0"),
    ("h100-cuda12.4", "rocm-ck", "flash-attn rocm-ck does not run on nvidia devices"),
])
def test_architecture_reasons_on_recorded_machines(platform_id, flavor, reason):
    p = plan(SMALL, _flash_attn(flavor), _recorded(platform_id), ("fwd", "bwd"))
    assert p.run == () and p.skips == {"fwd": reason, "bwd": reason}


@pytest.mark.parametrize("platform_id, flavor", [
    ("mi300x-rocm6.2", "rocm-ck"), ("mi250x-rocm6.2", "rocm-ck"), ("mi355x-rocm7.2", "rocm-ck"),
    ("rx7900xtx-rocm6.0", "rocm-triton"), ("h100-cuda12.4", "cuda"),
    ("a100-sxm4-40gb-cuda12.1", "cuda"),
])
def test_supported_machines_run(platform_id, flavor):
    p = plan(SMALL.replace(causal=True), _flash_attn(flavor), _recorded(platform_id), CHECKS)
    assert p.run == CHECKS, p.skips


def test_paged_block_sizes_per_flavor():
    case = Case(entry="kvcache", batch=1, seqlen_q=1, seqlen_k=512, heads_q=4, head_dim=64,
                paged_block_size=128)
    mi300x, h100 = _recorded("mi300x-rocm6.2"), _recorded("h100-cuda12.4")
    assert plan(case, _flash_attn("rocm-ck"), mi300x, ("fwd",)).run == ("fwd",)
    assert plan(case, _flash_attn("cuda"), h100, ("fwd",)).skips["fwd"] == (
        "paged_block_size=128 is not a multiple of 256 (flash-attn)")
    assert "block_table is accepted but not passed" in plan(
        case, _flash_attn("rocm-triton"), mi300x, ("fwd",)).skips["fwd"]


def test_kvcache_backward_is_a_check_level_skip():
    case = Case(entry="kvcache", batch=1, seqlen_q=1, seqlen_k=256, heads_q=4, head_dim=64)
    p = plan(case, _flash_attn("cuda"), _recorded("h100-cuda12.4"), CHECKS)
    assert p.run == ("fwd", "determinism", "throughput")
    assert p.skips == {"bwd": "the kvcache entry point is forward-only"}


def test_case_level_check_list_is_respected():
    case = SMALL.replace(checks=("fwd",))
    p = plan(case, load_backend("sdpa-math"), CPU, ("fwd", "bwd"))
    assert p.run == ("fwd",) and p.skips == {"bwd": "the case asks only for fwd"}


def test_memory_estimate_skip():
    small_gpu = replace(_recorded("t4-cuda11.8"), memory_bytes=1 << 30)
    big = Case(batch=8, seqlen_q=8192, seqlen_k=8192, heads_q=32, head_dim=128)
    p = plan(big, _flash_attn("cuda"), replace(small_gpu, arch="sm_80"), ("fwd",))
    assert p.run == ()
    assert p.skips["fwd"].startswith("needs about ")
    assert p.skips["fwd"].endswith("more than 80% of this device's 1.0 GiB")


def test_unavailable_backend_is_a_skip_with_its_reason():
    p = plan(SMALL, load_backend("sdpa-cudnn"), CPU, ("fwd",))
    assert p.skips["fwd"].startswith("sdpa-cudnn is unavailable: no GPU here")


def test_audit_runs_what_is_not_claimed_but_not_what_cannot_be_called():
    case = SMALL.replace(softcap=5.0)
    p = plan(case, _flash_attn("rocm-ck"), _recorded("mi300x-rocm6.2"), ("fwd",), audit=True)
    assert p.run == ("fwd",) and p.audit
    assert p.unsupported == ("softcap is accepted and silently ignored by rocm-ck "
                             "(csrc/flash_attn_ck/mha_fwd.cpp)",)
    on_cpu = plan(case, _flash_attn("rocm-ck"), CPU, ("fwd",), audit=True)
    assert on_cpu.run == () and on_cpu.skips["fwd"] == (
        "flash-attn does not run on cpu (runs on cuda)")


def test_a_case_no_backend_here_supports_gets_every_backends_reason():
    case = Case(entry="kvcache", batch=2, seqlen_q=4, seqlen_k=64, heads_q=4, head_dim=64,
                paged_block_size=16)
    reasons = {name: plan(case, load_backend(name), CPU, ("fwd",)).skips["fwd"]
               for name in BUILTIN}
    assert reasons["sdpa-flash"] == "sdpa-flash has no kvcache entry point"
    assert reasons["sdpa-math"] == "sdpa-math has no kvcache entry point"
    for name in ("flash-attn", "sdpa-efficient", "sdpa-cudnn"):
        assert reasons[name].startswith(f"{name} is unavailable: "), reasons[name]


def test_run_records_a_skip_per_backend_for_an_unsupported_case(tmp_path):
    from harness.cli import main
    from harness.results.records import read_records

    case = Case(entry="kvcache", batch=2, seqlen_q=4, seqlen_k=64, heads_q=4, head_dim=64)
    argv = ["run", "--case", case.to_inline_toml(), "--checks", "fwd", "--out", str(tmp_path),
            "--no-isolation"]
    for name in BUILTIN:
        argv += ["--backend", name]
    assert main(argv) == 0
    records = read_records(tmp_path / "results.jsonl")
    assert sorted(r.backend_name for r in records) == sorted(BUILTIN)
    assert all(r.status == "skip" and r.reason for r in records)


def test_default_run_names_the_backends_it_leaves_out(tmp_path, capsys):
    """Without --backend only available backends run; the others are named, with the reason."""
    from harness.cli import main

    case = Case(batch=1, seqlen_q=16, heads_q=2, head_dim=16, dtype="float32")
    assert main(["run", "--case", case.to_inline_toml(), "--checks", "fwd",
                 "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "note: not run: sdpa-cudnn (no GPU here" in err
    assert "note: not run: flash-attn (" in err
