"""FP8 attention (issue 14): case fields, quantised inputs, the emulating baseline, the rule, the
formats each target takes, and the fixture and zoo variants of tests/fixtures/fa3_fp8_ref.py."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from harness.case import Case
from harness.errors import InvalidCase
from harness.exact import fp8
from harness.exact.inputs import make_inputs
from harness.exact.outputs import Outputs
from harness.target import Target

TESTS = Path(__file__).resolve().parent


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_fp8_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _load(TESTS / "fixtures" / "fa3_fp8_ref.py")
ZOO = {name: _load(TESTS / "zoo" / "fp8" / f"{name}.py")
       for name in ("fnuz_as_fn", "ignores_k_descale", "p_e5m2")}


def run_fa3(module, case: Case, inputs) -> Outputs:
    out, lse = module.flash_attn_func(
        inputs.q, inputs.k, inputs.v, softmax_scale=case.scale, causal=case.causal,
        q_descale=inputs.q_descale, k_descale=inputs.k_descale, v_descale=inputs.v_descale,
        window_size=case.window, softcap=case.softcap, return_attn_probs=True)
    return Outputs(out=out, lse=lse)


def judge(module, case: Case):
    inputs = fp8.make_fp8_inputs(case)
    return fp8.fp8_verdict(case, run_fa3(module, case, inputs), fp8.fp8_baseline(inputs),
                           fp8.fp8_reference(inputs))


GQA = Case(batch=2, seqlen_q=113, seqlen_k=203, heads_q=4, heads_kv=2, head_dim=64,
           dtype="float8_e4m3fn")
FNUZ = Case(batch=1, seqlen_q=64, seqlen_k=300, heads_q=2, head_dim=64, dtype="float8_e4m3fnuz",
            causal=True)


# --------------------------------------------------------------------------------- case


def test_fp8_fields_stay_out_of_existing_ids_and_show_in_the_label():
    plain = Case(seqlen_q=8)
    assert not any(key.startswith("fp8_") for key in plain.identity())
    case = Case(seqlen_q=8, dtype="float8_e4m3fn", fp8_scales=[1, 0.5, 2])
    assert case.fp8_scales == (1.0, 0.5, 2.0)
    assert "e4m3fn desc=q1,k0.5,v2" in case.label
    head = Case(seqlen_q=8, dtype="float8_e4m3fnuz", fp8_recipe="per-head", fp8_out="float32")
    assert "e4m3fnuz desc=amax/head out=f32" in head.label
    assert head.case_id != Case(seqlen_q=8, dtype="float8_e4m3fnuz").case_id


@pytest.mark.parametrize("fields, message", [
    (dict(fp8_out="float32"), "fp8_out='float32' is for fp8 dtypes only"),
    (dict(dtype="float8_e4m3fn", fp8_recipe="per-block"), "fp8_recipe='per-block' must be"),
    (dict(dtype="float8_e4m3fn", fp8_scales=[1.0, 2.0]), "fp8_scales=[1.0, 2.0] must be [q, k, v]"),
    (dict(dtype="float8_e4m3fn", fp8_scales=[1.0, 1.0, 1.0], fp8_recipe="per-head"),
     "use fp8_recipe = 'per-tensor'"),
    (dict(dtype="float8_e5m2", dropout_p=0.1), "set dropout_p = 0"),
    (dict(dtype="float8_e4m3fn", layout="packed-qkv"), "use contiguous, strided or latent-kv"),
])
def test_fp8_field_errors_name_the_field_and_the_fix(fields, message):
    with pytest.raises(InvalidCase, match=re_escape(message)):
        Case(seqlen_q=8, **fields)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# ------------------------------------------------------------------------------- inputs


def test_inputs_are_quantised_float32_draws_with_fa3_shaped_descales():
    inputs = fp8.make_fp8_inputs(GQA)
    assert inputs.q.dtype == torch.float8_e4m3fn and inputs.k.dtype == torch.float8_e4m3fn
    for name in "qkv":
        descale = getattr(inputs, f"{name}_descale")
        assert descale.shape == (2, 2) and descale.dtype == torch.float32
        # amax scaling: the largest magnitude lands on the format's max exactly
        assert float(getattr(inputs, name).float().abs().max()) == 448.0
    again = fp8.make_fp8_inputs(GQA)
    assert torch.equal(inputs.q.view(torch.uint8), again.q.view(torch.uint8))


def test_dequantised_values_are_the_drawn_values_within_fp8_rounding():
    case = GQA
    inputs = fp8.make_fp8_inputs(case)
    twin = case.replace(dtype="float32")
    drawn = make_inputs(twin)  # the float32 draws the fp8 case quantises
    exact = fp8.dequantised(inputs).k
    rel = ((exact - drawn.k.double()).abs() / drawn.k.double().abs().clamp_min(0.05)).max()
    assert 0 < float(rel) <= 2 ** -4 + 1e-6  # half an ulp of e4m3's 3 mantissa bits


def test_per_head_scales_differ_by_head_and_batch_row():
    case = GQA.replace(fp8_recipe="per-head")
    inputs = fp8.make_fp8_inputs(case)
    assert len(set(inputs.k_descale.flatten().tolist())) == 4
    for b in range(2):
        for h in range(2):
            assert float(inputs.k[b, :, h].float().abs().max()) == 448.0


def test_small_fixed_scales_saturate_at_the_format_max_with_both_signs():
    case = FNUZ.replace(fp8_scales=(0.001, 1.0, 1.0))
    q = fp8.make_fp8_inputs(case).q.float()
    assert float(q.max()) == 240.0 and float(q.min()) == -240.0
    assert float((q.abs() == 240.0).double().mean()) > 0.75  # P(|N(0, 1)| > 0.24) = 0.81


def test_strided_fp8_inputs_keep_their_gaps():
    inputs = fp8.make_fp8_inputs(GQA.replace(layout="strided"))
    assert not inputs.q.is_contiguous() and inputs.q.dtype == torch.float8_e4m3fn
    size = inputs.q.untyped_storage().nbytes()
    storage = torch.empty(0, dtype=torch.float8_e4m3fn).set_(inputs.q.untyped_storage(), 0,
                                                              (size,), (1,))
    assert torch.isnan(storage.float()).any()  # gaps hold NaN
    assert torch.isfinite(inputs.q.float()).all()


def test_varlen_and_paged_kvcache_quantise_consistently():
    varlen = Case(batch=3, seqlens_q=(5, 0, 9), seqlens_k=(7, 4, 0), heads_q=2, head_dim=16,
                  entry="varlen", dtype="float8_e5m2", fp8_recipe="per-head")
    inputs = fp8.make_fp8_inputs(varlen)
    assert inputs.q.shape == (14, 2, 16) and inputs.q_descale.shape == (3, 2)
    paged = Case(batch=2, seqlen_q=3, seqlen_k=40, seqlens_k=(40, 17), heads_q=2, head_dim=16,
                 entry="kvcache", paged_block_size=16, dtype="float8_e4m3fn")
    inputs = fp8.make_fp8_inputs(paged)
    table = inputs.block_table.long()
    assert torch.equal(inputs.k_pages[table[1, 0]].view(torch.uint8),
                       inputs.k[1, :16].view(torch.uint8))


# --------------------------------------------------------------------- reference, baseline


def test_reference_is_exact_attention_of_the_dequantised_values():
    case = Case(batch=1, seqlen_q=3, seqlen_k=5, heads_q=1, head_dim=8, dtype="float8_e4m3fn",
                fp8_scales=(0.01, 0.02, 0.03))
    inputs = fp8.make_fp8_inputs(case)
    q = inputs.q.double() * inputs.q_descale.double()[0, 0]
    k = inputs.k.double() * inputs.k_descale.double()[0, 0]
    v = inputs.v.double() * inputs.v_descale.double()[0, 0]
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8)
    expected = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)
    ref = fp8.fp8_reference(inputs)
    assert ref.out.dtype == torch.float64
    torch.testing.assert_close(ref.out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


def test_baseline_errs_like_an_fp8_kernel_not_like_a_float32_one():
    inputs = fp8.make_fp8_inputs(GQA)
    ref = fp8.fp8_reference(inputs)
    base = fp8.fp8_baseline(inputs)
    fp32 = fp8.fp8_reference(inputs, dtype=torch.float32)
    base_err = float((base.out.double() - ref.out).abs().max())
    fp32_err = float((fp32.out.double() - ref.out).abs().max())
    assert base_err > 1000 * fp32_err  # fp8 P dominates
    assert 1e-3 < base_err < 5e-2
    torch.testing.assert_close(base.lse.double(), ref.lse, rtol=0, atol=1e-4)


def test_baseline_handles_masks_rows_without_keys_and_sampled_rows():
    case = Case(batch=1, seqlen_q=20, seqlen_k=6, heads_q=2, head_dim=16, causal=True,
                dtype="float8_e4m3fn")
    inputs = fp8.make_fp8_inputs(case)
    base = fp8.fp8_baseline(inputs)
    ref = fp8.fp8_reference(inputs)
    assert torch.equal(base.out[:, :14], torch.zeros_like(base.out[:, :14]))
    assert torch.isinf(base.lse[..., :14]).all() and torch.isinf(ref.lse[..., :14]).all()
    rows = [torch.tensor([0, 15, 19])]
    sampled = fp8.fp8_baseline(inputs, rows=rows)
    torch.testing.assert_close(sampled.out[:, [15, 19]], base.out[:, [15, 19]])


# ------------------------------------------------------------------------------ the rule


def test_fa3_epsilon_floor_is_arithmetic_noise_at_the_output_dtype():
    ref = torch.linspace(-1.7, 1.9, 101, dtype=torch.float64)
    atol = fp8.fwd_atol(ref, torch.bfloat16)
    r = ref.to(torch.bfloat16)
    assert atol == 2 * float(((r + 0.3 - 0.3) - r).abs().max())
    assert 2 ** -9 <= atol <= 2 ** -6  # bf16 ulps near 1
    assert 0 < fp8.fwd_atol(ref, torch.float32) < atol / 1000


def test_similarity_is_one_for_identical_and_drops_for_a_scaled_copy():
    x = torch.randn(100, dtype=torch.float64)
    same = fp8.similarity(x, x)
    assert same["cosine"] == pytest.approx(1.0) and same["calc_diff"] == pytest.approx(0.0)
    scaled = fp8.similarity(2 * x, x)
    assert scaled["cosine"] == pytest.approx(1.0) and scaled["calc_diff"] == pytest.approx(0.2)


@pytest.mark.parametrize("case", [
    GQA,
    GQA.replace(fp8_recipe="per-head", causal=True),
    FNUZ,
    FNUZ.replace(softcap=5.0, causal=False, fp8_scales=(0.004, 0.5, 0.01)),
    Case(batch=1, seqlen_q=16, seqlen_k=1500, heads_q=2, head_dim=64, dtype="float8_e5m2",
         window=(100, 20)),
    Case(batch=1, seqlen_q=1, seqlen_k=1, heads_q=1, head_dim=8, dtype="float8_e4m3fn"),
], ids=lambda c: c.label)
def test_the_fa3_like_fixture_passes_and_records_the_fp8_metrics(case):
    verdict = judge(REF, case)
    assert verdict.status == "pass", verdict.reason
    metrics = verdict.metrics
    assert metrics["out"]["ratio"] is not None and metrics["out"]["ratio"] <= 2
    assert metrics["lse"]["mismatched"] == 0
    assert metrics["fp8"]["format"] == case.dtype and metrics["fp8"]["cosine"] > 0.999
    assert metrics["fp8"]["k"] == (3.0 if case.softcap else 2.0)


def test_misreading_fnuz_bytes_as_fn_is_caught():
    verdict = judge(ZOO["fnuz_as_fn"], FNUZ)
    assert verdict.status == "fail"
    assert "out:" in verdict.reason and verdict.metrics["out"]["ratio"] > 10


def test_ignoring_k_descale_is_caught():
    verdict = judge(ZOO["ignores_k_descale"], GQA)
    assert verdict.status == "fail" and verdict.metrics["out"]["ratio"] > 10


def test_rounding_p_to_e5m2_passes_the_max_rule_and_fails_the_mean_rule():
    verdict = judge(ZOO["p_e5m2"], GQA)
    assert verdict.status == "fail"
    assert verdict.metrics["out"]["mismatched"] == 0  # FA3's max rule alone lets it through
    assert verdict.metrics["fp8"]["mean_ratio"] > 1.7
    assert "mean |error|" in verdict.reason and "e5m2" in verdict.reason


def test_the_mean_rule_needs_enough_elements():
    small = Case(batch=1, seqlen_q=2, seqlen_k=300, heads_q=1, head_dim=64,
                 dtype="float8_e4m3fn")  # 128 output elements
    verdict = judge(ZOO["p_e5m2"], small)
    assert verdict.metrics["fp8"]["judged"] is False
    assert verdict.metrics["fp8"]["elements"] < fp8.MEAN_MIN_ELEMENTS


def test_an_unexpected_output_dtype_is_noted_not_failed():
    case = GQA.replace(fp8_out="float32")
    verdict = judge(REF, case)
    assert verdict.status == "pass"
    assert "returned torch.bfloat16 where the case expects float32" in verdict.reason


# ------------------------------------------------------------------------------ targets


def target(vendor: str, arch: str) -> Target:
    return Target(vendor=vendor, device_name="x", arch=arch)


@pytest.mark.parametrize("vendor, arch, dtype, expected", [
    ("amd", "gfx942", "float8_e4m3fnuz", ""),
    ("amd", "gfx942", "float8_e4m3fn", "gfx942 kernels take float8_e4m3fnuz, not float8_e4m3fn"),
    ("amd", "gfx942", "float8_e5m2", "not float8_e5m2"),
    ("amd", "gfx950", "float8_e4m3fn", ""),
    ("amd", "gfx950", "float8_e5m2", ""),
    ("amd", "gfx950", "float8_e4m3fnuz", "gfx950 kernels take float8_e4m3fn, float8_e5m2"),
    ("amd", "gfx90a", "float8_e4m3fn", "gfx90a kernels take no fp8 format"),
    ("nvidia", "sm_90", "float8_e4m3fn", ""),
    ("nvidia", "sm_89", "float8_e5m2", ""),
    ("nvidia", "sm_100", "float8_e4m3fnuz", "sm_100 kernels take float8_e4m3fn"),
    ("nvidia", "sm_80", "float8_e4m3fn", "sm_80 kernels take no fp8 format"),
    ("cpu", "x86_64", "float8_e4m3fnuz", ""),
])
def test_fp8_reasons_follow_the_arch_table(vendor, arch, dtype, expected):
    reasons = fp8.fp8_reasons(Case(seqlen_q=4, dtype=dtype), target(vendor, arch))
    if expected:
        assert len(reasons) == 1 and expected in reasons[0]
    else:
        assert reasons == []
    assert fp8.fp8_reasons(Case(seqlen_q=4), target(vendor, arch)) == []


def test_every_arch_row_cites_a_source():
    for _, formats, source in fp8.ARCH_FORMATS:
        assert source and all(f in fp8.FORMATS for f in formats)


# --------------------------------------------------------------------------- strategies


def test_strategies_draw_fp8_cases_only_for_backends_that_claim_them():
    from hypothesis import HealthCheck, Phase, find, given, settings

    from harness.backends.base import Capabilities
    from harness.run.strategies import Budget, cases

    caps = Capabilities.from_mapping(REF.ATTN_HARNESS_CAPABILITIES, "fixture")
    budget = Budget(max_flops=2e7, max_bytes=16 << 20, max_seqlen=1024, max_decode_keys=0,
                    grid=False)
    drawn: list[Case] = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(cases(caps, budget))
    def collect(case):
        drawn.append(case)

    collect()
    assert all(not c.dropout_p and c.layout in ("contiguous", "strided") for c in drawn)
    # Each kind is reachable: searched for, not counted in one sample (a sample's make-up
    # follows hypothesis's generation order, which changes with the strategy's draws).
    quiet = settings(max_examples=500, database=None, phases=[Phase.generate],
                     suppress_health_check=list(HealthCheck))
    for dtype in fp8.FORMATS:
        assert find(cases(caps, budget), lambda c, d=dtype: c.dtype == d, settings=quiet)
    assert find(cases(caps, budget), lambda c: c.fp8_recipe == "per-head", settings=quiet)
    assert find(cases(caps, budget), lambda c: c.fp8_scales is not None, settings=quiet)

    plain: list[Case] = []

    @settings(max_examples=30, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(cases(Capabilities(), budget))
    def collect_plain(case):
        plain.append(case)

    collect_plain()
    assert not any(fp8.is_fp8(c.dtype) for c in plain)


def test_the_generic_reference_and_baseline_refuse_fp8_inputs_and_say_where_to_go():
    """fp8 builds on the generic reference, not the reverse (no import cycle): the checks route
    fp8 cases to harness.exact.fp8, and the generic functions point there."""
    from harness.exact.reference import baseline, reference

    inputs = fp8.make_fp8_inputs(GQA)
    with pytest.raises(ValueError, match="harness.exact.fp8.fp8_reference"):
        reference(inputs)
    with pytest.raises(ValueError, match="harness.exact.fp8.fp8_baseline"):
        baseline(inputs)
    with pytest.raises(ValueError, match="make_fp8_inputs"):
        make_inputs(GQA)


def test_e4m3fn_and_e4m3fnuz_versions_of_a_problem_share_a_matrix_row():
    from harness.results.report import matrix_row

    fn_key, fn_label = matrix_row(GQA)
    fnuz_key, fnuz_label = matrix_row(GQA.replace(dtype="float8_e4m3fnuz", fp8_out="float32"))
    assert fn_key == fnuz_key and fn_label == fnuz_label
    assert " e4m3 desc=amax/tensor" in fn_label and "out=" not in fn_label
    assert matrix_row(GQA.replace(dtype="float8_e5m2"))[0] != fn_key
    plain = Case(seqlen_q=4)
    assert matrix_row(plain) == (plain.case_id, plain.label)


def _fp8_record(target: dict, case: Case, status: str, ratio: float, backend: str,
                tflops: float | None = None):
    """A made-up record (SYNTHETIC: these machines did not run here) of ``case``."""
    from harness.results.records import Record

    check = "throughput" if tflops is not None else "fwd"
    metrics = {"tflops": tflops, "time_ms": 1.0} if tflops is not None else {"ratio": ratio}
    return Record(case_id=case.case_id, case=case.to_dict(), target=target, check=check,
                  status=status, metrics=metrics,
                  backend={"name": backend, "family": backend, "flavor": "", "version": "1"})


H100 = {"vendor": "nvidia", "device_name": "NVIDIA H100 80GB HBM3", "arch": "sm_90",
        "runtime": "CUDA", "runtime_version": "12.8", "torch": "2.8.0", "target_id": "h100-sxm",
        "harness": "0.1.0"}
MI300X = {"vendor": "amd", "device_name": "AMD Instinct MI300X", "arch": "gfx942",
          "runtime": "ROCm", "runtime_version": "6.4", "torch": "2.8.0", "target_id": "mi300x",
          "harness": "0.1.0"}


def test_the_matrix_puts_nvidia_e4m3fn_and_mi300_e4m3fnuz_rows_side_by_side():
    """Issue 14: one problem, FA3 on an H100 in e4m3fn (bf16 out) and AITER on an MI300X in
    e4m3fnuz (fp32 out), is one matrix row and one throughput row with the AMD/NVIDIA ratio;
    each cell names the format it ran."""
    from harness.results.report import View, matrix_section, throughput_section

    fn = GQA
    fnuz = GQA.replace(dtype="float8_e4m3fnuz", fp8_out="float32")
    records = [_fp8_record(H100, fn, "pass", 0.8, "flash-attn3"),
               _fp8_record(MI300X, fnuz, "fail", 9.5, "flash-attn3"),
               _fp8_record(H100, fn, "pass", 0, "flash-attn3", tflops=800.0),
               _fp8_record(MI300X, fnuz, "pass", 0, "flash-attn3", tflops=600.0)]
    view = View.of(records)
    matrix = matrix_section(view)
    rows = [line for line in matrix.splitlines() if " e4m3" in line and line.startswith("|")]
    assert len(rows) == 1, matrix
    assert "`e4m3fn out=bf16`" in rows[0] and "`e4m3fnuz out=f32`" in rows[0]
    assert "**FAIL** fwd 9.5 " in rows[0] and "pass 0.8 " in rows[0]
    assert "share a row" in matrix
    timed = throughput_section(view)
    trow = [line for line in timed.splitlines() if " e4m3 " in line and "0.75" in line]
    assert len(trow) == 1, timed  # 600 / 800 in one row

    # A column that ran both formats keeps two rows: one verdict must not hide the other.
    both = records[:2] + [_fp8_record(H100, fnuz, "pass", 0.9, "flash-attn3")]
    matrix = matrix_section(View.of(both))
    assert len([line for line in matrix.splitlines() if "e4m3fn" in line]) == 2, matrix
    # A lone fp8 case keeps its own label.
    lone = matrix_section(View.of(records[:1]))
    assert " e4m3fn " in lone and "`e4m3fn out=bf16`" not in lone
