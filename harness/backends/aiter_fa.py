"""AITER's flash-attention API (``aiter.flash_attn_func`` / ``aiter.flash_attn_varlen_func``).

Call convention (ROCm/aiter ``aiter/ops/mha.py``): flash-attn 2's layouts and bottom-right masks,
with three differences the adapter translates: ``window_size`` is a 3-tuple ``(left, right,
sink)`` in current AITER (the third element: sink tokens, the first keys kept visible besides
the window); ``deterministic`` defaults to True (the harness passes it explicitly); the lse
comes back only with ``return_lse=True`` and the result is always a tuple (``(out,)`` without
it, in the 2024 API). Softcap is ``logits_soft_cap`` in the varlen function of current AITER;
varlen takes ``block_table`` for a paged KV cache. Targets: gfx942 (MI300X, MI325X) and gfx950
(MI350X, MI355X).

A learnable sink is ``sink_ptr`` ``(heads_q,)`` float32, a logit in the scaled, natural-log
space appended to each row (aiter/test_mha_common.py ``attention_ref`` l.590-600 @ e4048607).

fp8 (q, k and v all ``float8_e4m3fn`` or ``float8_e4m3fnuz``, "query and key must have the same
dtype") goes through ``flash_attn_fp8_pertensor_func(q, k, v, q_descale, k_descale, v_descale,
causal, window_size, softmax_scale, sink_ptr)`` and ``flash_attn_varlen_fp8_pertensor_func``
(mha.py l.3974, l.4034): descales of shape ``(1,)`` per tensor (or ``(batch, heads_kv)`` on the
ASM v3 path), no lse returned, and the output bfloat16 on the CK/ASM path ("For FP8 input,
output must have dtype BF16 for now", csrc/py_itfs_ck/mha_fwd_kernels.cu l.217-221) but float32
on the Triton path, taken when ``ENABLE_CK=0`` (aiter/jit/core.py l.31, default 1) and there is
no ``sink_ptr`` (interface_v3.py l.219-220), a path that also drops the window's sink element.
"""

from __future__ import annotations

import os
from dataclasses import replace
from importlib import metadata
from typing import Any

from harness.backends.base import DEFAULT_FEATURES, Capabilities
from harness.backends.flash_attn import varlen_lse_layout
from harness.backends.module import (
    Convention,
    ModuleBackend,
    Signature,
    import_default,
    inputs_value,
    take_return,
)
from harness.case import Case

#: every feature but lastdim-strided (base.DEFAULT_FEATURES: the API copies such tensors)
ALL = frozenset(DEFAULT_FEATURES)

CONVENTION = Convention(
    layout="bshd (varlen: thd + cu_seqlens int32)",
    causal="bottom-right",
    lse_base="e",
    lse_layout="(batch, heads_q, seqlen_q); varlen (heads_q, total_q)",
    lse_empty_rows="+inf (as flash-attn's CK kernels)",
    returns="a tuple: (out,) or (out, softmax_lse[, S_dmask]) with return_lse=True",
    source="ROCm/aiter aiter/ops/mha.py",
)

#: gfx targets AITER's CK attention kernels are built for (ROCm/aiter README, supported GPUs).
ARCHS = ("gfx942", "gfx950")

SOURCE = "ROCm/aiter @ e4048607"
#: The fp8 formats AITER's fp8 entries take (aiter/utility/dtypes.py: gfx942 float8_e4m3fnuz,
#: gfx950 and gfx12 float8_e4m3fn; which one a target takes is harness.exact.fp8's business).
FP8 = frozenset({"float8_e4m3fn", "float8_e4m3fnuz"})
#: The fp8 entry of each entry point (aiter/ops/mha.py l.3974, l.4034).
FP8_FUNCTIONS = {"dense": "flash_attn_fp8_pertensor_func",
                 "varlen": "flash_attn_varlen_fp8_pertensor_func"}
_FP8_NOTES = {"dtype:float8_e5m2": f"AITER's fp8 attention takes float8_e4m3fn or "
                                   f"float8_e4m3fnuz (aiter/utility/dtypes.py @ {SOURCE})"}
#: The dense ASM v3 gate, which never looks at sink_ptr (mha.py l.1815-1838): fmha_v3_fwd takes
#: no sink argument, so a sink is dropped there (read, not run; flagged in the review of
#: ROCm/aiter PR #5223).
_V3_DIMS = ((128, 128), (192, 128))
_SINK_DROPPED = ("sink_ptr is silently dropped on the dense ASM v3 path: can_impl_fmha_v3_fwd "
                 f"(aiter/ops/mha.py l.1815-1838 @ {SOURCE}) does not check it and fmha_v3_fwd "
                 "takes no sink (bf16 or fp8, head dims (128, 128) or (192, 128), no sliding "
                 "window, no varlen; read from the code, flagged in ROCm/aiter PR #5223)")

FLAVOR_CAPABILITIES: dict[str, Capabilities] = {
    # aiter/ops/mha.py: fp16/bf16 (mha_fwd_fp16_*/bf16_* entry points), ALiBi, dropout, the
    # varlen block_table; no kv-cache function of flash-attn's shape. head_dim <= 256 (CK fmha
    # instances go up to hdim 256). A value head dim of its own: flash_attn_func's docstring
    # gives v as (batch_size, seqlen, nheads_k, headdim_v) (aiter/ops/mha.py @ e4048607), and
    # the ASM v3 path takes (192, 128) as well as equal dims (can_impl_fmha_v3_fwd).
    # Issue 26: sink_ptr (learnable sinks), the window's third element (sink tokens), and the
    # fp8 entries (FP8_FUNCTIONS).
    "rocm": Capabilities(
        dtypes=frozenset({"float16", "bfloat16"}) | FP8, head_dim_max=256,
        features=ALL | {"mla", "latent-kv", "sink", "sink-tokens"},
        entries=frozenset({"dense", "varlen"}), returns_lse=True,
        notes={"entry:kvcache": "aiter has no flash_attn_with_kvcache", **_FP8_NOTES},
    ),
    "module": Capabilities(
        dtypes=frozenset({"float16", "bfloat16", "float32"}) | FP8,
        features=ALL | {"mla", "latent-kv", "sink", "sink-tokens"},
        entries=frozenset({"dense", "varlen"}), returns_lse=True, notes=dict(_FP8_NOTES),
    ),
}

FEATURE_KEYWORDS = {
    "dropout": {"*": ("dropout_p",)},
    "scale": {"*": ("softmax_scale",)},
    "causal": {"*": ("causal",)},
    "window": {"*": ("window_size",)},
    "softcap": {"*": ("logits_soft_cap", "softcap")},
    "alibi": {"*": ("alibi_slopes",)},
    "alibi-per-batch": {"*": ("alibi_slopes",)},
    "paged": {"dense": ("block_table",), "varlen": ("block_table",)},
    "sink": {"*": ("sink_ptr",)},
}


def window_argument(window: tuple[int, int], default: Any, sink: int = 0) -> tuple[int, ...]:
    """The window as AITER takes it: ``(left, right, sink)`` when the function's default has
    three items (the sink token count), else ``(left, right)``."""
    if isinstance(default, (tuple, list)) and len(default) == 3:
        return (window[0], window[1], sink)
    return tuple(window)


def _sink_element(default: Any) -> bool:
    return isinstance(default, (tuple, list)) and len(default) == 3


class AiterBackend(ModuleBackend):
    """aiter.flash_attn_func and aiter.flash_attn_varlen_func."""

    family = "aiter"
    default_module = "aiter"
    device_types = ("cuda",)
    entry_functions = {"dense": "flash_attn_func", "varlen": "flash_attn_varlen_func"}
    feature_keywords = FEATURE_KEYWORDS
    convention = CONVENTION

    def __init__(self, module: Any = None, target: str | None = None) -> None:
        error = ""
        if module is None and target is None:
            module, error = import_default(self.default_module)
        flavor = "module" if target is not None else "rocm"
        super().__init__(module, target, base=FLAVOR_CAPABILITIES[flavor], import_error=error)
        self.flavor = flavor if module is not None else ""
        if not self.version and module is not None and target is None:
            self.version = _dist_version()
        if module is not None:
            self.capabilities = self._by_functions(self.capabilities)

    def _plain(self, entry: str):
        func = getattr(self._module, self.entry_functions.get(entry, ""), None)
        return func if callable(func) else None

    def _fp8(self, entry: str):
        func = getattr(self._module, FP8_FUNCTIONS.get(entry, ""), None)
        return func if callable(func) else None

    def function(self, entry: str):
        """The 16-bit function of ``entry``, else its fp8 one (an fp8-only module serves the
        entry point for fp8 dtypes only: :meth:`_by_functions`)."""
        if self._module is None:
            return None
        return self._plain(entry) or self._fp8(entry)

    def _by_functions(self, caps: Capabilities) -> Capabilities:
        """Dtypes only where the module has the functions that take them."""
        entries = caps.entries
        plain = any(self._plain(e) for e in entries)
        fp8 = any(self._fp8(e) for e in entries)
        dtypes, notes = set(caps.dtypes), dict(caps.notes)
        if not fp8:
            for d in FP8 & dtypes:
                notes[f"dtype:{d}"] = f"{self.name} has no flash_attn_fp8_pertensor_func"
            dtypes -= FP8
        if not plain:
            for d in dtypes - FP8:
                notes[f"dtype:{d}"] = f"{self.name} has no flash_attn_func for 16-bit inputs"
            dtypes &= FP8
        return replace(caps, dtypes=frozenset(dtypes), notes=notes)

    def _case_function(self, case: Case):
        return (self._fp8 if case.dtype in FP8 else self._plain)(case.entry)

    def missing_keywords(self, case: Case) -> list[str]:
        """Keywords of the function the case goes to (the fp8 entry for fp8 dtypes); sink
        tokens need a window with a third element."""
        func = self._case_function(case)
        if func is None:
            return []
        sig = Signature.of(func)
        name = getattr(func, "__name__", "?")
        out = []
        for feature in sorted(case.features):
            names = self.keyword_for(feature, case.entry)
            if names and not any(sig.accepts(n) for n in names):
                out.append(f"{self.name}: {name} takes no {' or '.join(names)} argument, "
                           f"which {feature} needs")
        if case.sink_tokens and not _sink_element(sig.defaults.get("window_size")):
            out.append(f"{self.name}: {name}'s window_size has no third (sink) element, which "
                       "sink-tokens needs")
        return out

    def call_reasons(self, case: Case, target) -> list[str]:
        reasons = super().call_reasons(case, target)
        if self._module is not None and case.entry in FP8_FUNCTIONS \
                and self._case_function(case) is None and case.dtype in self.capabilities.dtypes:
            name = (FP8_FUNCTIONS if case.dtype in FP8 else self.entry_functions)[case.entry]
            reasons.insert(0, f"{self.name} has no {name} (the {case.entry} entry point for "
                              f"{case.dtype})")
        return reasons

    def returns_lse_for(self, case: Case) -> bool:
        """AITER's fp8 entries return only the output (mha.py l.3974-4032)."""
        return case.dtype not in FP8 and super().returns_lse_for(case)

    def unavailable_reason(self) -> str:
        if "No module named 'aiter'" in self._error:
            return "aiter is not installed (ROCm/aiter, PyPI amd-aiter; AMD GPUs only)"
        return f"import aiter failed: {self._error}"

    def availability(self) -> str | None:
        import torch

        reason = super().availability()
        if reason is None and self.target is None and not getattr(torch.version, "hip", None):
            return "aiter runs on ROCm builds of torch only"
        return reason

    def unsupported_reasons(self, case: Case, target) -> list[str]:
        reasons = super().unsupported_reasons(case, target)
        if self.flavor == "rocm" and target.vendor == "amd" and target.arch not in ARCHS:
            reasons.insert(0, f"{target.arch} is not an AITER attention target "
                              f"({', '.join(ARCHS)})")
        if case.dtype in FP8 and case.entry == "varlen" and case.fp8_recipe == "per-head":
            # the API's, whatever module serves it
            reasons.append("fp8_recipe=per-head on varlen: flash_attn_varlen_fp8_pertensor_func "
                           "takes one descale per tensor, (1,); (batch, heads_kv) descales are "
                           f"the dense ASM v3 path's (mha.py l.4034 @ {SOURCE})")
        if self.flavor == "rocm":
            reasons += installed_reasons(case, os.environ)
        return list(dict.fromkeys(reasons))

    def forward(self, inputs, *, deterministic: bool = True):
        from harness.exact.outputs import Outputs

        case = inputs.case
        if case.dtype in FP8:
            # the fp8 entries return the output alone
            name = FP8_FUNCTIONS.get(case.entry, "the fp8 entry")
            return Outputs(out=take_return(self._fp8_call(inputs), name, "out")[0])
        sig = self.signature(case.entry)
        wanted: dict[str, Any] = {
            "dropout_p": case.dropout_p,
            "softmax_scale": case.scale,
            "causal": case.causal,
            "window_size": window_argument(case.window, sig.defaults.get("window_size"),
                                           case.sink_tokens),
            "alibi_slopes": inputs.alibi_slopes,
            "deterministic": deterministic,
            "return_lse": case.dropout_p == 0,
        }
        if case.learnable_sink:
            wanted["sink_ptr"] = inputs_value(inputs, "learnable_sink")
        if case.softcap:
            wanted[sig.pick("logits_soft_cap", "softcap") or "softcap"] = case.softcap
        paged = case.entry == "varlen" and bool(case.paged_block_size)
        if paged:
            wanted["block_table"] = inputs.block_table
        kw = {k: v for k, v in wanted.items() if sig.accepts(k)}
        fa = self._module
        if case.entry == "varlen":
            k = inputs.k_pages if paged else inputs.k
            v = inputs.v_pages if paged else inputs.v
            result = fa.flash_attn_varlen_func(inputs.q, k, v, inputs.cu_seqlens_q,
                                               inputs.cu_seqlens_k, case.seqlen_q, case.seqlen_k,
                                               **kw)
        else:
            result = fa.flash_attn_func(inputs.q, inputs.k, inputs.v, **kw)
        # aiter/ops/mha.py: [out] + [softmax_lse if return_lse]; returned as a tuple, or (in
        # some versions) as the bare out when that is all.
        name = self.entry_functions["varlen" if case.entry == "varlen" else "dense"]
        out, lse = take_return(result, name, *(("(out, softmax_lse)",) if kw.get("return_lse")
                                               else ("out", "(out,)")))
        if lse is not None and case.entry == "varlen":
            lse = varlen_lse_layout(lse, case)
        return Outputs(out=out, lse=lse)


    def _fp8_call(self, inputs):
        """The fp8 entry: q, k, v and their descales positionally (``(1,)`` per tensor, or
        ``(batch, heads_kv)`` per head as the ASM v3 path takes them), only the output back."""
        case = inputs.case
        func = self._fp8(case.entry)
        sig = Signature.of(func)
        descales = [getattr(inputs, f"{n}_descale") for n in "qkv"]
        if case.fp8_recipe != "per-head":  # one scale per tensor: every entry is the same
            descales = [d.reshape(-1)[:1] for d in descales]
        kw: dict[str, Any] = {"causal": case.causal, "softmax_scale": case.scale,
                              "window_size": window_argument(
                                  case.window, sig.defaults.get("window_size"), case.sink_tokens)}
        if case.learnable_sink:
            kw["sink_ptr"] = inputs_value(inputs, "learnable_sink")
        if case.entry == "varlen":
            if case.softcap:
                kw["logits_soft_cap"] = case.softcap
            return func(inputs.q, inputs.k, inputs.v, *descales, inputs.cu_seqlens_q,
                        inputs.cu_seqlens_k, case.seqlen_q, case.seqlen_k, **kw)
        return func(inputs.q, inputs.k, inputs.v, *descales, **kw)


def installed_reasons(case: Case, environ) -> list[str]:
    """What the installed AITER does not do for ``case`` although its API takes it: the fp8
    output dtype of the path ``ENABLE_CK`` selects, per-tensor fp8 scales on the CK path, and
    the sinks the ASM v3 and Triton paths drop."""
    out = []
    triton = environ.get("ENABLE_CK", "1").strip() == "0"  # aiter/jit/core.py l.31
    if case.dtype in FP8:
        triton_path = triton and not case.learnable_sink
        made = "float32" if triton_path else "bfloat16"
        if case.fp8_out != made:
            path = ("the Triton path (ENABLE_CK=0, no sink_ptr: interface_v3.py l.219-220)"
                    if triton_path else "the CK/ASM path (\"For FP8 input, output must have "
                    "dtype BF16 for now\", csrc/py_itfs_ck/mha_fwd_kernels.cu l.217-221)")
            out.append(f"fp8_out={case.fp8_out}: AITER's fp8 entry returns {made} on {path}")
        if case.fp8_recipe == "per-head" and not triton_path:
            out.append("fp8_recipe=per-head: the CK fp8 path reads one descale per tensor (zero "
                       f"batch and head strides, csrc/py_itfs_ck/mha_fwd_kernels.cu l.155-167 @ "
                       f"{SOURCE})")
        if triton_path and case.sink_tokens:
            out.append("sink tokens on the fp8 Triton path: flash_attn_fp8_pertensor_func passes "
                       f"window_size[:2] only, dropping the sink element (mha.py l.3986 @ "
                       f"{SOURCE})")
    v3 = (case.entry == "dense" and (case.head_dim, case.dv) in _V3_DIMS
          and case.dtype in ("bfloat16", *FP8) and not case.alibi and not case.dropout_p
          and case.mask_window[0] < 0 and case.mask_window[1] in (-1, 0) and not case.sink_tokens)
    if case.learnable_sink and v3:
        out.append(_SINK_DROPPED)
    return out


def _dist_version() -> str:
    for dist in ("amd-aiter", "aiter"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


def machine_facts() -> dict[str, str]:
    """AITER's version when installed, without importing it (its import JIT-builds kernels)."""
    version = _dist_version()
    return {"aiter": version} if version else {}
