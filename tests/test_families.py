"""Module backends (``FAMILY@TARGET``) and every family's call convention, on the CPU.

The fakes in ``tests/fixtures/fakes`` imitate each family's API with its real signatures, record
every call exactly as made, and answer with exact attention in the family's own return and lse
conventions. So each test checks two things: the recorded call (positional and keyword
arguments, layouts) and, through the harness's forward check, that the translated result is
right. FlexAttention also runs for real (compiled by torch on this CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from harness.backends import (
    BUILTIN,
    FAMILIES,
    family_listing,
    known_backends,
    load_backend,
    machine_facts,
    spec_problem,
)
from harness.backends.aiter_fa import window_argument
from harness.backends.fa3 import FLAVOR_CAPABILITIES as FLAVOR_CAPABILITIES_FA3
from harness.backends.flash_attn import FLAVOR_CAPABILITIES, FlashAttnBackend, detect_flavor
from harness.backends.flex import lse_request, unpack
from harness.case import Case
from harness.checks.context import CaseRun
from harness.errors import UsageError
from harness.exact.inputs import make_inputs
from harness.options import get_profile
from harness.target import from_facts

FAKES = Path(__file__).parent / "fixtures" / "fakes"
CPU = from_facts({"machine": "x86_64", "device_count": 0})
H100 = from_facts({"torch_version_cuda": "12.4", "device_count": 1, "device_name": "NVIDIA H100",
                   "capability": [9, 0]})
A100 = from_facts({"torch_version_cuda": "12.4", "device_count": 1, "device_name": "NVIDIA A100",
                   "capability": [8, 0]})


def fake(family: str, name: str):
    """The backend ``family@tests/fixtures/fakes/<name>.py`` with its recorder cleared."""
    backend = load_backend(f"{family}@{FAKES / name}.py")
    backend.module.CALLS.clear()
    return backend


def fwd(case: Case, backend):
    run = CaseRun(case, backend, CPU, seed=0, profile=get_profile("quick"), device="cpu")
    return run.run("fwd")


def calls(backend, name=None):
    return [c for c in backend.module.CALLS.calls if name is None or c[0] == name]


# ------------------------------------------------------------------- specs and listing


def test_every_family_is_known_and_listed():
    names = known_backends()
    for family in FAMILIES:
        if family == "sdpa":
            assert {"sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"} <= set(names)
        else:
            assert family in names and family in BUILTIN
    assert names[:5] == ["flash-attn", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"]
    assert [row["family"] for row in family_listing()] == list(FAMILIES)


@pytest.mark.parametrize("spec, message", [
    ("nope@x", "unknown family 'nope'"),
    ("flash-attn@", "empty target after '@'"),
    ("flash-attn@no_such_module_for_the_harness", "no such module 'no_such_module_for_the_"
                                                   "harness'"),
    ("flash-attn@missing/dir/fa.py", "no such file missing/dir/fa.py"),
    ("sdpa@torch", "family 'sdpa' takes no module target"),
])
def test_bad_module_specs_are_one_line_usage_errors(spec, message):
    with pytest.raises(UsageError) as info:
        load_backend(spec)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert message in spec_problem(spec)


def test_import_failures_name_the_first_line(tmp_path):
    broken = tmp_path / "broken_fa.py"
    broken.write_text("raise RuntimeError('boom\\nsecond line')\n")
    with pytest.raises(UsageError) as info:
        load_backend(f"flash-attn@{broken}")
    assert str(info.value) == f"--backend flash-attn@{broken}: importing {broken} failed: " \
                              "RuntimeError: boom"
    dep = tmp_path / "needs_dep.py"
    dep.write_text("import a_dependency_nobody_has\n")
    with pytest.raises(UsageError) as info:
        load_backend(f"flash-attn@{dep}")
    assert "ModuleNotFoundError: No module named 'a_dependency_nobody_has'" in str(info.value)


def test_a_module_name_that_imports_a_missing_dependency_is_not_no_such_module(tmp_path,
                                                                              monkeypatch):
    (tmp_path / "fa_with_dep.py").write_text("import a_dependency_nobody_has\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError) as info:
        load_backend("flash-attn@fa_with_dep")
    assert "importing fa_with_dep failed: ModuleNotFoundError" in str(info.value)
    assert spec_problem("flash-attn@fa_with_dep") == ""  # nothing heavy is imported to say so


# ------------------------------------------------------ module backends: subsets, narrowing


def _module(tmp_path, monkeypatch, name: str, body: str):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return load_backend(f"flash-attn@{name}")


def test_missing_entry_points_are_skips_with_the_function_name(tmp_path, monkeypatch):
    backend = _module(tmp_path, monkeypatch, "dense_only_fa", """
        def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                            deterministic=False, return_attn_probs=False):
            return q
        """)
    assert backend.describe() == {"name": "flash-attn@dense_only_fa", "family": "flash-attn",
                                  "flavor": "module", "version": ""}
    assert backend.capabilities.entries == {"dense"}
    varlen = Case(entry="varlen", batch=2, seqlens_q=(3, 4), seqlens_k=(3, 4), heads_q=1,
                  head_dim=16)
    why = "flash-attn@dense_only_fa has no flash_attn_varlen_func (the varlen entry point)"
    assert backend.call_reasons(varlen, CPU) == [why]
    assert backend.unsupported_reasons(varlen, CPU) == [why]


def test_a_function_without_a_keyword_cannot_be_asked_for_its_feature(tmp_path, monkeypatch):
    backend = _module(tmp_path, monkeypatch, "old_fa", """
        def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                            return_attn_probs=False):
            return q
        """)
    case = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=16, softcap=3.0)
    assert backend.call_reasons(case, CPU) == [
        "flash-attn@old_fa: flash_attn_func takes no softcap argument, which softcap needs"]


def test_declared_capabilities_narrow_and_never_widen(tmp_path, monkeypatch):
    backend = _module(tmp_path, monkeypatch, "narrow_fa", """
        ATTN_HARNESS_CAPABILITIES = {"dtypes": ["float32"], "features": ["causal", "gqa"],
                                     "head_dim_max": 64, "backward": False,
                                     "entries": ["dense", "varlen", "kvcache"]}
        def flash_attn_func(q, k, v, **kwargs):
            return q
        """)
    caps = backend.capabilities
    assert caps.dtypes == {"float32"} and caps.features == {"causal", "gqa"}
    assert caps.head_dim_max == 64 and caps.backward is False
    assert caps.entries == {"dense"}, "declaring an entry point does not create its function"
    case = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=128, dtype="float16", window=(2, 2))
    assert backend.unsupported_reasons(case, CPU) == [
        "dtype=float16 is not supported by flash-attn@narrow_fa (float32)",
        "head_dim=128 > 64",
        "window is not claimed by flash-attn@narrow_fa (ATTN_HARNESS_CAPABILITIES)"]


def test_bad_declared_capabilities_are_usage_errors(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="unknown capability 'head_dim'"):
        _module(tmp_path, monkeypatch, "bad_caps_fa", """
            ATTN_HARNESS_CAPABILITIES = {"head_dim": 64}
            def flash_attn_func(q, k, v):
                return q
            """)


def test_a_module_may_declare_the_flavor_it_imitates(tmp_path, monkeypatch):
    backend = _module(tmp_path, monkeypatch, "ck_like_fa", """
        ATTN_HARNESS_FLAVOR = "rocm-ck"
        def flash_attn_func(q, k, v, **kwargs):
            return q
        """)
    assert backend.flavor == "rocm-ck"
    case = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=16, softcap=3.0)
    assert "softcap is accepted and silently ignored by rocm-ck" in \
        backend.unsupported_reasons(case, CPU)[0]


def test_module_backends_run_on_the_cpu_but_the_installed_build_does_not():
    module = fake("flash-attn", "fake_flash_attn2")
    case = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=16, dtype="float16")
    assert module.availability() is None and module.call_reasons(case, CPU) == []
    installed = FlashAttnBackend()
    if installed.module is not None:  # pragma: no cover - flash-attn is not installed here
        assert installed.availability().startswith("no GPU here")
    else:
        assert installed.availability() == ("flash-attn is not installed "
                                             "(pip install 'attn-harness[flash-attn]')")
    assert installed.call_reasons(case, CPU) == ["flash-attn does not run on cpu (runs on cuda)"]


# ---------------------------------------------------------------- flash-attn (2.x) family


def test_flash_attn_dense_call():
    backend = fake("flash-attn", "fake_flash_attn2")
    backend.lse_convention = "harness"  # the fake's causal-ALiBi lse is the distance form
    case = Case(batch=2, seqlen_q=33, seqlen_k=47, heads_q=4, heads_kv=2, head_dim=32,
                dtype="float16", causal=True, alibi=True, scale=0.3)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    name, args, kwargs = calls(backend)[0]
    assert name == "flash_attn_func" and len(args) == 3
    assert [a.shape for a in args] == [(2, 33, 4, 32), (2, 47, 2, 32), (2, 47, 2, 32)]
    assert set(kwargs) == {"softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
                           "dropout_p", "deterministic", "return_attn_probs"}
    assert kwargs["return_attn_probs"] is True and kwargs["deterministic"] is True
    assert verdict.metrics["lse"]["mismatched"] == 0


def test_flash_attn_varlen_positional_order_and_lse_layout():
    backend = fake("flash-attn", "fake_flash_attn2")
    case = Case(entry="varlen", batch=3, seqlens_q=(5, 0, 17), seqlens_k=(9, 4, 17), heads_q=4,
                heads_kv=1, head_dim=32, dtype="float16", causal=True)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    name, args, kwargs = calls(backend)[0]
    assert name == "flash_attn_varlen_func" and len(args) == 7
    assert args[3].tolist() == [0, 5, 5, 22] and args[4].tolist() == [0, 9, 13, 30]
    assert args[5:] == (17, 17) and "block_table" not in kwargs
    assert verdict.metrics["lse"]["total"] == 4 * 22


@pytest.mark.parametrize("entry, layout, function, n_args", [
    ("dense", "packed-qkv", "flash_attn_qkvpacked_func", 1),
    ("dense", "packed-kv", "flash_attn_kvpacked_func", 2),
    ("varlen", "packed-qkv", "flash_attn_varlen_qkvpacked_func", 3),
    ("varlen", "packed-kv", "flash_attn_varlen_kvpacked_func", 6),
])
def test_flash_attn_packed_layouts_use_the_packed_functions(entry, layout, function, n_args):
    backend = fake("flash-attn", "fake_flash_attn2")
    shape = dict(entry="varlen", seqlens_q=(6, 11), seqlens_k=(6, 11)) if entry == "varlen" \
        else dict(seqlen_q=24, seqlen_k=24)
    case = Case(batch=2, heads_q=2, head_dim=16, dtype="bfloat16", causal=True, layout=layout,
                **shape)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    name, args, _ = calls(backend)[0]
    assert name == function and len(args) == n_args
    packed = args[0] if layout == "packed-qkv" else args[1]
    assert packed.shape[-3] == (3 if layout == "packed-qkv" else 2)


def test_flash_attn_packed_without_the_packed_function_uses_the_views(tmp_path, monkeypatch):
    source = (FAKES / "fake_flash_attn2.py").read_text()
    (tmp_path / "fa_no_packed.py").write_text(
        source.replace("Path(__file__).parent", repr(str(FAKES)))
        + "\ndel flash_attn_qkvpacked_func\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    backend = load_backend("flash-attn@fa_no_packed")
    backend.module.CALLS.clear()
    case = Case(batch=2, seqlen_q=24, heads_q=2, head_dim=16, dtype="float16", layout="packed-qkv")
    assert fwd(case, backend).status == "pass"
    assert calls(backend)[0][0] == "flash_attn_func"


def test_flash_attn_paged_varlen_passes_pages_and_block_table():
    backend = fake("flash-attn", "fake_flash_attn2")
    case = Case(entry="varlen", batch=2, seqlens_q=(3, 5), seqlens_k=(40, 17), heads_q=2,
                head_dim=16, dtype="float16", paged_block_size=16, causal=True)
    inputs = make_inputs(case)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    name, args, kwargs = calls(backend)[0]
    assert name == "flash_attn_varlen_func"
    assert args[1].shape == inputs.k_pages.shape
    assert torch.equal(args[1].nan_to_num(7.0), inputs.k_pages.nan_to_num(7.0))  # NaN padding
    assert torch.equal(kwargs["block_table"], inputs.block_table)


def test_flash_attn_kvcache_append_writes_the_cache_in_place():
    backend = fake("flash-attn", "fake_flash_attn2")
    case = Case(entry="kvcache", batch=2, seqlen_q=2, seqlen_k=40, seqlens_k=(10, 20),
                heads_q=4, heads_kv=2, head_dim=16, dtype="float32", seqlen_new=2, causal=True,
                num_splits=3)
    inputs = make_inputs(case)
    before = inputs.k.clone()
    outputs = backend.forward(inputs)
    name, args, kwargs = calls(backend)[0]
    assert name == "flash_attn_with_kvcache" and len(args) == 3 and args[1] is inputs.k
    assert kwargs["k"] is inputs.k_new and kwargs["v"] is inputs.v_new
    assert kwargs["num_splits"] == 3 and kwargs["return_softmax_lse"] is True
    assert "rotary_interleaved" not in kwargs, "only passed when rotary is on"
    assert torch.equal(inputs.k[0, 10:12], inputs.k_new[0]) and torch.equal(inputs.k[0, :10],
                                                                            before[0, :10])
    assert outputs.out.shape == inputs.q.shape and outputs.lse.shape == (2, 4, 2)


def test_flash_attn_rotary_and_per_batch_alibi_reach_the_kernel():
    backend = fake("flash-attn", "fake_flash_attn2")
    case = Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=64, seqlens_k=(10, 20),
                heads_q=2, head_dim=32, dtype="float16", seqlen_new=1, rotary_dim=16,
                rotary_interleaved=True, alibi=True, alibi_slopes="random-per-batch")
    inputs = make_inputs(case)
    backend.forward(inputs)
    kwargs = calls(backend)[0][2]
    assert kwargs["rotary_cos"] is inputs.rotary_cos and kwargs["rotary_sin"] is inputs.rotary_sin
    assert kwargs["rotary_interleaved"] is True
    assert kwargs["alibi_slopes"].shape == (2, 2)


# ------------------------------------------------------------------------ flash-attn3


@pytest.mark.parametrize("always_tuple", [False, True], ids=["out-or-tuple", "before-pr1851"])
def test_fa3_both_return_conventions(always_tuple, monkeypatch):
    backend = fake("flash-attn3", "fake_flash_attn3")
    monkeypatch.setattr(backend.module, "ALWAYS_TUPLE", always_tuple)
    case = Case(batch=2, seqlen_q=33, seqlen_k=47, heads_q=4, heads_kv=2, head_dim=32,
                dtype="bfloat16", causal=True, window=(8, 0), softcap=4.0)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    assert verdict.metrics["lse"]["mismatched"] == 0
    name, args, kwargs = calls(backend)[0]
    assert name == "flash_attn_func" and len(args) == 3
    assert set(kwargs) == {"softmax_scale", "causal", "window_size", "softcap", "deterministic",
                           "return_attn_probs"}, "no dropout_p, no alibi_slopes"


def test_fa3_has_no_dropout_or_alibi_and_no_paged_varlen():
    backend = fake("flash-attn3", "fake_flash_attn3")
    dropout = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=16, dropout_p=0.1)
    assert any("flash-attn3 has no dropout" in r for r in backend.unsupported_reasons(dropout, CPU))
    alibi = dropout.replace(dropout_p=0.0, alibi=True)
    assert any("flash-attn3 has no ALiBi" in r for r in backend.unsupported_reasons(alibi, CPU))
    paged = Case(entry="varlen", batch=2, seqlens_q=(3, 5), seqlens_k=(40, 17), heads_q=2,
                 head_dim=16, paged_block_size=16)
    assert backend.call_reasons(paged, CPU) == [
        f"flash-attn3@{FAKES}/fake_flash_attn3.py: flash_attn_varlen_func takes no page_table "
        "argument, which paged needs"]


def test_fa3_paged_kvcache_uses_page_table_of_any_block_size():
    backend = fake("flash-attn3", "fake_flash_attn3")
    case = Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=50, seqlens_k=(50, 7),
                heads_q=2, head_dim=16, dtype="float16", paged_block_size=5)
    assert backend.unsupported_reasons(case, CPU) == []
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    kwargs = calls(backend)[0][2]
    assert "page_table" in kwargs and "block_table" not in kwargs


def test_fa3_varlen_and_arch():
    backend = fake("flash-attn3", "fake_flash_attn3")
    case = Case(entry="varlen", batch=3, seqlens_q=(5, 1, 17), seqlens_k=(9, 4, 17), heads_q=4,
                heads_kv=1, head_dim=32, dtype="float16", causal=True)
    assert fwd(case, backend).status == "pass"
    assert len(calls(backend)[0][1]) == 7
    installed = load_backend("flash-attn3")
    installed.flavor = "cuda"  # describe the Hopper build, installed or not
    assert installed.unsupported_reasons(case.replace(), A100)[0] == (
        "sm_80 is not Hopper (sm_90), which flash-attn3 needs (hopper/README.md)")
    assert not any("Hopper" in r for r in installed.unsupported_reasons(case, H100))


# ------------------------------------------------------------------------------ aiter


def test_aiter_window_is_a_triple_and_deterministic_is_explicit():
    backend = fake("aiter", "fake_aiter")
    case = Case(batch=2, seqlen_q=40, seqlen_k=64, heads_q=4, heads_kv=2, head_dim=32,
                dtype="float16", window=(7, 3), alibi=True)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    name, args, kwargs = calls(backend)[0]
    assert name == "flash_attn_func" and len(args) == 3
    assert kwargs["window_size"] == (7, 3, 0)
    assert kwargs["deterministic"] is True and kwargs["return_lse"] is True
    assert verdict.metrics["lse"]["mismatched"] == 0


def test_aiter_softcap_is_logits_soft_cap_in_varlen_only():
    backend = fake("aiter", "fake_aiter")
    varlen = Case(entry="varlen", batch=2, seqlens_q=(6, 10), seqlens_k=(12, 5), heads_q=2,
                  head_dim=32, dtype="bfloat16", softcap=5.0, causal=True)
    verdict = fwd(varlen, backend)
    assert verdict.status == "pass", verdict.reason
    assert calls(backend)[0][2]["logits_soft_cap"] == 5.0
    dense = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=16, softcap=5.0)
    assert backend.call_reasons(dense, CPU) == [
        f"aiter@{FAKES}/fake_aiter.py: flash_attn_func takes no logits_soft_cap or softcap "
        "argument, which softcap needs"]


def test_aiter_has_no_kvcache_and_paged_varlen_takes_block_table():
    backend = fake("aiter", "fake_aiter")
    kv = Case(entry="kvcache", batch=1, seqlen_q=1, seqlen_k=8, heads_q=1, head_dim=16)
    assert backend.call_reasons(kv, CPU) == [f"aiter@{FAKES}/fake_aiter.py has no kvcache entry "
                                             "point"]
    paged = Case(entry="varlen", batch=2, seqlens_q=(3, 5), seqlens_k=(40, 17), heads_q=2,
                 head_dim=16, dtype="float16", paged_block_size=16)
    assert fwd(paged, backend).status == "pass"
    assert "block_table" in calls(backend)[0][2]


def test_aiter_window_argument_follows_the_signature():
    assert window_argument((4, 0), (-1, -1, 0)) == (4, 0, 0)
    assert window_argument((4, 0), (-1, -1)) == (4, 0)


# ------------------------------------------------------------------------------- vLLM


def test_vllm_max_seqlen_q_comes_before_cu_seqlens_q():
    backend = fake("vllm-flash-attn", "fake_vllm")
    case = Case(entry="varlen", batch=3, seqlens_q=(5, 1, 17), seqlens_k=(9, 4, 17), heads_q=4,
                heads_kv=2, head_dim=32, dtype="float16", causal=True)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    name, args, kwargs = calls(backend)[0]
    assert name == "flash_attn_varlen_func" and len(args) == 6
    assert args[3] == 17 and args[4].tolist() == [0, 5, 6, 23] and args[5] == 17
    assert kwargs["cu_seqlens_k"].tolist() == [0, 9, 13, 30] and "seqused_k" not in kwargs
    assert kwargs["return_softmax_lse"] is True


def test_vllm_paged_varlen_uses_seqused_k():
    backend = fake("vllm-flash-attn", "fake_vllm")
    case = Case(entry="varlen", batch=2, seqlens_q=(3, 5), seqlens_k=(40, 17), heads_q=2,
                head_dim=16, dtype="bfloat16", paged_block_size=16)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    kwargs = calls(backend)[0][2]
    assert kwargs["cu_seqlens_k"] is None and kwargs["seqused_k"].tolist() == [40, 17]
    assert kwargs["seqused_k"].dtype == torch.int32 and "block_table" in kwargs


def test_vllm_is_inference_only_without_dense():
    backend = fake("vllm-flash-attn", "fake_vllm")
    assert backend.capabilities.backward is False and "dense" not in backend.capabilities.entries
    dense = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=16)
    assert backend.call_reasons(dense, CPU) == [
        f"vllm-flash-attn@{FAKES}/fake_vllm.py has no dense entry point"]


# ---------------------------------------------------------------------------- xformers


def test_xformers_bottom_right_causal_mask_object():
    backend = fake("xformers", "fake_xformers")
    case = Case(batch=2, seqlen_q=20, seqlen_k=50, heads_q=4, head_dim=32, dtype="float16",
                causal=True, scale=0.2)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    _, args, kwargs = calls(backend)[0]
    assert type(kwargs["attn_bias"]).__name__ == "LowerTriangularFromBottomRightMask"
    assert kwargs["scale"] == 0.2 and args[0].shape == (2, 20, 4, 32)


def test_xformers_gqa_goes_in_as_bmghk():
    backend = fake("xformers", "fake_xformers")
    case = Case(batch=2, seqlen_q=16, seqlen_k=24, heads_q=8, heads_kv=2, head_dim=16,
                dtype="float32")
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    q, k, _ = calls(backend)[0][1]
    assert q.shape == (2, 16, 2, 4, 16) and k.shape == (2, 24, 2, 4, 16)
    assert k.stride(3) == 0, "k is expanded over the heads of a group, not copied"


def test_xformers_varlen_block_diagonal_from_bottom_right():
    backend = fake("xformers", "fake_xformers")
    case = Case(entry="varlen", batch=3, seqlens_q=(5, 2, 17), seqlens_k=(9, 4, 17), heads_q=2,
                head_dim=32, dtype="bfloat16", causal=True)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    _, args, kwargs = calls(backend)[0]
    bias = kwargs["attn_bias"]
    assert type(bias).__name__ == "BlockDiagonalCausalFromBottomRightMask"
    assert (bias.q_seqlen, bias.kv_seqlen) == ([5, 2, 17], [9, 4, 17])
    assert args[0].shape == (1, 24, 2, 32)


def test_xformers_window_and_alibi_are_an_aligned_tensor_bias():
    backend = fake("xformers", "fake_xformers")
    case = Case(batch=1, seqlen_q=30, seqlen_k=45, heads_q=2, head_dim=16, dtype="float32",
                window=(6, 2), alibi=True)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    bias = calls(backend)[0][2]["attn_bias"]
    assert bias.shape == (1, 2, 30, 45) and bias.stride(-2) % 8 == 0
    softcap = case.replace(softcap=2.0, alibi=False)
    assert "memory_efficient_attention has no softcap" in backend.unsupported_reasons(softcap,
                                                                                     CPU)


# ------------------------------------------------------------------------ flex-attention


def test_flex_fake_block_mask_score_mod_and_return_lse():
    backend = fake("flex-attention", "fake_flex")
    case = Case(batch=2, seqlen_q=40, seqlen_k=24, heads_q=4, heads_kv=2, head_dim=16,
                dtype="float32", causal=True, softcap=3.0, alibi=True)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    (mask_call,) = calls(backend, "create_block_mask")
    assert mask_call[1][1:] == (None, None, 40, 24)
    _, args, kwargs = calls(backend, "flex_attention")[0]
    assert args[0].shape == (2, 4, 40, 16) and args[1].shape == (2, 2, 24, 16), "BHSD"
    assert kwargs["enable_gqa"] is True and kwargs["return_lse"] is True
    assert kwargs["score_mod"] is not None
    assert verdict.metrics["lse"]["mismatched"] == 0


def test_flex_fake_varlen_document_mask_and_lse_layout():
    backend = fake("flex-attention", "fake_flex")
    case = Case(entry="varlen", batch=3, seqlens_q=(5, 0, 17), seqlens_k=(9, 4, 11), heads_q=2,
                head_dim=16, dtype="float32", window=(3, 1), alibi=True,
                alibi_slopes="random-per-batch")
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    args = calls(backend, "flex_attention")[0][1]
    assert args[0].shape == (1, 2, 22, 16)
    assert verdict.metrics["lse"]["mismatched"] == 0, "(1, H, total) came back as (H, total)"


def test_flex_lse_request_follows_the_torch_api():
    def new(q, k, v, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
            return_lse=False, kernel_options=None, *, return_aux=None):
        return q

    class AuxRequest:
        def __init__(self, lse=False):
            self.lse = lse

    newer = types.SimpleNamespace(flex_attention=new, AuxRequest=AuxRequest)
    request = lse_request(newer)
    assert list(request) == ["return_aux"] and request["return_aux"].lse is True
    older = types.SimpleNamespace(flex_attention=lambda q, k, v, return_lse=False: q)
    assert lse_request(older) == {"return_lse": True}
    out, lse = object(), object()
    assert unpack((out, types.SimpleNamespace(lse=lse))) == (out, lse)
    assert unpack((out, lse)) == (out, lse) and unpack(out) == (out, None)


def test_flex_attention_runs_compiled_on_this_cpu():
    """The built-in backend for real: torch.compile(flex_attention) through inductor's C++
    backend (each new shape compiles, about 5-20 s here). On the CPU torch supports inference
    only and no lse, which the capabilities say."""
    backend = load_backend("flex-attention")
    assert backend.availability() is None, backend.availability()
    if torch.cuda.is_available():  # pragma: no cover - this suite runs on CPUs
        pytest.skip("the CPU flavor is what this test pins")
    assert backend.flavor == "cpu" and backend.capabilities.backward is False
    assert backend.capabilities.returns_lse is False
    assert backend.capabilities.check_reasons("bwd", Case(batch=1, seqlen_q=8, heads_q=1),
                                              backend.name) == [
        "torch.compile on CPU only supports inference and `return_lse` is not supported yet "
        "(torch/_inductor/kernel/flex/flex_cpu.py)"]
    case = Case(batch=2, seqlen_q=40, seqlen_k=72, heads_q=4, heads_kv=2, head_dim=32,
                dtype="float32", causal=True, softcap=4.0)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    assert backend.dynamic_failure == "", "the dynamic-shape graph compiled on this CPU"


def test_a_failed_dynamic_compile_sends_only_its_own_case_to_a_static_graph(monkeypatch):
    """torch 2.13's CPU template fails to compile a varlen document mask with dynamic shapes at
    some sizes (b3 q64 h4 d64, not b2 q28). The fallback to static graphs used to hold for every
    later case of the backend, so what a case compiled depended on the cases before it: a
    replay, or the warmer going through the suite backwards, compiled other graphs than the run
    (the warmer's then went unused)."""
    backend = load_backend("flex-attention")
    if backend.availability() is not None or backend.target is not None:
        pytest.skip(f"torch's own flex_attention is needed: {backend.availability()}")

    class InductorError(Exception):  # the name torch's compile failures carry
        pass

    asked: list[tuple[str, bool]] = []
    calling: list[str] = []

    def function(dynamic):
        def call(q, k, v, **kwargs):
            asked.append((calling[-1], dynamic))
            if dynamic and calling[-1] == "varlen-b3":
                raise InductorError("CppCompileError: C++ compile error")
            return q
        return call

    monkeypatch.setattr(backend, "_function", function)
    for case_id in ("varlen-b3", "dense", "varlen-b3", "varlen-b2", "dense"):
        calling.append(case_id)
        backend._call(None, None, None, {}, case_id)
    assert asked == [("varlen-b3", True), ("varlen-b3", False), ("dense", True),
                     ("varlen-b3", False), ("varlen-b2", True), ("dense", True)]
    assert backend.dynamic_failure.startswith("InductorError")


# ----------------------------------------------------------------------- machine facts


def test_machine_facts_are_strings_and_rocm_library_only_on_rocm():
    facts = machine_facts(hip="")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in facts.items())
    assert "sdpa_rocm_library" not in facts
    assert machine_facts(hip="6.2.41133")["sdpa_rocm_library"] == "aotriton"


def test_machine_facts_import_no_kernel_and_not_the_target_module():
    code = ("import sys, json, harness.backends as b; f = b.machine_facts(); "
            "print(json.dumps({'facts': f, 'mods': sorted(m for m in sys.modules if m.split('.')[0]"
            " in ('flash_attn', 'flash_attn_interface', 'aiter', 'vllm', 'xformers') or "
            "m == 'harness.target')}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mods"] == []


@pytest.mark.parametrize("bound, want", [
    ("aiter.ops.triton._triton_kernels.flash_attn_triton_amd.interface_v2", "rocm-triton-aiter"),
    ("flash_attn.flash_attn_triton_amd.interface_fa", "rocm-triton"),
    ("flash_attn_2_cuda", "rocm-ck"),
])
def test_detect_flavor_from_the_bound_kernel_module(bound, want):
    module = types.SimpleNamespace(flash_attn_gpu=types.SimpleNamespace(__name__=bound),
                                   USE_TRITON_ROCM=False)
    assert detect_flavor("6.2", {}, module) == want


@pytest.mark.parametrize("hip, env, installed, want", [
    ("", {}, {"cuda_extension": True}, "cuda"),
    ("6.2", {}, {"cuda_extension": True}, "rocm-ck"),
    # PR #2343: on HIP without flash_attn_2_cuda, flash-attn falls back to Triton, which on
    # current upstream is AITER's (PR #2230) ...
    ("6.2", {}, {"cuda_extension": False, "in_tree_triton": False, "aiter": True},
     "rocm-triton-aiter"),
    # ... and the in-tree one on 2.7/2.8
    ("6.2", {}, {"cuda_extension": False, "in_tree_triton": True, "aiter": False}, "rocm-triton"),
    ("6.2", {"FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE"},
     {"cuda_extension": True, "in_tree_triton": True, "aiter": True}, "rocm-triton"),
    ("6.2", {"FLASH_ATTENTION_TRITON_AMD_ENABLE": "true"}, {"cuda_extension": True}, "rocm-ck"),
])
def test_detect_flavor_without_importing(hip, env, installed, want):
    assert detect_flavor(hip, env, None, installed) == want


def test_the_aiter_triton_flavor_has_cited_capabilities_and_amd_rules():
    caps = FLAVOR_CAPABILITIES["rocm-triton-aiter"]
    assert "window" not in caps.features and "unmeasured" in caps.notes["window"]
    backend = FlashAttnBackend(module=load_backend(f"flash-attn@{FAKES}/fake_flash_attn2.py")
                               .module, flavor="rocm-triton-aiter")
    case = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=16)
    assert backend.unsupported_reasons(case, H100)[0].startswith(
        "flash-attn rocm-triton-aiter does not run on nvidia devices")


def test_lse_rows_without_keys_conventions_are_declared():
    for family in FAMILIES.values():
        cls = family.backend_class()
        convention = getattr(cls, "convention", None)
        if family.name == "sdpa":
            continue
        assert convention is not None, family.name
        assert convention.lse_empty_rows in ("+inf", "-inf", "none") or \
            convention.lse_empty_rows.startswith("+inf"), family.name
        assert convention.lse_base in ("e", "2") and convention.source


@pytest.mark.parametrize("layout", ["packed-qkv", "packed-kv"])
def test_grads_of_a_packed_entry_point_are_read_from_the_buffer(layout):
    """qkvpacked/kvpacked kernels use the buffer, not the q, k, v views of it: differentiating
    with respect to the views finds them unused; the checks read them from the buffer."""
    from harness.checks.contract import grad_leaves

    backend = fake("flash-attn", "fake_flash_attn2")
    case = Case(batch=2, seqlen_q=12, heads_q=2, head_dim=8, dtype="float32", causal=True,
                layout=layout)
    used = make_inputs(case).with_grad()
    out = backend.forward(used).out
    assert calls(backend)[0][0] in ("flash_attn_qkvpacked_func", "flash_attn_kvpacked_func")
    with pytest.raises(RuntimeError, match="appears to not have been used"):
        torch.autograd.grad(out, (used.q, used.k, used.v), used.dout, retain_graph=True)
    leaves, unpack = grad_leaves(used)
    dq, dk, dv = unpack(torch.autograd.grad(out, leaves, used.dout))
    plain = [t.detach().clone().requires_grad_(True) for t in (used.q, used.k, used.v)]
    module = backend.module
    want = torch.autograd.grad(module.flash_attn_func(*plain, causal=True), plain, used.dout)
    for got, expected in zip((dq, dk, dv), want, strict=True):
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6)


def test_paged_varlen_is_forward_only():
    backend = fake("flash-attn", "fake_flash_attn2")
    case = Case(entry="varlen", batch=2, seqlens_q=(3, 5), seqlens_k=(40, 17), heads_q=2,
                head_dim=16, paged_block_size=16)
    assert backend.capabilities.check_reasons("bwd", case, backend.name)[0].startswith(
        "a paged KV cache is forward-only")


def test_fa3_module_flavor_claims_only_the_dtypes_fa3_takes(tmp_path, monkeypatch):
    """hopper/flash_api.cpp: "FlashAttention only supports fp16, bf16, and fp8_e4m3 data
    type": a module given as flash-attn3@FILE is not asked e4m3fnuz, e5m2 or float32, even when
    it declares them."""
    (tmp_path / "fa3_all_fp8.py").write_text(textwrap.dedent("""
        ATTN_HARNESS_CAPABILITIES = {"dtypes": ["float16", "bfloat16", "float32",
                                                "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2"]}
        def flash_attn_func(q, k, v, softmax_scale=None, causal=False, q_descale=None,
                            k_descale=None, v_descale=None, return_attn_probs=False):
            return q
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    backend = load_backend("flash-attn3@fa3_all_fp8")
    assert backend.capabilities.dtypes == {"float16", "bfloat16", "float8_e4m3fn"}
    for dtype in ("float8_e4m3fnuz", "float8_e5m2", "float32"):
        case = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=64, dtype=dtype)
        (why,) = backend.unsupported_reasons(case, CPU)
        assert why.startswith(f"dtype={dtype} is not supported by flash-attn3@fa3_all_fp8 ")
        assert "\"FlashAttention only supports fp16, bf16, and fp8_e4m3 data type\"" in why
    assert FLAVOR_CAPABILITIES_FA3["cuda"].dtypes == backend.capabilities.dtypes
    mla_fp8 = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=64, head_dim_v=512,
                   dtype="float8_e4m3fn")
    assert "\"HeaddimV > 256 requires fp16 and bf16 data type\"" in \
        backend.unsupported_reasons(mla_fp8, CPU)[-1]


# ------------------------------------------------ combinations the originals refuse (issue 26)


def _original_like(tmp_path, monkeypatch, name, flavor=""):
    """A flash-attn module that refuses what flash_api.cpp's mha_fwd_kvcache refuses (a
    RuntimeError, as a TORCH_CHECK raises) and otherwise answers like the fake."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(FAKES)!r})
        import fake_flash_attn2 as _fake
        {f"ATTN_HARNESS_FLAVOR = {flavor!r}" if flavor else ""}
        flash_attn_func = _fake.flash_attn_func
        def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                                    rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                                    cache_leftpad=None, block_table=None, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0,
                                    rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                                    return_softmax_lse=False):
            if block_table is not None and cache_batch_idx is not None:
                raise RuntimeError("Paged KVcache does not support cache_batch_idx")
            if block_table is not None and cache_leftpad is not None:
                raise RuntimeError("We don't support Paged KV and leftpad_k running at the "
                                   "same time yet")
            raise AssertionError("only the refused combinations are asked here")
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return load_backend(f"flash-attn@{name}")


PAGED = Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=512, seqlens_k=(300, 17),
             heads_q=2, head_dim=16, dtype="float16", paged_block_size=256)


@pytest.mark.parametrize("combination, words", [
    (dict(cache_batch_idx=True), "\"Paged KVcache does not support cache_batch_idx\""),
    (dict(cache_leftpad=(3, 0)),
     "\"We don't support Paged KV and leftpad_k running at the same time yet\""),
])
def test_combinations_the_original_refuses_are_skips_in_its_words(tmp_path, monkeypatch,
                                                                  combination, words):
    """A real flash-attn raises RuntimeError on a paged cache with cache_batch_idx or
    cache_leftpad (csrc/flash_attn/flash_api.cpp, mha_fwd_kvcache): posed, a correct kernel
    would count an error. The module flavor and the CUDA build skip them with the original's
    words; --audit still runs them, and a loud refusal is 'rejected' (good)."""
    from harness.checks.plan import plan
    from harness.checks.runner import run_plan

    backend = _original_like(tmp_path, monkeypatch, "fa_refusing")
    case = PAGED.replace(**combination)
    skipped = plan(case, backend, CPU, ("fwd",))
    assert skipped.run == () and words in skipped.skips["fwd"]
    assert "flash_api.cpp" in skipped.skips["fwd"]
    cuda = FlashAttnBackend(module=backend.module, flavor="cuda")
    assert any(words in r for r in cuda.capabilities.reasons(case, "flash-attn"))
    audited = plan(case, backend, CPU, ("fwd",), audit=True)
    assert audited.run == ("fwd",)
    (verdict,) = run_plan(audited, backend, CPU, seed=0, profile=get_profile("quick"),
                          device="cpu")
    assert verdict.status == "skip" and verdict.metrics["audit"] == "rejected"
    assert words.strip('"') in verdict.reason


def test_ck_refuses_paged_batch_idx_and_ignores_leftpad_in_its_own_words():
    """CK differs: it refuses paged + cache_batch_idx like the CUDA build, but takes
    cache_leftpad and ignores it (a commented-out parameter), paged or not."""
    ck = FLAVOR_CAPABILITIES["rocm-ck"]
    batch_idx = ck.reasons(PAGED.replace(cache_batch_idx=True, paged_block_size=128), "ck")
    assert batch_idx == ["\"Paged KVcache does not support cache_batch_idx\" "
                         "(ROCm/flash-attention csrc/flash_attn_ck/mha_fwd_kvcache.cpp l.308)"]
    leftpad = ck.reasons(PAGED.replace(cache_leftpad=(3, 0), paged_block_size=0), "ck")
    assert leftpad == [ck.notes["leftpad"]] and "silently ignored" in leftpad[0]
    aiter_triton = FLAVOR_CAPABILITIES["rocm-triton-aiter"]
    assert "interface_v2.py" in aiter_triton.notes["leftpad"]
    assert "num_splits > 1 not supported" in aiter_triton.notes["splits"]


# ------------------------------------------------------------------------ flash-attn4 (FA4)


def test_fa4_dense_call_window_none_and_return_lse():
    """Everything after v by name (qv is the fourth positional parameter), unbounded sides
    None, causal as causal=True, return_lse=True (the lse is None without it)."""
    backend = fake("flash-attn4", "fake_flash_attn4")
    case = Case(batch=2, seqlen_q=33, seqlen_k=47, heads_q=4, heads_kv=2, head_dim=32,
                dtype="bfloat16", causal=True, softcap=4.0, scale=0.3)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    assert verdict.metrics["lse"]["mismatched"] == 0
    name, args, kwargs = calls(backend)[0]
    assert name == "flash_attn_func" and len(args) == 3
    assert kwargs == {"softmax_scale": 0.3, "causal": True, "window_size": (None, None),
                      "softcap": 4.0, "return_lse": True, "deterministic": True}


@pytest.mark.parametrize("window, causal, want", [
    ((-1, 5), False, (False, (None, 5))),
    ((7, -1), False, (False, (7, None))),
    ((7, 0), True, (True, (7, None))),
    ((-1, 0), False, (True, (None, None))),
    ((3, 2), False, (False, (3, 2))),
])
def test_fa4_window_is_translated_to_none_for_unbounded_sides(window, causal, want):
    """FA4 takes integers literally, and a pair with left + right < 0 as unbounded
    (_resolve_causal_local_window @ 0251105a): flash-attn's -1 must never reach it."""
    from harness.backends.fa4 import window_argument

    backend = fake("flash-attn4", "fake_flash_attn4")
    case = Case(batch=1, seqlen_q=40, seqlen_k=60, heads_q=2, head_dim=16, dtype="float16",
                window=window, causal=causal)
    assert window_argument(case) == want
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    kwargs = calls(backend)[0][2]
    assert (kwargs["causal"], kwargs["window_size"]) == want


def test_fa4_minus_one_means_what_the_version_says():
    """At fa4-v4.0.0.beta27, (-1, 0) is full attention (left + right < 0), not causal and not
    an empty band; (-1, 5) is a literal band right of the diagonal. The adapter's None keeps
    clear of both."""
    ref = load_backend(f"flash-attn4@{FAKES.parent / 'fa4_ref.py'}").module
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 16, dtype=torch.float16) for n in (9, 9, 9))
    full = ref.flash_attn_func(q, k, v)[0]
    assert torch.equal(ref.flash_attn_func(q, k, v, window_size=(-1, 0))[0], full)
    causal = ref.flash_attn_func(q, k, v, causal=True)[0]
    assert not torch.equal(causal, full)
    assert torch.equal(ref.flash_attn_func(q, k, v, window_size=(None, 0))[0], causal)
    band = ref.flash_attn_func(q, k, v, window_size=(-1, 5), return_lse=True)
    assert torch.isinf(band[1][0, :, -1]).all(), "the last row sees no key right of itself"


def test_fa4_varlen_all_by_name_and_padded_uses_seqused():
    backend = fake("flash-attn4", "fake_flash_attn4")
    case = Case(entry="varlen", batch=3, seqlens_q=(5, 0, 17), seqlens_k=(9, 4, 17),
                heads_q=4, heads_kv=1, head_dim=32, dtype="float16", causal=True)
    assert fwd(case, backend).status == "pass"
    name, args, kwargs = calls(backend)[0]
    assert name == "flash_attn_varlen_func" and len(args) == 3
    assert kwargs["cu_seqlens_q"].tolist() == [0, 5, 5, 22]
    assert kwargs["cu_seqlens_k"].tolist() == [0, 9, 13, 30]
    assert (kwargs["max_seqlen_q"], kwargs["max_seqlen_k"]) == (17, 17)
    assert "seqused_k" not in kwargs and "page_table" not in kwargs
    backend.module.CALLS.clear()
    padded = case.replace(layout="padded")
    verdict = fwd(padded, backend)
    assert verdict.status == "pass", verdict.reason
    kwargs = calls(backend)[0][2]
    assert kwargs["seqused_q"].tolist() == [5, 0, 17] and kwargs["seqused_k"].tolist() == [9, 4, 17]
    assert kwargs["cu_seqlens_q"].tolist() == [0, 64, 128, 192], "slot offsets"


def test_fa4_paged_varlen_and_kvcache_use_page_table_and_seqused_k():
    """page_table is refused with cu_seqlens_k, and without seqused_k every sequence is the
    table's length: the adapter passes seqused_k and no cu_seqlens_k. The kv-cache entry is
    flash_attn_varlen_func with a dense q (FA4 has no flash_attn_with_kvcache)."""
    backend = fake("flash-attn4", "fake_flash_attn4")
    case = Case(entry="varlen", batch=2, seqlens_q=(3, 5), seqlens_k=(40, 17), heads_q=2,
                head_dim=16, dtype="bfloat16", paged_block_size=16, causal=True)
    inputs = make_inputs(case)
    assert fwd(case, backend).status == "pass"
    _, args, kwargs = calls(backend)[0]
    assert args[1].shape == inputs.k_pages.shape and "cu_seqlens_k" not in kwargs
    assert torch.equal(kwargs["page_table"], inputs.block_table)
    assert kwargs["seqused_k"].tolist() == [40, 17]
    backend.module.CALLS.clear()
    cache = Case(entry="kvcache", batch=3, seqlen_q=1, seqlen_k=64, seqlens_k=(64, 0, 30),
                 heads_q=8, heads_kv=1, head_dim=32, dtype="float16", paged_block_size=16)
    verdict = fwd(cache, backend)
    assert verdict.status == "pass", verdict.reason
    name, args, kwargs = calls(backend)[0]
    assert name == "flash_attn_varlen_func" and args[0].shape == (3, 1, 8, 32)
    assert "cu_seqlens_q" not in kwargs and kwargs["seqused_k"].tolist() == [64, 0, 30]
    assert "page_table" in kwargs


def test_fa4_learnable_sink_and_the_absorbed_mla_form():
    backend = fake("flash-attn4", "fake_flash_attn4")
    sink = Case(batch=2, seqlen_q=40, seqlen_k=24, heads_q=4, heads_kv=2, head_dim=32,
                dtype="bfloat16", causal=True, learnable_sink=True)
    verdict = fwd(sink, backend)
    assert verdict.status == "pass", verdict.reason
    kwargs = calls(backend)[0][2]
    sinks = kwargs["learnable_sink"]
    assert sinks.shape == (4,) and sinks.dtype == torch.float32
    backend.module.CALLS.clear()
    mla = Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=100, seqlens_k=(100, 37),
               heads_q=16, heads_kv=1, head_dim=576, head_dim_v=512, layout="latent-kv",
               dtype="bfloat16", paged_block_size=32)
    verdict = fwd(mla, backend)
    assert verdict.status == "pass", verdict.reason
    _, args, kwargs = calls(backend)[0]
    assert args[0].shape[-1] == 64 and args[1].shape[-1] == 64 and args[2].shape[-1] == 512
    assert kwargs["qv"].shape[-1] == 512
    assert kwargs["softmax_scale"] == pytest.approx(576 ** -0.5), "passed, not FA4's default"
    assert verdict.metrics["lse"]["mismatched"] == 0, "heads-last lse put back"


def test_fa4_fp8_goes_through_flash_attn_fwd_with_descales():
    backend = fake("flash-attn4", "fake_flash_attn4")
    case = Case(batch=1, seqlen_q=64, seqlen_k=200, heads_q=4, heads_kv=2, head_dim=64,
                dtype="float8_e4m3fn", causal=True)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    name, args, kwargs = calls(backend)[0]
    assert name == "_flash_attn_fwd" and args[0].dtype == torch.float8_e4m3fn
    assert kwargs["q_descale"].shape == (1, 2) and kwargs["window_size_right"] is None
    f32_out = case.replace(fp8_out="float32")
    assert any("FA4 returns bfloat16 for fp8 inputs" in r
               for r in backend.unsupported_reasons(f32_out, CPU))


def test_fa4_claims_per_architecture_are_cited():
    from harness.backends.fa4 import ARCH_CAPABILITIES, FlashAttn4Backend

    module = fake("flash-attn4", "fake_flash_attn4").module

    def reasons(flavor, **fields):
        case = Case(**{"batch": 1, "seqlen_q": 8, "seqlen_k": 64, "heads_q": 2,
                       "head_dim": 64, "dtype": "bfloat16", **fields})
        return FlashAttn4Backend(module=module, flavor=flavor).unsupported_reasons(case, H100)

    paged = dict(entry="kvcache", seqlens_k=(40,), paged_block_size=16)
    assert any("\"paged KV not supported on SM 8.0\"" in r for r in reasons("sm80", **paged))
    assert any("Paged KV not supported on SM 12.0" in r for r in reasons("sm120", **paged))
    assert reasons("sm90", **paged) == [] and reasons("sm100", **paged) == []
    assert any("Learnable sink is not supported in this kernel" in r
               for r in reasons("sm80", learnable_sink=True))
    assert any("SplitKV not supported on SM 9.0" in r for r in reasons("sm90", num_splits=2))
    assert reasons("sm100", num_splits=2) == []
    assert any("FP8 is only supported on SM100" in r
               for r in reasons("sm90", dtype="float8_e4m3fn"))
    assert any("(192, 128)" in r or "q/k 192-192 with v 128-128" in r
               for r in reasons("sm100", head_dim=160, head_dim_v=96)), "SM100's pairs"
    assert reasons("sm90", head_dim=160, head_dim_v=96) == []
    assert any("is not taken on sm100" in r for r in reasons("sm100", head_dim=160))
    latent = dict(entry="kvcache", seqlen_q=1, seqlens_k=(64,), heads_q=16, heads_kv=1,
                  head_dim=576, head_dim_v=512, layout="latent-kv")
    assert reasons("sm100", **latent) == []
    assert any("only support Blackwell arch with qv" in r for r in reasons("sm90", **latent))
    assert any("local not yet supported with qv" in r
               for r in reasons("sm100", window=(8, 0), **latent))
    assert not ARCH_CAPABILITIES["sm80"].backward and ARCH_CAPABILITIES["sm90"].backward
    assert ARCH_CAPABILITIES["sm90"].finite_padding >= {"page-tail", "cache-tail", "varlen-gap"}
    volta = from_facts({"torch_version_cuda": "12.4", "device_count": 1,
                        "device_name": "Tesla V100", "capability": [7, 0]})
    installed = FlashAttn4Backend(module=module, flavor="sm90")
    assert installed.unsupported_reasons(Case(batch=1, seqlen_q=8, heads_q=1), volta)[0] \
        .startswith("sm_70 is not an FA4 architecture")


def test_fa4_arch_and_version_are_read_as_fa4_reads_them(monkeypatch):
    from importlib import metadata

    from harness.backends import fa4

    assert fa4.detect_arch({"FLASH_ATTENTION_ARCH": "sm_90a"}) == 90
    assert fa4.detect_arch({"FLASH_ATTENTION_ARCH": "100"}) == 100
    assert [fa4.arch_flavor(c) for c in (80, 86, 90, 100, 103, 110, 120, 70)] == \
        ["sm80", "sm80", "sm90", "sm100", "sm100", "sm110", "sm120", ""]
    asked = []

    def version(dist):
        asked.append(dist)
        if dist == "flash-attn-4":
            return "4.0.0b36"
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(metadata, "version", version)
    assert fa4.machine_facts() == {"flash_attn_4": "4.0.0b36"} and asked == ["flash-attn-4"]


def test_fa4_finite_padding_holds_junk_not_nan_in_the_page_tail():
    """FA4 loads whole 128-key tiles (Dao #2374): the last page's tail gets large finite junk;
    pages no sequence names stay NaN."""
    backend = fake("flash-attn4", "fake_flash_attn4")
    case = Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=64, seqlens_k=(40, 9),
                heads_q=2, head_dim=16, dtype="float16", paged_block_size=16)
    run = CaseRun(case, backend, CPU, seed=0, profile=get_profile("quick"), device="cpu")
    inputs = run.inputs
    ((attr, tail),) = [e for e in inputs.padding["page-tail"] if e[0] == "v_pages"]
    assert torch.isfinite(inputs.v_pages[tail]).all()
    unused = dict(inputs.padding["pages-unused"])["v_pages"]
    assert torch.isnan(inputs.v_pages[unused]).all()
    assert run.run("fwd").status == "pass"


# ------------------------------------------------------------------------------ flashinfer


def test_flashinfer_dense_prefill_per_sequence_with_base2_lse_converted():
    backend = fake("flashinfer", "fake_flashinfer")
    case = Case(batch=2, seqlen_q=33, seqlen_k=47, heads_q=4, heads_kv=2, head_dim=64,
                dtype="bfloat16", causal=True, window=(20, 0), softcap=3.0, scale=0.2)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    assert verdict.metrics["lse"]["mismatched"] == 0, "base 2 [tokens, heads] converted"
    prefill = calls(backend, "single_prefill_with_kv_cache")
    assert len(prefill) == 2, "one call per sequence"
    _, args, kwargs = prefill[0]
    assert [a.shape for a in args] == [(33, 4, 64), (47, 2, 64), (47, 2, 64)]
    assert kwargs == {"causal": True, "kv_layout": "NHD", "return_lse": True, "sm_scale": 0.2,
                      "window_left": 20, "logits_soft_cap": 3.0, "pos_encoding_mode": "NONE"}


@pytest.mark.parametrize("group, tensor_cores", [(8, False), (16, True), (3, False)])
def test_flashinfer_decode_uses_tensor_cores_past_the_cuda_core_gqa_ratios(group, tensor_cores):
    """The CUDA-core decode takes GQA ratios 1, 2, 3, 4, 6, 8 (utils.cuh: "Unsupported
    group_size"); 16 is posed through use_tensor_cores=True."""
    backend = fake("flashinfer", "fake_flashinfer")
    dense = Case(batch=2, seqlen_q=1, seqlen_k=90, heads_q=group, heads_kv=1, head_dim=64,
                 dtype="float16")
    assert fwd(dense, backend).status == "pass"
    (name, args, kwargs), _ = calls(backend, "single_decode_with_kv_cache")
    assert args[0].shape == (group, 64) and kwargs["use_tensor_cores"] is tensor_cores
    backend.module.CALLS.clear()
    paged = Case(entry="kvcache", batch=3, seqlen_q=1, seqlen_k=64, seqlens_k=(64, 0, 30),
                 heads_q=group, heads_kv=1, head_dim=64, dtype="bfloat16", paged_block_size=16)
    verdict = fwd(paged, backend)
    assert verdict.status == "pass", verdict.reason
    (_, _, init), (_, args, kwargs), (_, run_args, run_kw) = calls(backend)
    assert init["use_tensor_cores"] is tensor_cores
    assert len(args) == 7, "options after page_size by name (positional ones are deprecated)"
    assert args[0].tolist() == [0, 4, 4, 6] and args[2].tolist() == [16, 0, 14]
    assert args[3:] == (group, 1, 64, 16) and kwargs["q_data_type"] == torch.bfloat16
    assert run_args[0].shape == (3, group, 64) and isinstance(run_args[1], tuple)
    assert run_kw == {"return_lse": True}


def test_flashinfer_varlen_is_pages_of_one_token_and_a_cache_one_page_per_row():
    backend = fake("flashinfer", "fake_flashinfer")
    varlen = Case(entry="varlen", batch=3, seqlens_q=(5, 0, 17), seqlens_k=(9, 4, 17),
                  heads_q=4, heads_kv=1, head_dim=64, head_dim_v=128, dtype="float16",
                  causal=True)
    verdict = fwd(varlen, backend)
    assert verdict.status == "pass", verdict.reason
    (name, _, init), (_, args, kwargs), _ = calls(backend)
    assert name == "BatchPrefillWithPagedKVCacheWrapper.__init__" and init["kv_layout"] == "NHD"
    assert args[0].tolist() == [0, 5, 5, 22] and args[1].tolist() == [0, 9, 13, 30]
    assert args[2].tolist() == list(range(30)) and args[3].tolist() == [1, 1, 1]
    assert args[4:] == (4, 1, 64, 1)
    assert kwargs["head_dim_vo"] == 128 and kwargs["causal"] is True
    backend.module.CALLS.clear()
    cache = Case(entry="kvcache", batch=2, seqlen_q=4, seqlen_k=50, seqlens_k=(50, 7),
                 heads_q=2, head_dim=64, dtype="float16", causal=True)
    assert fwd(cache, backend).status == "pass"
    _, (_, args, _), (_, run_args, _) = calls(backend)
    assert args[0].tolist() == [0, 4, 8] and args[1].tolist() == [0, 1, 2]
    assert args[2].tolist() == [0, 1] and args[3].tolist() == [50, 7] and args[7] == 50
    assert run_args[0].shape == (8, 2, 64)


def test_flashinfer_heads_major_v_goes_in_as_hnd():
    backend = fake("flashinfer", "fake_flashinfer")
    case = Case(batch=2, seqlen_q=20, seqlen_k=40, heads_q=4, heads_kv=2, head_dim=64,
                dtype="float16", layout="v-transposed")
    assert fwd(case, backend).status == "pass"
    _, args, kwargs = calls(backend)[0]
    assert kwargs["kv_layout"] == "HND" and args[1].shape == (2, 40, 64)


def test_flashinfer_alibi_fits_only_where_every_key_is_left_of_the_diagonal():
    """flashinfer's bias is slope * (kv_idx - qo_idx) with the raw query index: under a
    causal mask that is flash-attn's bias plus slope * (sk - sq) per sequence (same softmax, lse
    shifted back by the adapter); elsewhere the sign differs, and with softcap the order."""
    backend = fake("flashinfer", "fake_flashinfer")
    causal = Case(batch=2, seqlen_q=30, seqlen_k=70, heads_q=8, head_dim=64, dtype="float16",
                  causal=True, alibi=True)
    verdict = fwd(causal, backend)
    assert verdict.status == "pass", verdict.reason
    assert verdict.metrics["lse"]["mismatched"] == 0
    assert calls(backend)[0][2]["pos_encoding_mode"] == "ALIBI"
    varlen = Case(entry="varlen", batch=2, seqlens_q=(5, 9), seqlens_k=(40, 9), heads_q=4,
                  head_dim=64, dtype="float16", causal=True, alibi=True)
    verdict = fwd(varlen, backend)
    assert verdict.status == "pass" and verdict.metrics["lse"]["mismatched"] == 0
    both = causal.replace(causal=False)
    assert any("opposite in sign" in r for r in backend.unsupported_reasons(both, CPU))
    capped = causal.replace(softcap=2.0)
    assert any("adds the bias before the tanh" in r
               for r in backend.unsupported_reasons(capped, CPU))
    randomly = causal.replace(alibi_slopes="random")
    assert any("slopes are fixed" in r for r in backend.unsupported_reasons(randomly, CPU))


def test_flashinfer_fp8_cache_scales_and_sinks_reach_run():
    backend = fake("flashinfer", "fake_flashinfer")
    case = Case(entry="kvcache", batch=2, seqlen_q=3, seqlen_k=80, seqlens_k=(80, 33),
                heads_q=4, heads_kv=2, head_dim=64, dtype="bfloat16", paged_block_size=16,
                kv_dtype="float8_e4m3fn", causal=True, learnable_sink=True)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    _, (_, _, plan), (_, run_args, run_kw) = calls(backend)
    assert plan["kv_data_type"] == torch.float8_e4m3fn and run_args[1][0].dtype == plan[
        "kv_data_type"]
    assert isinstance(run_kw["k_scale"], float) and isinstance(run_kw["v_scale"], float)
    assert run_kw["sinks"].shape == (4,)


def test_flashinfer_installed_flavors_claim_what_the_sources_say():
    from harness.backends.flashinfer import FLAVOR_CAPABILITIES as FI
    from harness.backends.flashinfer import FlashInferBackend

    module = fake("flashinfer", "fake_flashinfer").module
    cuda = FlashInferBackend(module=module, flavor="cuda")
    plain = Case(batch=1, seqlen_q=16, seqlen_k=32, heads_q=2, head_dim=64, dtype="float16")
    assert cuda.unsupported_reasons(plain, H100) == []
    assert "#4299" in cuda.unsupported_reasons(plain.replace(head_dim=96), H100)[0]
    assert any("silently ignored on SM80/SM90" in r for r in cuda.unsupported_reasons(
        plain.replace(entry="varlen", seqlens_q=(16,), seqlens_k=(32,), learnable_sink=True),
        H100))
    fnuz = Case(entry="kvcache", batch=1, seqlen_q=1, seqlen_k=32, heads_q=2, head_dim=64,
                dtype="float16", kv_dtype="float8_e4m3fnuz")
    assert any("not fnuz" in r for r in cuda.unsupported_reasons(fnuz, H100))
    rocm = FI["rocm"]
    assert "silently ignored on the AITER path" in rocm.notes["alibi"]
    assert "silently ignored on the AITER path" in rocm.notes["sink"]
    mi250 = from_facts({"torch_version_hip": "6.2", "device_count": 1, "gcn_arch": "gfx90a",
                        "device_name": "AMD Instinct MI250X"})
    ported = FlashInferBackend(module=module, flavor="rocm")
    assert ported.unsupported_reasons(plain, mi250)[0].startswith(
        "gfx90a is not a target of flashinfer's ROCm port")


def test_flashinfer_version_from_either_distribution(monkeypatch):
    from importlib import metadata

    from harness.backends import flashinfer

    def version(dist):
        if dist == "amd-flashinfer":
            return "0.5.3+amd.2"
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(metadata, "version", version)
    assert flashinfer.machine_facts() == {"flashinfer": "0.5.3+amd.2"}


# ----------------------------------------------------------- aiter: fp8 entry and sinks


def test_aiter_fp8_goes_through_the_pertensor_entry_without_lse():
    backend = fake("aiter", "fake_aiter")
    case = Case(batch=2, seqlen_q=40, seqlen_k=130, heads_q=4, heads_kv=2, head_dim=64,
                dtype="float8_e4m3fnuz", causal=True)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    name, args, kwargs = calls(backend)[0]
    assert name == "flash_attn_fp8_pertensor_func" and len(args) == 6
    assert [a.shape for a in args[3:]] == [(1,), (1,), (1,)], "one descale per tensor"
    assert kwargs == {"causal": True, "softmax_scale": None, "window_size": (-1, -1, 0)}
    assert not backend.returns_lse_for(case) and backend.returns_lse_for(case.replace(
        dtype="bfloat16"))
    varlen = Case(entry="varlen", batch=2, seqlens_q=(5, 30), seqlens_k=(60, 30), heads_q=2,
                  head_dim=64, dtype="float8_e4m3fn", causal=True)
    backend.module.CALLS.clear()
    assert fwd(varlen, backend).status == "pass"
    name, args, _ = calls(backend)[0]
    assert name == "flash_attn_varlen_fp8_pertensor_func" and len(args) == 10


def test_aiter_fp8_output_dtype_follows_the_path_enable_ck_selects(monkeypatch):
    from harness.backends.aiter_fa import installed_reasons

    case = Case(batch=1, seqlen_q=16, seqlen_k=64, heads_q=2, head_dim=64,
                dtype="float8_e4m3fnuz")
    ck = installed_reasons(case.replace(fp8_out="float32"), {})
    assert ck and "For FP8 input, output must have dtype BF16 for now" in ck[0]
    assert installed_reasons(case, {}) == []
    triton = {"ENABLE_CK": "0"}
    assert installed_reasons(case.replace(fp8_out="float32"), triton) == []
    assert "returns float32 on the Triton path" in installed_reasons(case, triton)[0]
    assert "per-tensor" not in " ".join(installed_reasons(case, {}))
    assert "one descale per tensor" in installed_reasons(case.replace(fp8_recipe="per-head"),
                                                         {})[0]
    backend = fake("aiter", "fake_aiter")
    monkeypatch.setattr(backend.module, "FP8_OUT", torch.float32)
    assert fwd(case.replace(fp8_out="float32"), backend).status == "pass"


def test_aiter_sink_ptr_and_sink_tokens_in_the_window():
    backend = fake("aiter", "fake_aiter")
    case = Case(batch=2, seqlen_q=60, seqlen_k=90, heads_q=4, heads_kv=2, head_dim=64,
                dtype="bfloat16", causal=True, window=(15, 0), sink_tokens=4,
                learnable_sink=True)
    verdict = fwd(case, backend)
    assert verdict.status == "pass", verdict.reason
    assert verdict.metrics["lse"]["mismatched"] == 0
    kwargs = calls(backend)[0][2]
    assert kwargs["window_size"] == (15, 0, 4)
    assert kwargs["sink_ptr"].shape == (4,) and kwargs["sink_ptr"].dtype == torch.float32


def test_aiter_sink_is_refused_where_the_asm_v3_path_drops_it():
    from harness.backends.aiter_fa import installed_reasons

    dense = Case(batch=1, seqlen_q=200, seqlen_k=300, heads_q=2, head_dim=128,
                 dtype="bfloat16", causal=True, learnable_sink=True)
    (why,) = installed_reasons(dense, {})
    assert "silently dropped on the dense ASM v3 path" in why and "l.1815-1838" in why
    assert installed_reasons(dense.replace(window=(31, 0)), {}) == []  # a sliding window: CK
    assert installed_reasons(dense.replace(head_dim=64), {}) == []


def test_an_fp8_only_aiter_module_is_explored_in_fp8(tmp_path):
    """A module with AITER's fp8 entry only serves fp8 dtypes: exploring it draws fp8 cases
    and judges them (it used to crash the explorer)."""
    from harness.run.explore import explore

    source = (FAKES / "fake_aiter.py").read_text().replace("Path(__file__).parent",
                                                           repr(str(FAKES)))
    module = tmp_path / "fp8_only_aiter.py"
    module.write_text(source + "\ndel flash_attn_func, flash_attn_varlen_func\n")
    backend = load_backend(f"aiter@{module}")
    assert backend.capabilities.dtypes == {"float8_e4m3fn", "float8_e4m3fnuz"}
    assert backend.availability() is None
    bf16 = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=64, dtype="bfloat16")
    assert "has no flash_attn_func for 16-bit inputs" in backend.unsupported_reasons(bf16, CPU)[0]
    statuses = []

    def run_case(case):  # planned as a run plans it: what the API does not take is a skip
        from harness.checks.plan import plan
        from harness.checks.runner import run_plan

        (verdict,) = run_plan(plan(case, backend, CPU, ("fwd",)), backend, CPU, seed=0,
                              profile=get_profile("quick"), device="cpu")
        statuses.append((case.dtype, verdict.status))
        return []

    result = explore(f"aiter@{module}", backend.capabilities, run_case, examples=3, seed=0)
    assert not result.skipped and statuses
    assert all(d.startswith("float8") and s in ("pass", "skip") for d, s in statuses), statuses


def test_gfx942_fnuz_runs_through_aiter_where_fa3_takes_none():
    """The fp8 fixture and its zoo take e4m3fnuz through AITER's fp8 entry (FA3 refuses the
    format): the correct fixture passes, the kernel reading fnuz bytes as fn is caught."""
    case = Case(batch=1, seqlen_q=64, seqlen_k=300, heads_q=2, head_dim=64,
                dtype="float8_e4m3fnuz", causal=True)
    fixture = load_backend("aiter@tests/fixtures/fa3_fp8_ref.py")
    assert fixture.unsupported_reasons(case, CPU) == []
    assert any("fp8_e4m3 data type" in r for r in load_backend(
        "flash-attn3@tests/fixtures/fa3_fp8_ref.py").unsupported_reasons(case, CPU))
    assert fwd(case, fixture).status == "pass"
    buggy = fwd(case, load_backend("aiter@tests/zoo/fp8/fnuz_as_fn.py"))
    assert buggy.status == "fail", buggy.reason


def test_info_lists_flash_attn4_and_flashinfer_with_their_availability():
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "info", "--json"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {b["name"]: b for b in json.loads(proc.stdout)["backends"]}
    for name, package in (("flash-attn4", "flash-attn-4"), ("flashinfer", "flashinfer-python")):
        row = rows[name]
        assert row["family"] == name and row["available"] is False  # no GPU on this machine
        assert package in row["reason"] or row["reason"].startswith("no GPU here"), row


def test_aiter_varlen_fp8_takes_only_per_tensor_descales(tmp_path):
    """flash_attn_varlen_fp8_pertensor_func takes one descale per tensor: a per-head recipe on
    varlen is refused for any module with AITER's API (exploration drew one, and it errored)."""
    source = (FAKES / "fake_aiter.py").read_text().replace("Path(__file__).parent",
                                                           repr(str(FAKES)))
    module = tmp_path / "aiter_api.py"
    module.write_text(source)
    backend = load_backend(f"aiter@{module}")
    varlen = Case(batch=2, seqlen_q=3, seqlen_k=40, heads_q=2, heads_kv=1, head_dim=32,
                  dtype="float8_e4m3fn", entry="varlen", seqlens_q=(3, 2), seqlens_k=(40, 17),
                  fp8_recipe="per-head")
    (why,) = [r for r in backend.unsupported_reasons(varlen, CPU) if "per-head" in r]
    assert "flash_attn_varlen_fp8_pertensor_func takes one descale per tensor" in why
    dense = varlen.replace(entry="dense", seqlens_q=None, seqlens_k=None)
    assert not [r for r in backend.unsupported_reasons(dense, CPU) if "per-head" in r]
    assert fwd(varlen.replace(fp8_recipe="per-tensor"), backend).status == "pass"
