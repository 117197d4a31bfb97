"""The flash-attn adapter's argument handling, on the CPU.

Two honest ways to see what ``FlashAttnBackend`` hands to flash-attn without a GPU:

* **Fakes** (always run): a stand-in for ``flash_attn_interface`` that records the exact call
  and answers from the arguments alone, with the harness's exact attention primitive
  (``reference.attention_forward``). If the adapter packed varlen sequences, cache lengths or
  page tables wrongly, the fake computes the wrong thing and the parity check fails; a fake that
  ignores one argument is shown to fail, so the checks can fail.
* **flash-attn's own PyTorch reference** (opt-in): with flash-attn 2.8.3 installed as pure
  Python (the Triton AMD flavor) and ``FLASH_ATTENTION_TRITON_AMD_REF=1``, its real
  ``flash_attn_func`` / ``flash_attn_varlen_func`` wrappers run on the CPU once their custom ops
  get a CPU kernel (flash-attn registers them for CUDA only). Skipped, with the reason, where
  flash-attn is not importable; see the README ("flash-attn on a CPU") for the install.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from harness.backends.flash_attn import FlashAttnBackend
from harness.case import Case
from harness.checks.context import CaseRun
from harness.checks.plan import Plan
from harness.checks.runner import audit_verdict
from harness.exact.inputs import make_inputs
from harness.exact.reference import Params, attention_forward
from harness.options import get_profile
from harness.target import from_facts

CPU = from_facts({"machine": "x86_64", "device_count": 0})


# ----------------------------------------------------------------------------- the fake


def _attend(q, k, v, *, softmax_scale, causal, window_size, softcap, alibi_slopes):
    """flash-attn's math for one uniform batch ``(B, n, Hq, d)``, in float64."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = window_size
    params = Params(scale=scale, left=left, right=0 if causal else right, softcap=softcap)
    slopes = None if alibi_slopes is None else alibi_slopes.double()
    out, lse = attention_forward(q.double(), k.double(), v.double(), params, slopes)
    return out.to(q.dtype), lse.float()


class FakeFlashAttn:
    """Imitates ``flash_attn.flash_attn_interface``: records every call, computes from the
    arguments it was given. ``ignore`` names arguments to drop (a broken kernel)."""

    __version__ = "2.8.3+fake"

    def __init__(self, ignore: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.ignore = ignore

    def _math(self, kw):
        return dict(
            softmax_scale=kw["softmax_scale"], causal=kw["causal"],
            window_size=(-1, -1) if "window_size" in self.ignore else kw["window_size"],
            softcap=0.0 if "softcap" in self.ignore else kw["softcap"],
            alibi_slopes=kw["alibi_slopes"])

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                        deterministic=False, return_attn_probs=False):
        kw = dict(locals())
        del kw["self"]
        self.calls.append(("flash_attn_func", kw))
        out, lse = _attend(q, k, v, **self._math(kw))
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        kw = dict(locals())
        del kw["self"]
        self.calls.append(("flash_attn_varlen_func", kw))
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), -math.inf)
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for b in range(len(cq) - 1):
            qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            if qs.start == qs.stop:
                continue
            o, l_ = _attend(q[qs][None], k[ks][None], v[ks][None], **self._math(kw))
            out[qs], lse[:, qs] = o[0], l_[0]
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                                rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                                cache_leftpad=None, block_table=None, softmax_scale=None,
                                causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                                return_softmax_lse=False):
        kw = dict(locals())
        del kw["self"]
        self.calls.append(("flash_attn_with_kvcache", kw))
        use_table = block_table is not None and "block_table" not in self.ignore
        outs, lses = [], []
        for b in range(q.shape[0]):
            if use_table:  # pages in table order -> the logical cache of row b
                kc = k_cache[block_table[b].long()].flatten(0, 1)
                vc = v_cache[block_table[b].long()].flatten(0, 1)
            elif block_table is not None:  # a broken kernel: pages in storage order
                per = block_table.shape[1]
                kc = k_cache[b * per:(b + 1) * per].flatten(0, 1)
                vc = v_cache[b * per:(b + 1) * per].flatten(0, 1)
            else:
                kc, vc = k_cache[b], v_cache[b]
            n = int(cache_seqlens[b])
            o, l_ = _attend(q[b:b + 1], kc[None, :n], vc[None, :n], **self._math(kw))
            outs.append(o)
            lses.append(l_)
        out, lse = torch.cat(outs), torch.cat(lses)
        return (out, lse) if return_softmax_lse else out


def _run(case: Case, fake: FakeFlashAttn, flavor: str = "cuda", check: str = "fwd"):
    backend = FlashAttnBackend(module=fake, flavor=flavor)
    # The fake computes causal-ALiBi lse in the distance form, not alibi.h's +slope*col form
    # (tests/test_kvcache_reference.py and the flash_attn_ref fixture cover that convention).
    backend.lse_convention = "harness"
    run = CaseRun(case, backend, CPU, seed=0, profile=get_profile("quick"), device="cpu")
    return run.run(check), run.inputs


# ------------------------------------------------------------------------- dense entry


def test_dense_arguments_and_result():
    case = Case(batch=2, seqlen_q=33, seqlen_k=47, heads_q=4, heads_kv=2, head_dim=32,
                dtype="float16", causal=True, alibi=True, scale=0.3)
    fake = FakeFlashAttn()
    verdict, inputs = _run(case, fake)
    assert verdict.status == "pass", verdict.reason
    (name, kw), = fake.calls
    assert name == "flash_attn_func"
    # the checks call the kernel on a clone of the inputs (same geometry, same values)
    for name in ("q", "k", "v"):
        assert torch.equal(kw[name], getattr(inputs, name))
        assert kw[name].stride() == getattr(inputs, name).stride()
    assert kw["q"].shape == (2, 33, 4, 32) and kw["k"].shape == (2, 47, 2, 32)
    assert kw["softmax_scale"] == 0.3 and kw["causal"] is True and kw["window_size"] == (-1, -1)
    assert kw["softcap"] == 0.0 and kw["dropout_p"] == 0.0
    assert kw["alibi_slopes"].dtype == torch.float32 and kw["alibi_slopes"].shape == (4,)
    assert kw["return_attn_probs"] is True, "the lse is asked for, so it is judged too"
    lse = verdict.metrics["lse"]
    assert lse["mismatched"] == 0 and lse["total"] == 2 * 4 * 33


def test_dense_window_and_softcap_reach_the_kernel():
    case = Case(batch=1, seqlen_q=40, seqlen_k=40, heads_q=2, head_dim=32, dtype="bfloat16",
                window=(7, 3), softcap=2.0)
    fake = FakeFlashAttn()
    verdict, _ = _run(case, fake)
    assert verdict.status == "pass", verdict.reason
    kw = fake.calls[0][1]
    assert kw["window_size"] == (7, 3) and kw["softcap"] == 2.0 and kw["causal"] is False


def test_a_kernel_that_drops_the_window_fails():
    case = Case(batch=1, seqlen_q=40, seqlen_k=40, heads_q=2, head_dim=32, dtype="bfloat16",
                window=(7, 3))
    verdict, _ = _run(case, FakeFlashAttn(ignore=("window_size",)))
    assert verdict.status == "fail"


def test_dropout_is_passed_and_lse_not_requested():
    case = Case(batch=1, seqlen_q=8, seqlen_k=8, heads_q=1, head_dim=16, dtype="float16",
                dropout_p=0.25)
    fake = FakeFlashAttn()
    backend = FlashAttnBackend(module=fake, flavor="cuda")
    backend.forward(make_inputs(case, "cpu", 0), deterministic=True)
    kw = fake.calls[0][1]
    assert kw["dropout_p"] == 0.25 and kw["deterministic"] is True
    assert kw["return_attn_probs"] is False, "with dropout, S would be materialised"


# ------------------------------------------------------------------------ varlen entry


def test_varlen_packing_arguments_and_result():
    case = Case(entry="varlen", batch=3, seqlens_q=(5, 0, 17), seqlens_k=(9, 4, 17), heads_q=4,
                heads_kv=1, head_dim=32, dtype="float16", causal=True)
    fake = FakeFlashAttn()
    verdict, inputs = _run(case, fake)
    assert verdict.status == "pass", verdict.reason
    (name, kw), = fake.calls
    assert name == "flash_attn_varlen_func"
    assert kw["q"].shape == (22, 4, 32) and kw["k"].shape == (30, 1, 32)
    assert kw["cu_seqlens_q"].dtype == torch.int32 and kw["cu_seqlens_k"].dtype == torch.int32
    assert kw["cu_seqlens_q"].tolist() == [0, 5, 5, 22]
    assert kw["cu_seqlens_k"].tolist() == [0, 9, 13, 30]
    assert (kw["max_seqlen_q"], kw["max_seqlen_k"]) == (17, 17)
    assert kw["block_table"] is None


def test_varlen_with_wrong_sequence_boundaries_fails():
    """The check sees packing mistakes: the same kernel fed shifted boundaries fails."""
    case = Case(entry="varlen", batch=2, seqlens_q=(6, 10), seqlens_k=(12, 5), heads_q=2,
                head_dim=32, dtype="float16")
    fake = FakeFlashAttn()
    original = fake.flash_attn_varlen_func

    def off_by_one(q, k, v, cu_q, cu_k, *args, **kwargs):
        return original(q, k, v, cu_q, torch.tensor([0, 11, 17], dtype=torch.int32), *args,
                        **kwargs)

    fake.flash_attn_varlen_func = off_by_one
    verdict, _ = _run(case, fake)
    assert verdict.status == "fail"


# ----------------------------------------------------------------------- kvcache entry


def test_kvcache_contiguous_arguments_and_result():
    case = Case(entry="kvcache", batch=2, seqlen_q=3, seqlen_k=40, seqlens_k=(40, 17), heads_q=4,
                heads_kv=2, head_dim=32, dtype="bfloat16", causal=True)
    fake = FakeFlashAttn()
    verdict, inputs = _run(case, fake)
    assert verdict.status == "pass", verdict.reason
    (name, kw), = fake.calls
    assert name == "flash_attn_with_kvcache"
    assert kw["k_cache"].shape == (2, 40, 2, 32) and kw["block_table"] is None
    assert kw["cache_seqlens"].dtype == torch.int32 and kw["cache_seqlens"].tolist() == [40, 17]
    assert kw["k"] is None and kw["v"] is None, "nothing is appended to the cache"
    assert kw["return_softmax_lse"] is True and kw["causal"] is True


def test_kvcache_paged_arguments_and_result():
    case = Case(entry="kvcache", batch=2, seqlen_q=2, seqlen_k=300, seqlens_k=(300, 129),
                paged_block_size=256, heads_q=2, heads_kv=1, head_dim=16, dtype="float16")
    fake = FakeFlashAttn()
    verdict, inputs = _run(case, fake)
    assert verdict.status == "pass", verdict.reason
    kw = fake.calls[0][1]
    blocks_per_seq = 2
    assert kw["k_cache"].shape == (2 * blocks_per_seq + 2, 256, 1, 16), \
        "(num_blocks, page_block_size, heads_kv, head_dim)"
    assert kw["v_cache"].shape == kw["k_cache"].shape
    assert kw["block_table"].dtype == torch.int32
    assert kw["block_table"].shape == (2, blocks_per_seq)
    assert kw["block_table"].unique().numel() == 4, "every sequence has its own pages"
    assert kw["cache_seqlens"].tolist() == [300, 129]


def test_kvcache_paged_kernel_that_ignores_the_block_table_fails():
    case = Case(entry="kvcache", batch=2, seqlen_q=2, seqlen_k=300, seqlens_k=(300, 129),
                paged_block_size=256, heads_q=2, heads_kv=1, head_dim=16, dtype="float16")
    verdict, _ = _run(case, FakeFlashAttn(ignore=("block_table",)))
    assert verdict.status == "fail"


def test_kvcache_has_no_backward():
    case = Case(entry="kvcache", batch=1, seqlen_q=2, seqlen_k=8, heads_q=1, head_dim=16)
    backend = FlashAttnBackend(module=FakeFlashAttn(), flavor="rocm-ck")
    assert backend.capabilities.check_reasons("bwd", case, backend.name) == [
        "the kvcache entry point is forward-only"]


# ---------------------------------------------------------------- flavors and audit


def test_fake_module_reports_its_version_and_requested_flavor():
    backend = FlashAttnBackend(module=FakeFlashAttn(), flavor="rocm-ck")
    assert backend.describe() == {"name": "flash-attn", "family": "flash-attn",
                                  "flavor": "rocm-ck", "version": "2.8.3+fake"}


def test_unknown_flavor_is_a_usage_error():
    from harness.errors import UsageError

    with pytest.raises(UsageError, match="flavor 'rocm-aiter' is unknown"):
        FlashAttnBackend(module=FakeFlashAttn(), flavor="rocm-aiter")


def test_ck_softcap_is_flagged_silent_under_audit():
    """The ROCm CK build accepts softcap and ignores it: a fake CK kernel doing the same is
    skipped by default and flagged as a silent failure under --audit."""
    from harness.target import from_facts as facts_to_target

    mi300x = facts_to_target({"torch_version_hip": "6.2.41133-dd7f95766", "device_count": 1,
                              "device_name": "AMD Instinct MI300X",
                              "gcn_arch_name": "gfx942:sramecc+:xnack-"})
    case = Case(batch=1, seqlen_q=32, seqlen_k=32, heads_q=2, head_dim=32, dtype="float16",
                softcap=2.0)
    backend = FlashAttnBackend(module=FakeFlashAttn(ignore=("softcap",)), flavor="rocm-ck")
    reasons = backend.unsupported_reasons(case, mi300x)
    assert reasons == ["softcap is accepted and silently ignored by rocm-ck "
                       "(csrc/flash_attn_ck/mha_fwd.cpp)"]
    verdict, _ = _run(case, backend._module, flavor="rocm-ck")
    plan = Plan(case, backend.name, ("fwd",), {}, audit=True, unsupported=tuple(reasons))
    audited = audit_verdict(verdict, plan)
    assert audited.status == "fail" and audited.metrics["audit"] == "silent"


# ------------------------------------------- flash-attn's own reference path (opt-in)


@pytest.fixture(scope="module")
def fa_reference():
    """flash-attn 2.8.x's real interface, running its PyTorch reference on the CPU."""
    saved = {k: os.environ.get(k) for k in ("FLASH_ATTENTION_TRITON_AMD_ENABLE",
                                            "FLASH_ATTENTION_TRITON_AMD_REF")}
    os.environ["FLASH_ATTENTION_TRITON_AMD_ENABLE"] = "TRUE"
    os.environ["FLASH_ATTENTION_TRITON_AMD_REF"] = "1"
    try:
        import flash_attn.flash_attn_interface as iface
    except Exception as exc:  # noqa: BLE001 - any import failure means: not available here
        pytest.skip(f"flash-attn's Triton AMD build is not importable here ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); see README, "
                    "'flash-attn on a CPU'")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if not getattr(iface, "USE_TRITON_ROCM", False):
        pytest.skip("flash-attn was imported earlier without "
                    "FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE")
    from flash_attn.flash_attn_triton_amd import utils

    if not utils.USE_REF:
        pytest.skip("flash-attn was imported earlier without FLASH_ATTENTION_TRITON_AMD_REF=1")
    # flash-attn registers its custom ops for CUDA only; give the forward ops a CPU kernel
    # (their own Python body, which calls the reference through interface_fa).
    for op in (iface._flash_attn_forward, iface._flash_attn_varlen_forward):
        if hasattr(op, "register_kernel"):
            try:
                op.register_kernel("cpu")(op._init_fn)
            except RuntimeError as exc:
                if "already" not in str(exc):
                    raise
    return iface


@pytest.mark.parametrize("case", [
    Case(batch=2, seqlen_q=33, seqlen_k=47, heads_q=4, heads_kv=2, head_dim=32, dtype="float16",
         causal=True),
    # no alibi here: flash-attn's Triton AMD metadata asserts alibi_slopes.is_cuda
    Case(batch=1, seqlen_q=64, seqlen_k=64, heads_q=2, head_dim=40, dtype="bfloat16",
         scale=0.25),
    Case(batch=2, seqlen_q=17, seqlen_k=9, heads_q=2, head_dim=32, dtype="bfloat16",
         causal=True),
], ids=["dense-gqa-causal-bottom-right", "dense-scale-d40", "dense-sq>sk-empty-rows"])
def test_dense_through_flash_attn_reference(fa_reference, case):
    backend = FlashAttnBackend(module=fa_reference)
    assert backend.flavor == "rocm-triton"
    run = CaseRun(case, backend, CPU, seed=0, profile=get_profile("quick"), device="cpu")
    verdict = run.run("fwd")
    assert verdict.status == "pass", verdict.reason


def test_varlen_through_flash_attn_reference(fa_reference):
    case = Case(entry="varlen", batch=3, seqlens_q=(5, 1, 17), seqlens_k=(9, 4, 17), heads_q=4,
                heads_kv=1, head_dim=32, dtype="float16", causal=True)
    backend = FlashAttnBackend(module=fa_reference)
    run = CaseRun(case, backend, CPU, seed=0, profile=get_profile("quick"), device="cpu")
    verdict = run.run("fwd")
    assert verdict.status == "pass", verdict.reason


def test_varlen_reference_path_sees_wrong_boundaries(fa_reference):
    """The real path is sensitive to cu_seqlens: shifted boundaries fail the check."""
    case = Case(entry="varlen", batch=2, seqlens_q=(6, 10), seqlens_k=(12, 5), heads_q=2,
                head_dim=32, dtype="float16")

    class Shifted:
        USE_TRITON_ROCM = True

        @staticmethod
        def flash_attn_varlen_func(q, k, v, cu_q, cu_k, *args, **kwargs):
            shifted = torch.tensor([0, 11, 17], dtype=torch.int32)
            return fa_reference.flash_attn_varlen_func(q, k, v, cu_q, shifted, *args, **kwargs)

    backend = FlashAttnBackend(module=Shifted(), flavor="rocm-triton")
    run = CaseRun(case, backend, CPU, seed=0, profile=get_profile("quick"), device="cpu")
    assert run.run("fwd").status == "fail"


def test_reference_path_rounds_float32_output_to_float16(fa_reference):
    """flash-attn 2.8.3's Triton AMD reference casts every output to float16
    (``fwd_ref.py``: ``o = o.to(torch.float16)``), so a float32 case fails parity there: the
    judge sees it (about 1e-3 error against an allowance of about 1e-6)."""
    case = Case(batch=2, seqlen_q=17, seqlen_k=17, heads_q=2, head_dim=32, dtype="float32")
    backend = FlashAttnBackend(module=fa_reference)
    run = CaseRun(case, backend, CPU, seed=0, profile=get_profile("quick"), device="cpu")
    verdict = run.run("fwd")
    assert verdict.status == "fail" and verdict.reason.startswith("out:"), verdict.reason


def test_varlen_lse_layout_undoes_only_the_known_transposition():
    from harness.backends.flash_attn import varlen_lse_layout

    case = Case(entry="varlen", batch=2, seqlens_q=(3, 4), seqlens_k=(3, 4), heads_q=2,
                head_dim=16)
    heads_first = torch.arange(14.0).reshape(2, 7)
    assert varlen_lse_layout(heads_first, case) is heads_first
    assert torch.equal(varlen_lse_layout(heads_first.t().contiguous(), case), heads_first)
    odd = torch.zeros(7)
    assert varlen_lse_layout(odd, case) is odd
