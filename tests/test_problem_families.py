"""Each of issue 26's problems runs through every family that supports it, on the CPU, through
the families' module files: the pure-PyTorch fixtures (flash-attn 2, FA4, FlashInfer, the fp8
fixture as FA3 and as AITER) and the recording fakes (AITER, FA3, xformers, vLLM), plus
sdpa-math. Who claims what is pinned (a family that stops claiming a problem, or starts to, is
a visible change), and every family that claims a problem computes it within the parity rule.
"""

from __future__ import annotations

import pytest

from harness.backends import load_backend
from harness.case import Case
from harness.checks.context import CaseRun
from harness.options import get_profile
from harness.target import from_facts

CPU = from_facts({"machine": "x86_64", "device_count": 0})
F = "tests/fixtures/"
FA2, FA4, FI = f"flash-attn@{F}flash_attn_ref.py", f"flash-attn4@{F}fa4_ref.py", \
    f"flashinfer@{F}flashinfer_ref.py"
FA3_FP8, AITER_FP8 = f"flash-attn3@{F}fa3_fp8_ref.py", f"aiter@{F}fa3_fp8_ref.py"
AITER, FA3 = f"aiter@{F}fakes/fake_aiter.py", f"flash-attn3@{F}fakes/fake_flash_attn3.py"
XF, VLLM, SDPA = f"xformers@{F}fakes/fake_xformers.py", f"vllm-flash-attn@{F}fakes/fake_vllm.py", \
    "sdpa-math"
SPECS = (FA2, FA4, FI, FA3_FP8, AITER_FP8, AITER, FA3, XF, VLLM, SDPA)
#: The recording fakes answer in float64 and do not model fp8 arithmetic or fp8 outputs: fp8
#: is the fixtures' business (fa3_fp8_ref as FA3 and as AITER, fa4_ref, flash_attn_ref).
NO_FP8_MATH = (FA3,)

#: problem -> (a small case posing it, the module files that must claim it).
PROBLEMS = {
    "mla 192/128": (
        Case(batch=1, seqlen_q=40, seqlen_k=70, heads_q=2, head_dim=192, head_dim_v=128,
             dtype="bfloat16", causal=True),
        {FA2, FA4, FI, AITER, FA3, XF, SDPA}),
    "mla absorbed 576/512 decode (latent-kv)": (
        Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=64, seqlens_k=(64, 21), heads_q=8,
             heads_kv=1, head_dim=576, head_dim_v=512, layout="latent-kv", paged_block_size=16,
             dtype="bfloat16"),
        {FA2, FA4, FI, FA3}),
    "learnable sink": (
        Case(batch=1, seqlen_q=30, seqlen_k=50, heads_q=4, heads_kv=2, causal=True,
             learnable_sink=True, dtype="bfloat16"),
        {FA2, FA4, AITER}),
    "learnable sink, varlen": (
        Case(entry="varlen", batch=2, seqlens_q=(5, 20), seqlens_k=(40, 20), heads_q=4,
             heads_kv=2, causal=True, learnable_sink=True, dtype="bfloat16"),
        {FA2, FA4, FI, AITER}),
    "sink tokens": (
        Case(batch=1, seqlen_q=40, seqlen_k=60, heads_q=2, window=(7, 0), causal=True,
             sink_tokens=4, dtype="float16"),
        {FA2, AITER, XF, SDPA}),
    "fp8 KV cache, 16-bit queries": (
        Case(entry="kvcache", batch=2, seqlen_q=1, seqlen_k=96, seqlens_k=(96, 30), heads_q=8,
             heads_kv=2, paged_block_size=16, dtype="bfloat16", kv_dtype="float8_e4m3fn"),
        {FA2, FI}),
    "fp8 e4m3fn": (
        Case(batch=1, seqlen_q=32, seqlen_k=200, heads_q=2, dtype="float8_e4m3fn"),
        {FA4, FA3_FP8, AITER_FP8, AITER}),
    "fp8 e4m3fnuz (gfx942)": (
        Case(batch=1, seqlen_q=32, seqlen_k=200, heads_q=2, dtype="float8_e4m3fnuz"),
        {AITER_FP8, AITER}),
    "poisoned padding: padded varlen": (
        Case(entry="varlen", batch=3, seqlens_q=(1, 1, 1), seqlens_k=(70, 0, 9), heads_q=4,
             heads_kv=1, layout="padded"),
        {FA2, FA4, FA3}),
    "poisoned padding: page tails and spare pages": (
        Case(entry="kvcache", batch=2, seqlen_q=2, seqlen_k=64, seqlens_k=(40, 9), heads_q=2,
             paged_block_size=16, dtype="float16"),
        {FA2, FA4, FI, FA3, VLLM}),
    "serving decode: ragged, a tenth empty, GQA 8, 24 heads": (
        Case(entry="varlen", batch=10, seqlens_q=(1,) * 10,
             seqlens_k=(50, 0, 17, 33, 64, 1, 20, 9, 40, 12), heads_q=24, heads_kv=3,
             paged_block_size=16, dtype="bfloat16"),
        {FA2, FA4, FI, AITER, VLLM}),
    "chunked prefill": (
        Case(entry="varlen", batch=2, seqlens_q=(8, 3), seqlens_k=(60, 3), heads_q=12,
             heads_kv=3, causal=True, dtype="bfloat16"),
        {FA2, FA4, FI, AITER, FA3, XF, VLLM}),
}


@pytest.fixture(scope="module")
def backends():
    return {spec: load_backend(spec) for spec in SPECS}


@pytest.mark.parametrize("problem", PROBLEMS)
def test_every_family_that_claims_a_problem_computes_it(problem, backends):
    case, claimants = PROBLEMS[problem]
    claimed = {spec for spec, backend in backends.items()
               if not backend.unsupported_reasons(case, CPU)
               and not (case.fp8 and spec in NO_FP8_MATH)}
    assert claimed == claimants, f"claimed by {sorted(claimed)}"
    for spec in sorted(claimed):
        verdict = CaseRun(case, backends[spec], CPU, seed=0, profile=get_profile("quick"),
                          device="cpu").run("fwd")
        assert verdict.status == "pass", (spec, verdict.reason)
