"""AITER's flash-attention API (``aiter.flash_attn_func`` / ``aiter.flash_attn_varlen_func``).

Call convention (ROCm/aiter ``aiter/ops/mha.py``): flash-attn 2's layouts and bottom-right masks,
with three differences the adapter translates: ``window_size`` is a 3-tuple ``(left, right,
sink)`` in current AITER (the sink is 0 here: the harness has no sink tokens); ``deterministic``
defaults to True (the harness passes it explicitly); the lse comes back only with
``return_lse=True`` and the result is always a tuple (``(out,)`` without it, in the 2024 API).
Softcap is ``logits_soft_cap`` in the varlen function of current AITER; varlen takes
``block_table`` for a paged KV cache. Targets: gfx942 (MI300X, MI325X) and gfx950 (MI350X,
MI355X).
"""

from __future__ import annotations

from typing import Any

from harness.backends.base import DEFAULT_FEATURES, Capabilities
from harness.backends.module import (
    Convention,
    ModuleBackend,
    import_default,
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

FLAVOR_CAPABILITIES: dict[str, Capabilities] = {
    # aiter/ops/mha.py: fp16/bf16 (mha_fwd_fp16_*/bf16_* entry points), ALiBi, dropout, the
    # varlen block_table; no kv-cache function of flash-attn's shape. head_dim <= 256 (CK fmha
    # instances go up to hdim 256).
    "rocm": Capabilities(
        dtypes=frozenset({"float16", "bfloat16"}), head_dim_max=256, features=ALL,
        entries=frozenset({"dense", "varlen"}), returns_lse=True,
        notes={"entry:kvcache": "aiter has no flash_attn_with_kvcache"},
    ),
    "module": Capabilities(
        dtypes=frozenset({"float16", "bfloat16", "float32"}), features=ALL,
        entries=frozenset({"dense", "varlen"}), returns_lse=True,
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
}


def window_argument(window: tuple[int, int], default: Any) -> tuple[int, ...]:
    """The window as AITER takes it: ``(left, right, 0)`` when the function's default has three
    items (the sink count), else ``(left, right)``."""
    if isinstance(default, (tuple, list)) and len(default) == 3:
        return (window[0], window[1], 0)
    return tuple(window)


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
        return list(dict.fromkeys(reasons))

    def forward(self, inputs, *, deterministic: bool = True):
        from harness.exact.outputs import Outputs

        case = inputs.case
        sig = self.signature(case.entry)
        wanted: dict[str, Any] = {
            "dropout_p": case.dropout_p,
            "softmax_scale": case.scale,
            "causal": case.causal,
            "window_size": window_argument(case.window, sig.defaults.get("window_size")),
            "alibi_slopes": inputs.alibi_slopes,
            "deterministic": deterministic,
            "return_lse": case.dropout_p == 0,
        }
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
            from harness.backends.flash_attn import varlen_lse_layout

            lse = varlen_lse_layout(lse, case)
        return Outputs(out=out, lse=lse)


def _dist_version() -> str:
    from importlib import metadata

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
