"""Issue 26's problems and inputs: MLA head dims, learnable sinks and sink tokens, fp8 KV caches
with 16-bit queries, poisoned padding, serving shapes, and the distributions of v and dout.

Each problem is checked through the case model, the exact layer, the adapters (a recording
wrapper of the pure-PyTorch flash-attn fixture, tests/fixtures/flash_attn_ref.py, which poses
them all), the suites and exploration; the bugs of tests/zoo/problems/ must each be caught.
The peers' own references are in tests/test_issue26_peers.py.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from harness.backends import load_backend
from harness.backends.base import DEFAULT_FEATURES, Capabilities
from harness.case import Case
from harness.case.suites import load_file
from harness.checks.context import CheckContext
from harness.checks.plan import plan
from harness.errors import InvalidCase
from harness.exact import fp8, padding
from harness.exact.inputs import make_inputs
from harness.exact.judge import Verdict
from harness.exact.reference import baseline, reference
from harness.options import get_profile
from harness.target import Target, detect
from harness.vocab import OPT_IN_FEATURES

ROOT = Path(__file__).resolve().parent
FIXTURE = "flash-attn@tests/fixtures/flash_attn_ref.py"
LIBRARY = ROOT.parent / "harness" / "case" / "library"


def zoo(bug: str) -> str:
    return f"flash-attn@tests/zoo/problems/{bug}.py"


@pytest.fixture(scope="module")
def here():
    return detect()


def run(spec_or_backend, case: Case, target, check: str = "fwd"):
    """One check of one case, as the worker runs it (the plan first: refusals are skips)."""
    backend = (load_backend(spec_or_backend) if isinstance(spec_or_backend, str)
               else spec_or_backend)
    p = plan(case, backend, target, (check,))
    if check in p.skips:
        return Verdict(check, "skip", {}, p.skips[check]), None
    ctx = CheckContext(case, backend, target, seed=0, profile=get_profile("quick"))
    return ctx.run(check), ctx


# ---------------------------------------------------------------------------- MLA head dims


def test_head_dim_v_leaves_existing_ids_alone_and_counts_flash_attns_flops():
    plain = Case(seqlen_q=8, heads_q=2)
    assert Case(seqlen_q=8, heads_q=2, head_dim_v=64).case_id == plain.case_id
    mla = Case(seqlen_q=8, seqlen_k=12, heads_q=2, head_dim=192, head_dim_v=128)
    assert mla.dv == 128 and "mla" in mla.features and "d192/128" in mla.label
    # hopper/benchmark_attn.py: 2 * pairs * (headdim + headdim_v) per head
    assert mla.flops_fwd() == 2 * 2 * (192 + 128) * 8 * 12
    assert plain.flops_fwd() == 4 * 2 * 64 * 8 * 8
    assert mla.input_bytes() == 2 * (8 * 2 * (192 + 128) + 12 * 2 * (192 + 128))


@pytest.mark.parametrize(("fields", "message"), [
    (dict(head_dim_v=32, layout="packed-kv"), "needs head_dim_v == head_dim"),
    (dict(head_dim_v=96, layout="latent-kv"), "must be <= head_dim=64"),
    (dict(head_dim_v=-1), "head_dim_v=-1 must be an integer >= 0"),
    (dict(sink_tokens=4), "set window = [left, right] with left >= 0"),
    (dict(learnable_sink=True, dropout_p=0.1), "set dropout_p = 0"),
    (dict(kv_dtype="float8_e4m3fn", dtype="float32"), "use dtype float16 or bfloat16"),
    (dict(kv_dtype="float8_e4m3fn", fp8_scales=[1.0, 2.0, 3.0]), "must be [k, v]"),
    (dict(kv_dtype="float8_e4m3fn", fp8_out="float32"), "with kv_dtype the kernel returns"),
    (dict(v_values="skewed"), "v_values='skewed' must be one of"),
    (dict(entry="varlen", seqlens_q=(3,), seqlens_k=(3,), layout="padded", dropout_p=0.1),
     "set dropout_p = 0"),
])
def test_validation_names_the_field_and_the_fix(fields, message):
    with pytest.raises(InvalidCase, match=message.replace("[", r"\[").replace("]", r"\]")):
        Case(**{"seqlen_q": 8, "heads_q": 2, **fields})


def test_v_out_and_dout_take_the_value_head_dim_in_every_entry_point():
    cases = [Case(seqlen_q=5, seqlen_k=9, heads_q=4, heads_kv=2, head_dim=48, head_dim_v=16),
             Case(entry="varlen", batch=2, seqlens_q=(3, 4), seqlens_k=(20, 0), heads_q=2,
                  head_dim=48, head_dim_v=16, paged_block_size=8),
             Case(entry="kvcache", batch=2, seqlen_q=2, seqlen_k=40, seqlens_k=(30, 3),
                  heads_q=2, head_dim=48, head_dim_v=16, seqlen_new=2)]
    for case in cases:
        inputs = make_inputs(case)
        assert inputs.v.shape[-1] == 16 and inputs.dout.shape[-1] == 16
        assert inputs.k.shape[-1] == 48 and inputs.q.shape[-1] == 48
        ref, base = reference(inputs), baseline(inputs)
        assert ref.out.shape == (*inputs.q.shape[:-1], 16) == base.out.shape
    assert inputs.v_new.shape[-1] == 16
    paged = make_inputs(cases[1])
    assert paged.v_pages.shape[-1] == 16 and paged.k_pages.shape[-1] == 48


def test_latent_kv_makes_v_the_first_dims_of_k_in_every_copy():
    case = Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=40, seqlens_k=(40, 7),
                heads_q=8, heads_kv=1, head_dim=72, head_dim_v=64, layout="latent-kv",
                paged_block_size=16, dtype="bfloat16")
    inputs = make_inputs(case)
    for k, v in ((inputs.k, inputs.v), (inputs.k_pages, inputs.v_pages)):
        assert v.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        assert torch.equal(v.nan_to_num(0), k[..., :64].nan_to_num(0))
    copy = inputs.clone()
    assert copy.v.untyped_storage().data_ptr() == copy.k.untyped_storage().data_ptr()
    quantised = fp8.make_fp8_inputs(case.replace(kv_dtype="float8_e4m3fn"))
    assert quantised.v.untyped_storage().data_ptr() == quantised.k.untyped_storage().data_ptr()
    assert quantised.v_descale is quantised.k_descale


def test_mla_runs_through_sdpa_math_and_the_fixture(here):
    case = Case(batch=2, seqlen_q=20, seqlen_k=33, heads_q=4, heads_kv=2, head_dim=48,
                head_dim_v=32, dtype="bfloat16", causal=True)
    for spec in ("sdpa-math", FIXTURE):
        for check in ("fwd", "bwd"):
            verdict, _ = run(spec, case, here, check)
            assert verdict.status == "pass", (spec, check, verdict.reason)
    latent = Case(batch=2, seqlen_q=1, seqlen_k=70, heads_q=8, heads_kv=1, head_dim=80,
                  head_dim_v=64, layout="latent-kv", dtype="bfloat16")
    verdict, _ = run("sdpa-math", latent, here)
    assert verdict.status == "pass", verdict.reason


def test_families_pose_mla_or_refuse_it_with_the_originals_words(here):
    from harness.backends import fa3, flash_attn, vllm_fa

    case = Case(seqlen_q=8, heads_q=2, head_dim=192, head_dim_v=128)
    cuda = flash_attn.FLAVOR_CAPABILITIES["cuda"].reasons(case, "flash-attn")
    assert any("flash_api.cpp" in r and "head_size" in r for r in cuda)
    assert vllm_fa.FLAVOR_CAPABILITIES["cuda"].reasons(case.replace(entry="kvcache"), "v")
    hopper = fa3.FLAVOR_CAPABILITIES["cuda"]
    assert not hopper.reasons(case, "flash-attn3")  # (192, 128): FA3 takes it
    assert not hopper.reasons(case.replace(head_dim=64, head_dim_v=512), "flash-attn3")
    odd = hopper.reasons(case.replace(head_dim=96, head_dim_v=64), "flash-attn3")
    assert odd and "(96, 64) is not a pair" in odd[0] and "flash_api.cpp" in odd[0]
    flash_cpu = load_backend("sdpa-flash").capabilities.reasons(case, "sdpa-flash")
    assert any("same last dimension" in r for r in flash_cpu)
    assert not load_backend("sdpa-math").capabilities.reasons(case, "sdpa-math")


# ----------------------------------------------------------------------------------- sinks


def test_issue26_features_are_claimed_only_where_a_family_poses_them():
    assert not set(OPT_IN_FEATURES) & DEFAULT_FEATURES
    assert not set(OPT_IN_FEATURES) & Capabilities().features
    for spec in ("flash-attn", "flash-attn3", "vllm-flash-attn", "xformers"):
        assert "sink" not in load_backend(spec).capabilities.features, spec
    # the families whose API poses it: AITER's sink_ptr, FA4's learnable_sink
    assert "sink" in load_backend("aiter").capabilities.features
    assert "sink" in load_backend("flash-attn4").capabilities.features
    assert "sink" not in load_backend("sdpa-math").capabilities.features
    assert "sink-tokens" in load_backend("sdpa-math").capabilities.features


def test_a_user_function_claims_a_sink_only_when_its_signature_names_it(tmp_path):
    source = ("import torch.nn.functional as F\n"
              "def named(q, k, v, softmax_scale=None, causal=False, learnable_sink=None,\n"
              "          sink_token_length=0): return q\n"
              "def splat(q, k, v, **kwargs): return q\n")
    (tmp_path / "fns.py").write_text(source)
    named = load_backend(f"{tmp_path}/fns.py:named").capabilities.features
    splat = load_backend(f"{tmp_path}/fns.py:splat").capabilities.features
    assert {"sink", "sink-tokens"} <= named
    assert not {"sink", "sink-tokens"} & splat


def test_a_learnable_sink_is_drawn_to_matter_and_rows_without_keys_get_it_as_lse(here):
    case = Case(batch=2, seqlen_q=30, seqlen_k=12, heads_q=4, heads_kv=2, causal=True,
                learnable_sink=True, dtype="bfloat16")
    verdict, ctx = run(FIXTURE, case, here)
    assert verdict.status == "pass", verdict.reason
    effect = verdict.metrics["feature_effect"]["sink"]
    assert effect > 10 * verdict.metrics["out"]["allowed"]
    ref = ctx.reference
    empty = slice(0, 30 - 12)  # causal q > k: the leading rows see no key
    sinks = ctx.inputs.learnable_sink.double()
    assert torch.equal(ref.out[:, empty], torch.zeros_like(ref.out[:, empty]))
    assert torch.allclose(ref.lse[:, :, empty], sinks[None, :, None].expand(2, 4, 18))


class Recording:
    """A module wrapping the fixture's functions, recording every keyword they are called with
    (the flash-attn adapter's call convention for issue 26's keywords)."""

    def __init__(self):
        module = load_backend(FIXTURE).module
        self.calls = []
        for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"):
            setattr(self, name, self._wrap(name, getattr(module, name)))
        self.ATTN_HARNESS_CAPABILITIES = module.ATTN_HARNESS_CAPABILITIES

    def _wrap(self, name, fn):
        import functools

        @functools.wraps(fn)
        def call(*args, **kwargs):
            self.calls.append((name, kwargs))
            return fn(*args, **kwargs)

        return call


def test_the_flash_attn_adapter_passes_issue26s_keywords_exactly(here):
    from harness.backends.flash_attn import FlashAttnBackend

    cases = {
        "dense sinks": Case(batch=2, seqlen_q=9, seqlen_k=40, heads_q=4, heads_kv=2,
                            causal=True, window=(7, 0), sink_tokens=3, learnable_sink=True),
        "padded varlen": Case(entry="varlen", batch=3, seqlens_q=(1, 1, 1),
                              seqlens_k=(50, 0, 7), heads_q=4, heads_kv=1, layout="padded"),
        "fp8 kv cache": Case(entry="kvcache", batch=2, seqlen_q=2, seqlen_k=40,
                             seqlens_k=(40, 9), heads_q=4, heads_kv=2, dtype="bfloat16",
                             kv_dtype="float8_e4m3fn", fp8_recipe="per-head", causal=True),
    }
    for name, case in cases.items():
        module = Recording()
        backend = FlashAttnBackend(module, target="recording")
        verdict, ctx = run(backend, case, here)
        assert verdict.status == "pass", (name, verdict.reason)
        called, kwargs = module.calls[0]
        inputs = ctx.inputs
        if name == "dense sinks":
            assert called == "flash_attn_func" and kwargs["sink_token_length"] == 3
            assert torch.equal(kwargs["learnable_sink"], inputs.learnable_sink)
        elif name == "padded varlen":
            assert called == "flash_attn_varlen_func"
            assert kwargs["seqused_q"].tolist() == [1, 1, 1]
            assert kwargs["seqused_k"].tolist() == [50, 0, 7]
        else:
            assert called == "flash_attn_with_kvcache"
            assert torch.equal(kwargs["k_descale"], inputs.k_descale)
            assert torch.equal(kwargs["v_descale"], inputs.v_descale)
            assert kwargs["k_descale"].shape == (2, 2)


def test_a_module_without_the_keyword_is_not_asked(here):
    backend = load_backend("flash-attn@tests/fixtures/fakes/fake_flash_attn2.py")
    case = Case(batch=1, seqlen_q=4, seqlen_k=8, heads_q=2, learnable_sink=True)
    reasons = backend.unsupported_reasons(case, here)
    assert any("takes no learnable_sink argument" in r for r in reasons)


def test_split_kv_adds_the_sink_once(here):
    case = Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=300, seqlens_k=(300, 70),
                heads_q=8, heads_kv=2, learnable_sink=True, num_splits=4)
    verdict, _ = run(FIXTURE, case, here)
    assert verdict.status == "pass", verdict.reason


# --------------------------------------------------------------------------- fp8 KV caches


def test_fp8_kv_cache_inputs_quantise_k_and_v_only():
    case = Case(entry="kvcache", batch=2, seqlen_q=3, seqlen_k=32, seqlens_k=(32, 5),
                heads_q=4, heads_kv=2, dtype="float16", kv_dtype="float8_e4m3fnuz",
                fp8_scales=(0.02, 0.05))
    inputs = fp8.make_fp8_inputs(case)
    assert inputs.q.dtype == torch.float16 and inputs.dout.dtype == torch.float16
    assert inputs.k.dtype == inputs.v.dtype == torch.float8_e4m3fnuz
    assert inputs.q_descale is None
    assert torch.all(inputs.k_descale == 0.02) and torch.all(inputs.v_descale == 0.05)
    assert "kv=e4m3fnuz desc=k0.02,v0.05" in case.label and "fp8-kv" in case.features


def test_e4m3fnuz_with_a_doubled_scale_holds_the_same_cache():
    """The same bits mean half in e4m3fnuz (vLLM doubles k_scale and v_scale on fnuz
    platforms): quantised with twice the scale, the dequantised cache is the same."""
    base = dict(entry="kvcache", batch=1, seqlen_q=1, seqlen_k=64, heads_q=2, heads_kv=1,
                dtype="bfloat16")
    fn = fp8.make_fp8_inputs(Case(**base, kv_dtype="float8_e4m3fn", fp8_scales=(0.01, 0.02)))
    fnuz = fp8.make_fp8_inputs(Case(**base, kv_dtype="float8_e4m3fnuz", fp8_scales=(0.02, 0.04)))
    a, b = fp8.dequantised(fn), fp8.dequantised(fnuz)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    # the same bits mean half as much in e4m3fnuz: reading them as e4m3fn doubles the cache
    misread = fnuz.k.view(torch.uint8).view(torch.float8_e4m3fn).double() * 0.02
    finite = torch.isfinite(a.k) & (a.k != 0)
    assert torch.allclose(misread[finite], 2 * a.k[finite])


def test_fp8_kv_caches_are_judged_by_the_fp8_rule(here):
    case = Case(entry="kvcache", batch=2, seqlen_q=4, seqlen_k=300, seqlens_k=(300, 101),
                heads_q=8, heads_kv=2, dtype="bfloat16", kv_dtype="float8_e4m3fn",
                fp8_recipe="per-head", causal=True, paged_block_size=16)
    good, _ = run(FIXTURE, case, here)
    assert good.status == "pass" and good.metrics["verdict_kind"] == "exact-fp8", good.reason
    assert good.metrics["fp8"]["expected_out_dtype"] == "bfloat16"
    for bug in ("kv_scale_twice", "kv_scale_per_tensor"):
        bad, _ = run(zoo(bug), case, here)
        assert bad.status == "fail", (bug, bad.reason)


def test_the_target_takes_its_own_fp8_format_for_the_cache():
    mi300 = Target(vendor="amd", device_name="AMD Instinct MI300X", arch="gfx942",
                   memory_bytes=192 * 2**30)
    case = Case(entry="kvcache", seqlen_q=1, seqlen_k=16, dtype="bfloat16",
                kv_dtype="float8_e4m3fn")
    reasons = fp8.fp8_reasons(case, mi300)
    assert reasons and "not float8_e4m3fn for the KV cache (kv_dtype)" in reasons[0]
    assert not fp8.fp8_reasons(case.replace(kv_dtype="float8_e4m3fnuz"), mi300)


# --------------------------------------------------------------------------- poisoned padding


def test_every_region_a_kernel_must_not_read_is_nan_and_named():
    paged = Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=64, seqlens_k=(40, 0),
                 heads_q=2, paged_block_size=16)
    inputs = make_inputs(paged)
    assert set(inputs.padding) == {"cache-tail", "page-tail", "pages-unused"}
    for name, entries in inputs.padding.items():
        for attr, mask in entries:
            assert getattr(inputs, attr)[mask].isnan().all(), (name, attr)
    padded = Case(entry="varlen", batch=3, seqlens_q=(1, 5, 64), seqlens_k=(0, 70, 3),
                  heads_q=2, layout="padded")
    inputs = make_inputs(padded)
    assert inputs.cu_seqlens_q.tolist() == [0, 64, 128, 256]
    assert inputs.seqused_k.tolist() == [0, 70, 3]
    (_, gap), *_ = inputs.padding["varlen-gap"]
    assert gap.sum() == 256 - 70 and inputs.q[gap].isnan().all()
    ref = reference(inputs)
    assert ref.rows is not None and int(ref.rows.sum()) == 70  # gaps are never judged


def test_a_kernel_masking_by_multiplication_fails_naming_the_region(here):
    case = Case(entry="kvcache", batch=2, seqlen_q=2, seqlen_k=96, seqlens_k=(70, 31),
                heads_q=4, heads_kv=2, paged_block_size=16, causal=True)
    good, _ = run(FIXTURE, case, here)
    assert good.status == "pass", good.reason
    bad, _ = run(zoo("mask_by_multiply"), case, here)
    assert bad.status == "fail" and "NaN/Inf" in bad.reason
    assert "depends on padding the kernel must not read" in bad.reason
    assert "page-tail" in bad.reason and "pages-unused" in bad.reason


def test_finite_padding_holds_junk_that_only_a_contract_breaker_lets_in(here):
    case = Case(entry="varlen", batch=3, seqlens_q=(5, 1, 9), seqlens_k=(70, 3, 129),
                heads_q=4, heads_kv=2, layout="padded", causal=True)
    finite = frozenset({"varlen-gap"})
    for spec, status in ((FIXTURE, "pass"), (zoo("reads_past_length"), "fail")):
        backend = load_backend(spec)
        backend.capabilities = dataclasses.replace(backend.capabilities, finite_padding=finite)
        verdict, ctx = run(backend, case, here)
        gap = dict(ctx.inputs.padding["varlen-gap"])["k"]
        assert torch.isfinite(ctx.inputs.k[gap]).all()
        assert ctx.inputs.v[gap].float().mean() > padding.JUNK_VALUE / 2
        assert verdict.status == status, (spec, verdict.reason)
    assert "finite junk" in verdict.reason and "varlen-gap" in verdict.reason
    with pytest.raises(Exception, match="unknown regions"):
        Capabilities.from_mapping({"finite_padding": ["page-head"]}, "test")


# ------------------------------------------------------------------------------ the suites


def test_the_suites_pose_every_problem_at_serving_shape():
    edge = load_file(LIBRARY / "edge.toml").cases
    models = load_file(LIBRARY / "models.toml").cases
    smoke = load_file(LIBRARY / "smoke.toml").cases
    assert any(c.entry == "dense" and c.seqlen_q == 1 and c.group_size > 1 for c in smoke)
    for cases in (edge, models):
        feats = set().union(*(c.features for c in cases))
        assert {"mla", "latent-kv", "sink", "fp8-kv"} <= feats
        assert any(c.dtype.startswith("float8") for c in cases)  # --explore 0 tests fp8
    assert {"sink-tokens", "padded"} <= set().union(*(c.features for c in edge))
    assert {(c.head_dim, c.dv) for c in edge} >= {(192, 128), (576, 512)}
    assert {c.kv_dtype for c in edge} >= {"float8_e4m3fn", "float8_e4m3fnuz"}
    serving = [c for c in edge if c.entry == "varlen" and c.batch >= 16
               and set(c.seqlens_q) == {1}]
    assert serving and any(c.seqlens_k.count(0) >= c.batch // 10 for c in serving)
    assert {8, 16} <= {c.group_size for c in edge if c.entry != "dense" and c.seqlen_q == 1}
    assert any(c.heads_q % 16 and c.group_size >= 8 for c in edge)
    assert any(c.entry == "varlen" and c.causal and all(  # chunked prefill
        sk >= sq for sq, sk in zip(c.seqlens_q, c.seqlens_k, strict=True))
        and sum(c.seqlens_k) > sum(c.seqlens_q) for c in edge)
    deepseek = [c for c in models if c.name.startswith("deepseek-v3")]
    assert {(c.head_dim, c.dv) for c in deepseek} == {(192, 128), (576, 512)}
    mscale = 0.1 * math.log(40) + 1  # inference/model.py, rope_factor 40, mscale 1.0
    assert all(c.scale == pytest.approx(192 ** -0.5 * mscale ** 2) for c in deepseek)
    assert all(c.heads_q == 128 for c in deepseek)


# ------------------------------------------------------------------ v and dout distributions


def test_v_and_dout_distributions_shape_only_their_tensor():
    from harness.exact.inputs import tensor_values

    base = Case(batch=2, seqlen_q=6, seqlen_k=10, heads_q=2, dtype="float32")
    assert base.replace(v_values="normal", dout_values="normal").case_id == base.case_id
    x = torch.randn(2, 6, 2, 4)
    segments = [(slice(None), 0, 6)]
    for kind, expect in (("offset", x + 8.0), ("large", x * 100.0)):
        y = x.clone()
        tensor_values(kind, y, segments)
        assert torch.allclose(y, expect)
    y = x.clone()
    tensor_values("rows", y, segments)  # the first and the middle token of each sequence
    assert torch.allclose(y[:, [0, 3]], x[:, [0, 3]] * 100.0)
    assert torch.equal(y[:, [1, 2, 4, 5]], x[:, [1, 2, 4, 5]])
    drawn = make_inputs(base.replace(seqlen_k=400, v_values="offset", dout_values="large"))
    assert 7.8 < float(drawn.v.mean()) < 8.2 and 80 < float(drawn.dout.std()) < 120
    varlen = make_inputs(Case(entry="varlen", batch=2, seqlens_q=(4, 6), seqlens_k=(3, 5),
                              heads_q=2, dtype="float32", dout_values="rows"))
    big = (varlen.dout.abs().amax((1, 2)) > 20).nonzero().flatten().tolist()
    assert big == [0, 2, 4, 7]  # per sequence: its first and middle query


def test_fp8_headroom_above_one_saturates_and_below_one_does_not():
    from harness.run.strategies import FP8_HEADROOM, FP8_MAX

    fmax = FP8_MAX["float8_e4m3fn"]
    x = torch.randn(10000)
    for headroom in FP8_HEADROOM:
        scale = 4.0 / (fmax * headroom)
        clamped = float(((x / scale).abs() >= fmax).float().mean())
        assert (clamped > 0.5) == (headroom >= 16) and (clamped > 0) == (headroom > 1)


def test_the_flash_attn_fixture_passes_the_new_edge_cases(here):
    """The correct reference kernels pose the new problems and pass (cheap edge cases)."""
    names = ("learnable sink, rows without keys", "padded varlen decode",
             "serving decode kv-cache", "fp8 KV cache e4m3fn,")
    chosen = [c for c in load_file(LIBRARY / "edge.toml").cases
              if any(c.name.startswith(n) for n in names)]
    assert len(chosen) == len(names)
    for case in chosen:
        verdict, _ = run(FIXTURE, case, here)
        assert verdict.status == "pass", (case.name, verdict.reason)
    fp8_case = next(c for c in load_file(LIBRARY / "edge.toml").cases
                    if c.name.startswith("fp8 e4m3fnuz, v with a non-zero mean"))
    # e4m3fnuz is gfx942's format: AITER's fp8 entry takes it, FA3 does not
    verdict, _ = run("aiter@tests/fixtures/fa3_fp8_ref.py", fp8_case, here)
    assert verdict.status == "pass", verdict.reason


# ----------------------------------------------------------------------------------- the zoo

#: One cheap case per bug of tests/zoo/problems/ that shows it (ZOO.py NEEDS).
CATCHES = {
    "mla_scale_dv": Case(batch=1, seqlen_q=16, seqlen_k=40, heads_q=2, head_dim=96,
                         head_dim_v=32),
    "sink_ignored": Case(batch=1, seqlen_q=16, seqlen_k=40, heads_q=2, learnable_sink=True),
    "sink_in_numerator": Case(batch=1, seqlen_q=16, seqlen_k=40, heads_q=2,
                              learnable_sink=True),
    "sink_tokens_unmasked": Case(batch=1, seqlen_q=16, seqlen_k=16, heads_q=2, causal=True,
                                 window=(2, 0), sink_tokens=8),
    "kv_scale_twice": Case(entry="kvcache", seqlen_q=1, seqlen_k=40, heads_q=2,
                           dtype="bfloat16", kv_dtype="float8_e4m3fn"),
    "kv_scale_per_tensor": Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=40, heads_q=4,
                                heads_kv=2, dtype="bfloat16", kv_dtype="float8_e4m3fn",
                                fp8_recipe="per-head"),
    "mask_by_multiply": Case(entry="kvcache", seqlen_q=1, seqlen_k=40, seqlens_k=(20,),
                             heads_q=2),
    "reads_past_length": Case(entry="kvcache", seqlen_q=1, seqlen_k=100, seqlens_k=(20,),
                              heads_q=2),
    "decode_fold16": Case(entry="varlen", batch=2, seqlens_q=(1, 1), seqlens_k=(30, 9),
                          heads_q=24, heads_kv=3, head_dim=16),
}


def test_every_problem_bug_has_a_file_and_a_catching_case():
    from tests.zoo import catch_rate

    table = catch_rate._module_zoo("tests/zoo/problems/ZOO.py")
    files = {p.stem for p in (ROOT / "zoo" / "problems").glob("*.py")} - {"ZOO"}
    fixture = load_backend(FIXTURE).module
    assert files == set(table) == set(CATCHES) == set(fixture.PROBLEM_BUGS)


@pytest.mark.parametrize("bug", sorted(CATCHES))
def test_each_problem_bug_is_caught_and_the_fixture_is_not(bug, here):
    case = CATCHES[bug]
    good, _ = run(FIXTURE, case, here)
    bad, _ = run(zoo(bug), case, here)
    assert good.status == "pass", (bug, good.reason)
    assert bad.status == "fail", (bug, bad.reason)


# ------------------------------------------- families' call conventions (recording fakes)

FAKES = ROOT / "fixtures" / "fakes"


def fake(family: str, name: str):
    backend = load_backend(f"{family}@{FAKES / name}.py")
    backend.module.CALLS.clear()
    return backend


def test_fa3_takes_padded_varlen_through_seqused_and_a_value_head_dim(here):
    backend = fake("flash-attn3", "fake_flash_attn3")
    padded = Case(entry="varlen", batch=3, seqlens_q=(2, 0, 5), seqlens_k=(9, 3, 70),
                  heads_q=4, heads_kv=2, head_dim=32, layout="padded", causal=True)
    verdict, ctx = run(backend, padded, here)
    assert verdict.status == "pass", verdict.reason
    name, args, kwargs = backend.module.CALLS.calls[0]
    assert name == "flash_attn_varlen_func"
    assert args[3].tolist() == [0, 64, 128, 192] and kwargs["seqused_q"].tolist() == [2, 0, 5]
    assert args[4].tolist() == [0, 64, 128, 256]  # slots: 70 keys take two 64-key blocks
    assert kwargs["seqused_k"].tolist() == [9, 3, 70]
    assert "learnable_sink" not in kwargs  # the fake, like FA3, takes no sink: not asked
    assert backend.unsupported_reasons(padded.replace(learnable_sink=True), here)
    mla = Case(batch=2, seqlen_q=7, seqlen_k=30, heads_q=4, head_dim=64, head_dim_v=32)
    backend.module.CALLS.clear()
    verdict, _ = run(backend, mla, here)
    assert verdict.status == "pass", verdict.reason
    assert backend.module.CALLS.calls[0][1][2].shape[-1] == 32  # v as given


@pytest.mark.parametrize(("family", "module"), [("xformers", "fake_xformers"),
                                                ("aiter", "fake_aiter")])
def test_value_head_dims_and_sink_tokens_reach_the_fakes(family, module, here):
    backend = fake(family, module)
    mla = Case(batch=2, seqlen_q=7, seqlen_k=30, heads_q=4, head_dim=64, head_dim_v=32,
               causal=True)
    verdict, _ = run(backend, mla, here)
    assert verdict.status == "pass", verdict.reason
    # sink tokens: xformers' tensor bias with the window, AITER's window_size[2]
    sinks = Case(batch=2, seqlen_q=20, seqlen_k=40, heads_q=2, causal=True, window=(5, 0),
                 sink_tokens=3)
    verdict, _ = run(backend, sinks, here)
    assert verdict.status == "pass", verdict.reason
    assert verdict.metrics["feature_effect"]["sink-tokens"] > 0.01


def test_a_flash_attention_backward_is_not_failed_for_cancelling_ds(here):
    """One key of q and k scaled x1000: dS = P (dP - D) is zero in exact arithmetic, and a
    FlashAttention-2 backward (D from the stored output, dP from a matmul: two float32 orders)
    leaves 1e-4 times |k| = 1000: not a bug, allowed by the D-rounding slack."""
    case = Case(batch=1, seqlen_q=1, seqlen_k=1, heads_q=1, head_dim=64, dtype="float16",
                values="scaled", value_scale=1000.0)
    verdict, _ = run(FIXTURE, case, here, "bwd")
    assert verdict.status == "pass", verdict.reason


FP8_FIXTURE = "flash-attn3@tests/fixtures/fa3_fp8_ref.py"


@pytest.mark.parametrize("bug", ["lazy_rescale", "pv_bf16"])
def test_fp8_accumulation_bugs_are_caught_on_soft_rows_at_long_keys(bug, here):
    """The fp8 corner's first case (soft rows, 16k+ keys, v with a non-zero mean) catches
    both; the correct fixture passes it."""
    case = Case(batch=1, seqlen_q=16, seqlen_k=16385, heads_q=1, dtype="float8_e4m3fn",
                v_values="offset")
    good, _ = run(FP8_FIXTURE, case, here)
    bad, _ = run(f"flash-attn3@tests/zoo/fp8/{bug}.py", case, here)
    assert good.status == "pass", good.reason
    assert bad.status == "fail", bad.reason


def test_lazy_rescaling_fails_on_the_plain_case_of_the_issue(here):
    case = Case(batch=2, seqlen_q=64, seqlen_k=2048, heads_q=1, dtype="float8_e4m3fn")
    bad, _ = run("flash-attn3@tests/zoo/fp8/lazy_rescale.py", case, here)
    assert bad.status == "fail" and bad.metrics["ratio"] > 10, bad.reason


def test_exact_dropout_judging_takes_a_value_head_dim(here):
    """V = identity blocks of head_dim_v columns; the exact gradients shaped by v (the default
    job's exploration drew b1 q1 k1 d192/128 with dropout and the harness raised)."""
    case = Case(batch=2, seqlen_q=20, seqlen_k=40, heads_q=4, heads_kv=2, head_dim=48,
                head_dim_v=16, dropout_p=0.17, dtype="float32")
    for check in ("fwd", "bwd"):
        verdict, _ = run("sdpa-math", case, here, check)
        assert verdict.status == "pass", (check, verdict.reason)
