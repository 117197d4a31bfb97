"""flash-attn 3 (the ``hopper/`` build): ``flash_attn_interface`` as a family, ``flash-attn3``.

Call convention (``hopper/flash_attn_interface.py``, Dao-AILab/flash-attention): the flash-attn 2
layouts and bottom-right masks, but no ``dropout_p`` and no ``alibi_slopes``; ``num_splits``,
``pack_gqa``, ``seqused_q``/``seqused_k`` (varlen), ``page_table`` instead of ``block_table`` in
``flash_attn_with_kvcache`` (any page size). ``flash_attn_func`` returns ``out``, or ``(out, lse)``
with ``return_attn_probs=True``; before PR #1851 (August 2025) it always returned the tuple. Both
are handled: a tuple's first item is the output, its second the lse.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from harness.backends.base import DEFAULT_FEATURES, Capabilities
from harness.backends.flash_attn import FEATURE_KEYWORDS as FLASH_ATTN_KEYWORDS
from harness.backends.flash_attn import issue26_arguments, varlen_lse_layout
from harness.backends.module import (
    Convention,
    ModuleBackend,
    case_value,
    import_default,
    inputs_value,
    take_return,
)
from harness.case import FP8_DTYPES, Case
from harness.vocab import OPT_IN_FEATURES

#: every feature but lastdim-strided (base.DEFAULT_FEATURES: the API copies such tensors)
ALL = frozenset(DEFAULT_FEATURES)
FP16 = frozenset({"float16", "bfloat16"})

CONVENTION = Convention(
    layout="bshd (varlen: thd + cu_seqlens int32)",
    causal="bottom-right",
    lse_base="e",
    lse_layout="(batch, heads_q, seqlen_q); varlen (heads_q, total_q)",
    lse_empty_rows="+inf",
    returns="out, or (out, softmax_lse) with return_attn_probs=True (always the tuple before "
            "PR #1851); kv-cache (out, softmax_lse, ...) with return_softmax_lse=True",
    source="Dao-AILab/flash-attention hopper/flash_attn_interface.py",
)

_NO_DROPOUT = "flash-attn3 has no dropout (hopper/flash_attn_interface.py takes no dropout_p)"
_NO_ALIBI = "flash-attn3 has no ALiBi (hopper/flash_attn_interface.py takes no alibi_slopes)"
#: FA3's value head dims (hopper/flash_api.cpp @ 0251105a, l.782-787): "(head_size > 128 &&
#: head_size <= 192 && head_size_v > 96 && head_size_v <= 128) || (head_size <= 64 &&
#: head_size_v <= 512)", and "Only Hopper supports different V headdim".
FA3_HEAD_DIMS_V = (((129, 192), (97, 128)), ((1, 64), (1, 512)))
#: The input dtypes FA3 takes (hopper/flash_api.cpp @ 0251105a, mha_fwd l.715-720): "FlashAttention
#: only supports fp16, bf16, and fp8_e4m3 data type" (float8_e4m3fn; no e4m3fnuz, no e5m2, no
#: float32), fp8 on Hopper only ("FlashAttention on Ampere/Ada cards only supports fp16 and bf16
#: data type"), k and v in q's dtype.
FA3_DTYPES = FP16 | {"float8_e4m3fn"}
_FA3_DTYPE_WORDS = ("FA3 takes fp16, bf16 and float8_e4m3fn only: \"FlashAttention only supports "
                    "fp16, bf16, and fp8_e4m3 data type\" (hopper/flash_api.cpp, mha_fwd)")
_DTYPE_NOTES = {f"dtype:{d}": _FA3_DTYPE_WORDS
                for d in ("float32", "float8_e4m3fnuz", "float8_e5m2")}
#: hopper/flash_api.cpp (l.787-790): "HeaddimV > 256 requires fp16 and bf16 data type".
FA3_FP8_HEAD_DIM_V_MAX = 256
_ISSUE26_NOTES = {
    "head_dims_v": "hopper/flash_api.cpp (l.782-787): q/k in (128, 192] with v in (96, 128], "
                   "or q/k <= 64 with v <= 512; Hopper only",
    "sink": "Dao-AILab's hopper/flash_attn_interface.py takes no learnable sink (vLLM's fork "
            "adds one)",
    "sink-tokens": "hopper/flash_attn_interface.py dropped sink_token_length (commit 5458c78e, "
                   "\"Remove sink token\")",
    "fp8-kv": "FA3 takes q, k and v of one dtype: \"query and key must have the same dtype\" "
              "(hopper/flash_api.cpp), so no fp8 KV cache with 16-bit queries",
}

#: What each flavor claims, with sources.
FLAVOR_CAPABILITIES: dict[str, Capabilities] = {
    # hopper/flash_attn_interface.py: no dropout_p, no alibi_slopes; page_table of any page
    # size ("page_block_size can be arbitrary"); head dims up to 256 (hopper/setup.py builds
    # hdim 64..256). The varlen function takes no page_table: paged varlen is not posed.
    # fp8 forward: float8_e4m3fn with float32 descales (hopper/test_flash_attn.py); fp8 cases
    # are forward-only, judged by harness/exact/fp8.py.
    # Issue 26: a value head dim of its own (FA3_HEAD_DIMS_V), v as a view of k, and padded
    # varlen through seqused_q/seqused_k.
    "cuda": Capabilities(
        dtypes=FA3_DTYPES, head_dim_max=256,
        features=ALL - {"dropout", "alibi", "alibi-per-batch"} | {"mla", "latent-kv", "padded"},
        entries=frozenset({"dense", "varlen", "kvcache"}), returns_lse=True,
        head_dims_v=FA3_HEAD_DIMS_V,
        notes={"dropout": _NO_DROPOUT, "alibi": _NO_ALIBI, "alibi-per-batch": _NO_ALIBI,
               **_ISSUE26_NOTES, **_DTYPE_NOTES},
    ),
    # On ROCm, flash-attention's hopper/flash_attn_interface.py routes to AITER's Triton kernels
    # (ROCm/aiter, aiter/ops/triton/), which refuse softcap and num_splits > 1.
    "rocm-aiter-triton": Capabilities(
        dtypes=FP16, head_dim_max=256,
        features=ALL - {"dropout", "alibi", "alibi-per-batch", "softcap", "splits"},
        entries=frozenset({"dense", "varlen", "kvcache"}), returns_lse=True,
        notes={"dropout": _NO_DROPOUT, "alibi": _NO_ALIBI, "alibi-per-batch": _NO_ALIBI,
               "softcap": "softcap is refused by AITER's Triton FA3 path on ROCm "
                          "(ROCm/aiter aiter/ops/triton/)",
               "splits": "num_splits > 1 is refused by AITER's Triton FA3 path on ROCm "
                         "(ROCm/aiter aiter/ops/triton/)"},
    ),
    # flash-attn3@TARGET: what the API can express, in the dtypes the real kernel takes
    # (FA3_DTYPES: fp16, bf16, float8_e4m3fn; the module narrows). Issue 26's problems are
    # posed to a module whose functions take their keywords (FEATURE_KEYWORDS: learnable_sink,
    # sink_token_length, seqused_q), but not an fp8 cache under 16-bit queries, which FA3
    # refuses although it takes k_descale ("query and key must have the same dtype").
    "module": Capabilities(
        dtypes=FA3_DTYPES,
        features=ALL - {"dropout", "alibi", "alibi-per-batch"}
        | (set(OPT_IN_FEATURES) - {"fp8-kv"}),
        entries=frozenset({"dense", "varlen", "kvcache"}), returns_lse=True,
        notes={"dropout": _NO_DROPOUT, "alibi": _NO_ALIBI, "alibi-per-batch": _NO_ALIBI,
               "fp8-kv": _ISSUE26_NOTES["fp8-kv"], **_DTYPE_NOTES},
    ),
}

#: flash-attn's keywords less dropout and ALiBi (FA3 has neither), paged KV through
#: ``page_table`` and ``num_splits`` on every entry point.
FEATURE_KEYWORDS = {**{k: v for k, v in FLASH_ATTN_KEYWORDS.items()
                       if k not in ("dropout", "alibi", "alibi-per-batch")},
                    "paged": {"varlen": ("page_table",), "kvcache": ("page_table",)},
                    "splits": {"*": ("num_splits",)}}


class FlashAttn3Backend(ModuleBackend):
    """FA3's flash_attn_func / flash_attn_varlen_func / flash_attn_with_kvcache."""

    family = "flash-attn3"
    default_module = "flash_attn_interface"
    device_types = ("cuda",)
    entry_functions = {"dense": "flash_attn_func", "varlen": "flash_attn_varlen_func",
                       "kvcache": "flash_attn_with_kvcache"}
    feature_keywords = FEATURE_KEYWORDS
    convention = CONVENTION

    def __init__(self, module: Any = None, target: str | None = None,
                 flavor: str | None = None) -> None:
        import torch

        error = ""
        if module is None and target is None:
            module, error = import_default(self.default_module)
        hip = bool(getattr(torch.version, "hip", None))
        if flavor is None:
            flavor = "module" if target is not None else ("rocm-aiter-triton" if hip else "cuda")
        super().__init__(module, target, base=FLAVOR_CAPABILITIES[flavor], import_error=error)
        self.flavor = flavor if module is not None else ""

    def unavailable_reason(self) -> str:
        if "No module named 'flash_attn_interface'" in self._error:
            return ("flash-attn3 is not installed (flash_attn_interface: built from "
                    "flash-attention's hopper/ directory, not on PyPI)")
        return f"import flash_attn_interface failed: {self._error}"

    def availability(self) -> str | None:
        import torch

        reason = super().availability()
        if reason is None and self.target is None and not torch.cuda.is_available():
            return "no GPU here: flash-attn3 runs on CUDA (Hopper) and ROCm devices only"
        return reason

    def unsupported_reasons(self, case: Case, target) -> list[str]:
        reasons = super().unsupported_reasons(case, target)
        # hopper/README.md: FlashAttention-3 is for Hopper GPUs (H100/H800, sm_90).
        if self.flavor == "cuda" and target.vendor == "nvidia" and target.arch != "sm_90":
            reasons.insert(0, f"{target.arch} is not Hopper (sm_90), which flash-attn3 needs "
                              "(hopper/README.md)")
        if case.dtype in FP8_DTYPES and case.dv > FA3_FP8_HEAD_DIM_V_MAX:
            reasons.append(f"head_dim_v={case.dv} with dtype={case.dtype}: \"HeaddimV > 256 "
                           "requires fp16 and bf16 data type\" (hopper/flash_api.cpp, mha_fwd)")
        return list(dict.fromkeys(reasons))

    def forward(self, inputs, *, deterministic: bool = True):
        from harness.exact.outputs import Outputs

        case = inputs.case
        common: dict[str, Any] = {"softmax_scale": case.scale, "causal": case.causal,
                                  "window_size": case.window, "softcap": case.softcap,
                                  **issue26_arguments(inputs)}
        for name in ("q_descale", "k_descale", "v_descale"):  # fp8 cases (issue 14)
            if inputs_value(inputs, name) is not None:
                common[name] = inputs_value(inputs, name)
        splits = case_value(case, "num_splits", 0)
        fa = self._module
        if case.entry == "kvcache":
            paged = bool(case.paged_block_size)
            rotary = bool(case_value(case, "rotary_dim", 0))
            wanted = {
                "k": inputs_value(inputs, "k_new"), "v": inputs_value(inputs, "v_new"),
                "rotary_cos": inputs_value(inputs, "rotary_cos") if rotary else None,
                "rotary_sin": inputs_value(inputs, "rotary_sin") if rotary else None,
                "cache_seqlens": inputs.cache_seqlens,
                "cache_batch_idx": inputs_value(inputs, "cache_batch_idx"),
                "cache_leftpad": inputs_value(inputs, "cache_leftpad"),
                "page_table": inputs.block_table, **common, "num_splits": splits,
                "return_softmax_lse": True,
            }
            if rotary:
                wanted["rotary_interleaved"] = bool(case_value(case, "rotary_interleaved", False))
            kw = self._accepted("kvcache", wanted)
            result = fa.flash_attn_with_kvcache(
                inputs.q, inputs.k_pages if paged else inputs.k,
                inputs.v_pages if paged else inputs.v, **kw)
            # hopper/flash_attn_interface.py: `(out, softmax_lse, *rest) if return_softmax_lse
            # else out`
            out, lse = take_return(result, "flash_attn_with_kvcache",
                                   "(out, softmax_lse, ...)" if kw.get("return_softmax_lse")
                                   else "out")
            return Outputs(out=out, lse=lse)
        wanted = {**common, "deterministic": deterministic, "return_attn_probs": True}
        if splits:
            wanted["num_splits"] = splits
        entry = "varlen" if case.entry == "varlen" else "dense"
        kw = self._accepted(entry, wanted)
        if case.entry == "varlen":
            result = fa.flash_attn_varlen_func(
                inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                case.seqlen_q, case.seqlen_k, **kw)
        else:
            result = fa.flash_attn_func(inputs.q, inputs.k, inputs.v, **kw)
        # Before PR #1851 the functions took no return_attn_probs and always returned
        # (out, softmax_lse); since, `(out, softmax_lse) if return_attn_probs else out`.
        tuple_only = ("(out, softmax_lse, ...)",)
        out, lse = take_return(result, self.entry_functions[entry],
                               *(tuple_only if kw.get("return_attn_probs")
                                 else ("out", *tuple_only)))
        if lse is not None and case.entry == "varlen":
            lse = varlen_lse_layout(lse, case)
        return Outputs(out=out, lse=lse)

    def _accepted(self, entry: str, wanted: dict[str, Any]) -> dict[str, Any]:
        sig = self.signature(entry)
        return {k: v for k, v in wanted.items() if sig.accepts(k)}


def machine_facts() -> dict[str, str]:
    """FA3's version when installed (distribution ``flash_attn_3``), without importing it."""
    for dist in ("flash_attn_3", "flash-attn-3"):
        try:
            return {"flash_attn_3": metadata.version(dist)}
        except metadata.PackageNotFoundError:
            continue
    return {}
