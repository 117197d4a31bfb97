"""FlashAttention-4 (``flash_attn.cute``, PyPI ``flash-attn-4``) as a family, ``flash-attn4``.

Every fact here was read in ``flash_attn/cute/interface.py`` at Dao-AILab/flash-attention
``0251105a`` (``git describe``: ``fa4-v4.0.0.beta27``, 2026-08-15); line numbers refer to it.

Call convention:

* ``flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
  window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
  deterministic=False, ..., return_lse=False)`` (l.3371) and ``flash_attn_varlen_func(q, k, v,
  qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
  min_seqlen_k=None, seqused_q=None, seqused_k=None, gather_kv_indices=None, page_table=None,
  ...)`` (l.3419): ``qv`` is the fourth positional parameter, so everything after ``v`` is
  passed by name.
* The window (``_resolve_causal_local_window``, l.388): ``None`` is an unbounded side and other
  integers are taken literally; ``causal=True`` sets the right side to 0; a pair with ``left +
  right < 0`` becomes ``(None, None)``, unbounded. So flash-attn 2's ``(-1, 0)`` means *full*
  attention here, not causal (facts.md's "(-1, 0) is an empty band, PR #2490" does not hold at
  this version), and ``(-1, 5)`` a literal band ``diag + 1 <= j <= diag + 5``: the adapter
  writes every unbounded side as ``None`` (:func:`window_argument`). Causal and local masks are
  bottom-right aligned on each sequence's own lengths (``seqused_k`` when given; mask.py).
* Both functions always return ``(out, lse)``; ``lse`` is None unless ``return_lse=True`` (or
  an input requires grad), float32, natural log, ``(batch, heads, seqlen_q)`` or ``(heads,
  total_q)``; with ``qv`` (absorbed MLA) heads last, ``(batch, seqlen_q, heads)`` or ``(total_q,
  heads)`` (l.703-708). A row that sees no key gives 0 and ``-inf``, or the sink's value.
* ``learnable_sink`` ``(heads_q,)``: a logit in natural-log units of the scaled score, in the
  denominator and the lse only (the harness's ``learnable_sink``; under split-KV only the first
  split adds it).
* FA4 has no ``flash_attn_with_kvcache``: a kv-cache read is ``flash_attn_varlen_func`` with a
  dense ``q`` (``cu_seqlens_q=None``, the docstring's ``(batch, seqlen_q, nheads, d)``), the
  cache as ``k``/``v`` (or its pages with ``page_table``) and ``seqused_k = cache_seqlens``.
  Appends, rotary, ``cache_leftpad`` and ``cache_batch_idx`` do not exist.
* Paged KV: ``page_table`` int32 ``(batch, pages)``, not with ``cu_seqlens_k`` ("page_table is
  not supported with cu_seqlens_k", l.601), lengths from ``seqused_k`` (without it every
  sequence is the whole table long, l.607).
* Absorbed MLA (``latent-kv`` with head dims 576/512, DeepSeek's decode): ``q`` is the rope part
  ``q[..., 512:]``, ``qv`` the latent part ``q[..., :512]``, ``k`` the rope part of the cache and
  ``v`` the latent (``O = softmax(scale (Q K^T + Qv V^T)) V``, the varlen docstring); the scale is
  passed explicitly (FA4's default with ``qv`` is ``1/sqrt(64 + 512)``, l.687).
* fp8 (``float8_e4m3fn``, ``float8_e5m2``; SM100 only) needs descales, which only the internal
  ``_flash_attn_fwd(..., q_descale, k_descale, v_descale)`` takes, ``(batch, heads_kv)`` float32
  (l.521, l.749); the output is bfloat16 (l.700). q, k and v share one dtype ("q, k, v, and qv
  must have the same dtype", l.641): no fp8 KV cache under 16-bit queries.
* Padding it reads: FA4 loads whole 128-key tiles, so rows past ``seqused_k`` in the last tile
  (the last page's tail, a dense cache's tail, a padded varlen slot's tail) enter ``P V`` as
  ``0 * x``: they must be finite (open issue Dao-AILab/flash-attention #2374, "FA3/4 does not
  guard against NaN in unused V cache entries"). Pages the table never names may hold anything.

Capabilities depend on the architecture (:data:`ARCH_CAPABILITIES`): the flavor is ``sm80``
(compute capability 8.x), ``sm90``, ``sm100``, ``sm110`` or ``sm120``, read as FA4 reads it
(``FLASH_ATTENTION_ARCH``, else the device, l.92-108), or ``module`` for ``flash-attn4@TARGET``
(what the API can express; ``ATTN_HARNESS_FLAVOR`` may name an architecture to imitate).

Version: ``flash_attn.cute.__version__`` reads the distribution ``fa4`` and shows ``0.0.0`` for a
``flash-attn-4`` install (``flash_attn/cute/__init__.py``); the version is read from the
``flash-attn-4`` distribution instead.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from typing import Any

from harness.backends.base import DEFAULT_FEATURES, Capabilities
from harness.backends.module import (
    FLAVOR_ATTR,
    Convention,
    ModuleBackend,
    import_default,
    inputs_value,
    take_return,
)
from harness.case import Case
from harness.errors import UsageError

#: Where the facts of this module were read.
SOURCE = "flash_attn/cute/interface.py @ 0251105a (fa4-v4.0.0.beta27)"
#: The PyPI distribution (``flash_attn.cute.__version__`` asks for "fa4" and reads 0.0.0).
DISTRIBUTION = "flash-attn-4"

CONVENTION = Convention(
    layout="bshd (varlen: thd + cu_seqlens int32; kv-cache: dense q, seqused_k)",
    causal="bottom-right",
    lse_base="e",
    lse_layout="(batch, heads_q, seqlen_q); varlen (heads_q, total_q); with qv heads last",
    lse_empty_rows="-inf",
    returns="always (out, lse); lse None unless return_lse=True",
    source="Dao-AILab/flash-attention " + SOURCE,
)

FP16 = frozenset({"float16", "bfloat16"})
FP8 = frozenset({"float8_e4m3fn", "float8_e5m2"})
#: What every architecture's forward takes through these functions: the flash-attn layouts and
#: masks less what the API has no argument for (dropout, ALiBi, kv-cache appends, rotary,
#: leftpad, cache_batch_idx, sink tokens, an fp8 cache under 16-bit queries).
_NO = {"dropout", "alibi", "alibi-per-batch", "append", "rotary", "leftpad", "batch-idx",
       "sink-tokens", "fp8-kv"}
BASE_FEATURES = (frozenset(DEFAULT_FEATURES) - _NO) | {"mla", "latent-kv", "sink", "padded"}

_NOTES = {
    "dropout": f"FA4 has no dropout (flash_attn_func takes no dropout_p: {SOURCE} l.3371)",
    "alibi": "FA4 takes no alibi_slopes (ALiBi only as a user score_mod)",
    "alibi-per-batch": "FA4 takes no alibi_slopes (ALiBi only as a user score_mod)",
    "append": "FA4 has no flash_attn_with_kvcache: no appends (k=, v=)",
    "rotary": "FA4 has no flash_attn_with_kvcache: no rotary embedding of appended keys",
    "leftpad": "FA4 has no flash_attn_with_kvcache: no cache_leftpad",
    "batch-idx": "FA4 has no flash_attn_with_kvcache: no cache_batch_idx",
    "sink-tokens": "flash_attn.cute's interface takes no sink_token_length (only its testing "
                   "reference construct_local_mask does)",
    "fp8-kv": f"FA4 takes q, k and v of one dtype: \"q, k, v, and qv must have the same dtype\" "
              f"({SOURCE} l.641): no fp8 KV cache under 16-bit queries",
    "dtype:float32": f"\"inputs must be float16, bfloat16, fp8 e4m3fn, or fp8 e5m2\" ({SOURCE} "
                     "l.637)",
    "dtype:float8_e4m3fnuz": f"\"inputs must be float16, bfloat16, fp8 e4m3fn, or fp8 e5m2\" "
                             f"({SOURCE} l.637)",
}
_FP8_SM100 = (f"\"FP8 is only supported on SM100 (compute capability 10.x) for FA4 CuTe.\" "
              f"({SOURCE} l.765)")
_PAGED_SM80 = f"\"paged KV not supported on SM 8.0\" ({SOURCE} l.1246)"
_PAGED_SM120 = f"\"Paged KV not supported on SM 12.0 in this PR\" ({SOURCE} l.1364)"
_SINK_SM80 = ("\"Learnable sink is not supported in this kernel\" (flash_attn/cute/flash_fwd.py "
              "l.651 @ 0251105a; FlashAttentionForwardSm120 subclasses the SM80 kernel)")
_SPLIT = {"sm80": f"\"SplitKV not supported on SM 8.0\" ({SOURCE} l.1247)",
          "sm90": f"\"SplitKV not supported on SM 9.0\" ({SOURCE} l.1266)",
          "sm120": f"\"SM120 forward only supports num_splits=1\" ({SOURCE} l.368)"}
_BWD_SM80 = ("FA4's backward is claimed for SM90 and newer (facts.md); the SM80/SM120 backward "
             "classes exist at 0251105a but were never run here")
_MLA_UNCHECKED = (f"FA4 skips _validate_head_dims on SM80/SM120 ({SOURCE} l.684) and no run has "
                  "shown those kernels' head_dim_v != head_dim path")
_LATENT_QV = ("FA4 takes DeepSeek's absorbed decode (576/512) through qv only, which needs SM100 "
              f"or SM110 (\"only support Blackwell arch with qv\", {SOURCE} l.912)")

#: (head_dim, head_dim_v) pairs each architecture accepts, as inclusive ranges
#: ((qk_lo, qk_hi), (v_lo, v_hi)); dims must also be multiples of 16 // element size (8 for
#: 16-bit, 16 for fp8). ``_validate_head_dims`` (l.112-130): SM90 both in [8, 256]; SM100/SM110
#: both in [8, 128], or (192, 128) (DeepSeek prefill), or (256, 256) (the 2-CTA kernel), or
#: head_dim_v 512 with head_dim 64 or 512 (the absorbed MLA decode through qv: here (576, 512),
#: the latent-kv layout). SM80/SM120 are not checked by the interface; the kernels take equal
#: dims up to 256 in multiples of 8 (``can_implement``).
HEAD_DIM_PAIRS = {
    "sm80": (((8, 256), (8, 256)),),
    "sm90": (((8, 256), (8, 256)),),
    "sm100": (((8, 128), (8, 128)), ((192, 192), (128, 128)), ((256, 256), (256, 256)),
              ((576, 576), (512, 512))),
}
HEAD_DIM_PAIRS["sm110"] = HEAD_DIM_PAIRS["sm100"]
HEAD_DIM_PAIRS["sm120"] = HEAD_DIM_PAIRS["sm80"]
#: flash-attn4@TARGET: what some architecture takes (SM90's range and SM100's absorbed decode).
HEAD_DIM_PAIRS["module"] = (((8, 256), (8, 256)), ((576, 576), (512, 512)))

#: Paged, sink and split-KV support per architecture (l.1246, l.1266, l.1364, flash_fwd.py l.651).
_ARCH_FEATURES = {
    "sm80": BASE_FEATURES - {"paged", "sink", "splits", "mla"},
    "sm90": BASE_FEATURES - {"splits"},
    "sm100": BASE_FEATURES,
    "sm110": BASE_FEATURES,
    "sm120": BASE_FEATURES - {"paged", "sink", "splits", "mla"},
    "module": BASE_FEATURES,
}
_ARCH_NOTES = {
    "sm80": {"paged": _PAGED_SM80, "sink": _SINK_SM80, "splits": _SPLIT["sm80"],
             "mla": _MLA_UNCHECKED, "backward": _BWD_SM80},
    "sm90": {"splits": _SPLIT["sm90"]},
    "sm100": {},
    "sm110": {"dtype:float8_e4m3fn": _FP8_SM100, "dtype:float8_e5m2": _FP8_SM100},
    "sm120": {"paged": _PAGED_SM120, "sink": _SINK_SM80, "splits": _SPLIT["sm120"],
              "mla": _MLA_UNCHECKED, "backward": _BWD_SM80},
    "module": {},
}
#: What FA4 requires to be finite although no sequence owns it (Dao-AILab #2374; see the module
#: docstring): the tail of the last page, of a dense cache row and of a padded varlen slot.
FINITE_PADDING = frozenset({"page-tail", "cache-tail", "varlen-gap"})


def _capabilities(flavor: str) -> Capabilities:
    dtypes = FP16 | (FP8 if flavor in ("sm100", "module") else frozenset())
    notes = {**_NOTES, **_ARCH_NOTES[flavor]}
    if flavor in ("sm80", "sm90", "sm120"):
        notes.update({f"dtype:{d}": _FP8_SM100 for d in FP8})
    pairs = HEAD_DIM_PAIRS[flavor]
    return Capabilities(
        dtypes=dtypes, head_dim_max=max(hi for (_, hi), _ in pairs), head_dim_multiple=8,
        features=_ARCH_FEATURES[flavor], entries=frozenset({"dense", "varlen", "kvcache"}),
        backward=flavor not in ("sm80", "sm120"), returns_lse=True,
        deterministic_backward=True, notes=notes,
        head_dims_v=pairs,
        finite_padding=FINITE_PADDING,
    )


#: Capabilities per architecture (``flash-attn4`` on that device) and for module targets.
ARCH_CAPABILITIES: dict[str, Capabilities] = {
    name: _capabilities(name) for name in ("sm80", "sm90", "sm100", "sm110", "sm120", "module")}

#: case feature -> the keyword(s) that express it (a module function without them is not asked).
FEATURE_KEYWORDS = {
    "scale": {"*": ("softmax_scale",)},
    "causal": {"*": ("causal",)},
    "window": {"*": ("window_size",)},
    "softcap": {"*": ("softcap",)},
    "sink": {"*": ("learnable_sink",)},
    "splits": {"*": ("num_splits",)},
    "paged": {"varlen": ("page_table",), "kvcache": ("page_table",)},
    "padded": {"varlen": ("seqused_q",)},
}


def arch_flavor(capability: int) -> str:
    """The flavor of a compute capability ``major * 10 + minor`` (FA4 dispatches on
    ``arch // 10``, l.681): sm80, sm90, sm100, sm110, sm120; '' for what FA4 does not run on."""
    return {8: "sm80", 9: "sm90", 10: "sm100", 11: "sm110", 12: "sm120"}.get(capability // 10, "")


def detect_arch(environ=os.environ) -> int:
    """The compute capability as FA4 reads it (``_get_device_arch``, l.92-108): the
    ``FLASH_ATTENTION_ARCH`` override (``sm_90a``, ``90``, ``100``), else the current device's;
    0 without a CUDA device."""
    override = environ.get("FLASH_ATTENTION_ARCH")
    if override:
        match = re.fullmatch(r"(?:sm_?)?(\d+)[a-z]?", override.strip())
        if match:
            return int(match.group(1))
    import torch

    if not torch.cuda.is_available() or getattr(torch.version, "hip", None):
        return 0
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def window_argument(case: Case) -> tuple[bool, tuple[int | None, int | None]]:
    """``(causal, window_size)`` for FA4: the harness's window (``Case.mask_window``, -1 =
    unbounded) with every unbounded side ``None``, causal passed as ``causal=True`` (which sets
    the right side to 0). A -1 passed through would be a literal bound, or with ``left + right <
    0`` make the whole window unbounded (``_resolve_causal_local_window``, l.388)."""
    left, right = case.mask_window
    causal = right == 0 and (case.causal or left < 0)
    if causal:
        right = -1
    return causal, (None if left < 0 else left, None if right < 0 else right)


def uses_qv(case: Case) -> bool:
    """Whether the case goes through FA4's absorbed-MLA form (``qv``): DeepSeek's decode, v the
    first 512 dims of k (``latent-kv``) and a 64-dim rope part."""
    return case.layout == "latent-kv" and case.dv == 512 and case.head_dim == 512 + 64


#: What FA4 refuses with qv (l.911-927): (feature, the assertion's words, line).
_QV_LIMITS = (("window", "local not yet supported with qv", "l.917"),
              ("splits", "split kv not supported with qv", "l.923"),
              ("sink", "assert learnable_sink is None", "l.924"),
              ("softcap", "assert softcap is None", "l.925"))


def combination_reasons(case: Case, flavor: str) -> list[str]:
    """The refusals of combinations FA4's interface asserts, in its words (an AssertionError
    at run time), for ``flavor``'s architecture."""
    out = []
    d, dv = case.head_dim, case.dv
    align = 16 if case.dtype in FP8 else 8
    if dv % align:
        out.append(f"head_dim_v={dv} is not a multiple of {align} (FA4 aligns both head dims to "
                   f"16 bytes, {SOURCE} l.683)")
    if case.dtype in FP8 and d % align:
        out.append(f"head_dim={d} is not a multiple of 16 for fp8 ({SOURCE} l.683)")
    if flavor in ("sm100", "sm110", "module") and d == 256 == dv:
        for feature, words in (("softcap", "softcap"), ("sink", "learnable_sink")):
            if feature in case.features:
                out.append(f"\"SM100 forward with head_dim=256 does not support {words}\" "
                           f"({SOURCE} l.1311)")
        if case.entry == "kvcache" or case.layout == "padded" or (
                case.entry == "varlen" and case.paged_block_size):
            out.append(f"\"SM100 forward with head_dim=256 does not support seqused_q/seqused_k\" "
                       f"({SOURCE} l.1315)")
    if d == 576 and dv == 512 and not uses_qv(case):
        out.append("head dims (576, 512) are DeepSeek's absorbed decode, which FA4 takes "
                   "through qv with v the first 512 dims of k: use layout = 'latent-kv'")
    if uses_qv(case):
        if flavor not in ("sm100", "sm110", "module"):
            out.append(_LATENT_QV)
        for feature, words, line in _QV_LIMITS:
            if feature in case.features:
                out.append(f"{feature} with qv (absorbed MLA): \"{words}\" ({SOURCE} {line})")
        if case.dtype in FP8:
            out.append(f"\"q_descale/k_descale/v_descale are not yet supported with qv\" "
                       f"({SOURCE} l.918)")
    if case.dtype in FP8 and case.fp8_out != "bfloat16":
        out.append(f"fp8_out={case.fp8_out}: FA4 returns bfloat16 for fp8 inputs ({SOURCE} "
                   "l.700)")
    return out


class FlashAttn4Backend(ModuleBackend):
    """flash_attn.cute's flash_attn_func and flash_attn_varlen_func (and ``_flash_attn_fwd``
    for fp8 descales)."""

    family = "flash-attn4"
    default_module = "flash_attn.cute"
    device_types = ("cuda",)
    entry_functions = {"dense": "flash_attn_func", "varlen": "flash_attn_varlen_func",
                       "kvcache": "flash_attn_varlen_func"}
    feature_keywords = FEATURE_KEYWORDS
    convention = CONVENTION

    def __init__(self, module: Any = None, target: str | None = None,
                 flavor: str | None = None) -> None:
        if flavor is not None and flavor not in ARCH_CAPABILITIES:
            raise UsageError(f"flash-attn4 flavor {flavor!r} is unknown "
                             f"(known: {', '.join(ARCH_CAPABILITIES)})")
        error = ""
        if module is None and target is None:
            module, error = import_default(self.default_module)
        if flavor is None and target is not None:
            declared = getattr(module, FLAVOR_ATTR, None)
            flavor = declared if declared in ARCH_CAPABILITIES else "module"
        if flavor is None:
            flavor = arch_flavor(detect_arch()) or "module"
        super().__init__(module, target, base=ARCH_CAPABILITIES[flavor], import_error=error)
        self.flavor = flavor if module is not None else ""
        self._rules = flavor
        if module is not None and target is None:
            self.version = distribution_version() or self.version

    def unavailable_reason(self) -> str:
        if "No module named 'flash_attn'" in self._error:
            return (f"flash-attn4 is not installed (PyPI {DISTRIBUTION}, import flash_attn.cute; "
                    "NVIDIA sm80 and newer)")
        return f"import flash_attn.cute failed: {self._error}"

    def availability(self) -> str | None:
        import torch

        reason = super().availability()
        if reason is None and self.target is None:
            if getattr(torch.version, "hip", None):
                return "flash-attn4 has no AMD port (CuTe DSL kernels for NVIDIA GPUs)"
            if not torch.cuda.is_available():
                return "no GPU here: flash-attn4 runs on NVIDIA GPUs (sm80 to sm12x)"
        return reason

    def call_reasons(self, case: Case, target) -> list[str]:
        reasons = super().call_reasons(case, target)
        if case.dtype in FP8 and self._module is not None \
                and not callable(getattr(self._module, "_flash_attn_fwd", None)):
            reasons.append(f"{self.name} has no _flash_attn_fwd, the only FA4 function that "
                           "takes fp8 descales")
        return reasons

    def unsupported_reasons(self, case: Case, target) -> list[str]:
        reasons = super().unsupported_reasons(case, target)
        if target.vendor == "nvidia" and self.target is None:
            match = re.match(r"sm_(\d+)", target.arch)
            if match and not arch_flavor(int(match.group(1))):
                reasons.insert(0, f"{target.arch} is not an FA4 architecture: \"Unsupported "
                                  f"compute capability. Supported: 8.x, 9.x, 10.x, 11.x, 12.x\" "
                                  f"({SOURCE} l.681)")
        reasons += self._head_dim_reasons(case) + combination_reasons(case, self._rules)
        return list(dict.fromkeys(reasons))

    def _head_dim_reasons(self, case: Case) -> list[str]:
        """Equal head dims outside the architecture's pairs (different ones are
        ``Capabilities.head_dims_v``'s)."""
        d = case.head_dim
        if case.dv != d:
            return []
        pairs = HEAD_DIM_PAIRS[self._rules]
        if any(lo <= d <= hi and vlo <= d <= vhi for (lo, hi), (vlo, vhi) in pairs):
            return []
        return [f"head_dim={d} (with head_dim_v={d}) is not taken on {self._rules}: "
                f"_validate_head_dims ({SOURCE} l.112-130) accepts "
                + ", ".join(f"q/k {lo}-{hi} with v {vlo}-{vhi}" for (lo, hi), (vlo, vhi) in pairs)]

    # ------------------------------------------------------------------------------ calling

    def forward(self, inputs, *, deterministic: bool = True):
        from harness.exact.inputs import effective_scale
        from harness.exact.outputs import Outputs

        case = inputs.case
        causal, window = window_argument(case)
        kw: dict[str, Any] = {"softmax_scale": case.scale, "causal": causal,
                              "window_size": window, "softcap": case.softcap,
                              "return_lse": True}
        if case.learnable_sink:
            kw["learnable_sink"] = inputs_value(inputs, "learnable_sink")
        if case.num_splits:
            kw["num_splits"] = case.num_splits
        q, k, v = inputs.q, inputs.k, inputs.v
        paged = bool(case.paged_block_size) and case.entry != "dense"
        if paged:
            k, v = inputs_value(inputs, "k_pages"), inputs_value(inputs, "v_pages")
        qv = uses_qv(case)
        if qv:  # DeepSeek's absorbed decode: q = [q_nope (512) ; q_pe (64)], v = k[..., :512]
            dv = case.dv
            kw["qv"], q, k = q[..., :dv], q[..., dv:], k[..., dv:]
            kw["softmax_scale"] = effective_scale(case)
        lengths: dict[str, Any] = {}
        if case.entry == "varlen":
            lengths = {"cu_seqlens_q": inputs.cu_seqlens_q, "max_seqlen_q": case.seqlen_q}
            if paged:
                lengths.update(seqused_k=inputs.seqused_k, page_table=inputs.block_table)
            else:
                lengths.update(cu_seqlens_k=inputs.cu_seqlens_k, max_seqlen_k=case.seqlen_k)
            if case.layout == "padded":
                lengths.update(seqused_q=inputs.seqused_q, seqused_k=inputs.seqused_k)
        elif case.entry == "kvcache":  # the cache read through a dense q and seqused_k
            lengths = {"seqused_k": inputs.cache_seqlens}
            if paged:
                lengths["page_table"] = inputs.block_table
        fa = self._module
        if case.dtype in FP8:
            result = self._fp8(q, k, v, inputs, kw, lengths)
        elif case.entry == "dense":
            result = fa.flash_attn_func(q, k, v, deterministic=deterministic, **kw)
        else:
            result = fa.flash_attn_varlen_func(q, k, v, deterministic=deterministic,
                                               **lengths, **kw)
        # (out, lse) from both functions; _flash_attn_fwd returns more after them
        name = ("_flash_attn_fwd" if case.dtype in FP8 else
                "flash_attn_func" if case.entry == "dense" else "flash_attn_varlen_func")
        out, lse = take_return(result, name, "(out, lse, ...)" if case.dtype in FP8
                               else "(out, lse)")
        if lse is not None and qv:  # heads last with qv (l.707): back to the usual layout
            lse = lse.permute(0, 2, 1) if lse.dim() == 3 else lse.t()
        return Outputs(out=out, lse=lse)

    def _fp8(self, q, k, v, inputs, kw: dict[str, Any], lengths: dict[str, Any]):
        """fp8 through ``_flash_attn_fwd``, the only function that takes descales (l.521):
        windows as two integers-or-None, descales ``(batch, heads_kv)`` float32."""
        left, right = kw.pop("window_size")
        kw.pop("return_lse")
        return self._module._flash_attn_fwd(
            q, k, v, window_size_left=left, window_size_right=right, return_lse=True,
            q_descale=inputs.q_descale, k_descale=inputs.k_descale,
            v_descale=inputs.v_descale, **lengths, **kw)


def distribution_version() -> str:
    """The installed ``flash-attn-4`` version ('' when not installed), without importing it."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return ""


def machine_facts() -> dict[str, str]:
    """FA4's version when installed (distribution ``flash-attn-4``), without importing it."""
    version = distribution_version()
    return {"flash_attn_4": version} if version else {}
