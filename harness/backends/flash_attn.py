"""flash-attn 2.x through its public API, in whichever flavor is installed or from any module.

Flavors (detected at run time, see :func:`detect_flavor`):

* ``cuda``: the Dao-AILab build (``flash_attn_2_cuda``), NVIDIA sm80 and newer.
* ``rocm-ck``: the ROCm fork's Composable Kernel build, MI200/MI300 (gfx90a, gfx942, gfx950).
* ``rocm-triton``: the in-tree Triton backend (``flash_attn/flash_attn_triton_amd``, flash-attn
  2.7/2.8 and the ROCm fork), selected with ``FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE``; pure
  Python, AMD GPUs (on NVIDIA its 2.8.3 kernels fail at launch, see :data:`ARCH_RULES`).
* ``rocm-triton-aiter``: current upstream's Triton backend, which is AITER's
  (``aiter.ops.triton._triton_kernels.flash_attn_triton_amd``, Dao-AILab PR #2230). On HIP it is
  also the automatic fallback when ``flash_attn_2_cuda`` is missing (PR #2343), with or without
  the environment switch.
* ``module``: ``flash-attn@TARGET``, any module implementing the API (see
  :mod:`harness.backends.module`); it may declare another flavor with ``ATTN_HARNESS_FLAVOR``.

Capabilities per flavor are data (:data:`FLAVOR_CAPABILITIES`), each limit with its source.

Call convention (:data:`CONVENTION`): ``(batch, seqlen, heads, head_dim)`` tensors, varlen packs
tokens ``(total, heads, head_dim)`` with int32 ``cu_seqlens``; causal and local masks aligned to the
bottom-right corner; lse in natural log, ``(batch, heads_q, seqlen_q)`` (varlen ``(heads_q,
total_q)``), ``+inf`` for rows that see no key (``csrc/flash_attn/src/softmax.h``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.backends.base import DEFAULT_FEATURES, Capabilities
from harness.backends.module import (
    FLAVOR_ATTR,
    Convention,
    ModuleBackend,
    Signature,
    case_value,
    inputs_value,
    same_storage,
    take_return,
)
from harness.case import Case
from harness.errors import UsageError
from harness.vocab import OPT_IN_FEATURES

#: every feature but lastdim-strided (base.DEFAULT_FEATURES: the API copies such tensors)
ALL = frozenset(DEFAULT_FEATURES)
ENTRIES = frozenset({"dense", "varlen", "kvcache"})
FP16 = frozenset({"float16", "bfloat16"})
FLOATS = frozenset({"float16", "bfloat16", "float32"})

CONVENTION = Convention(
    layout="bshd (varlen: thd + cu_seqlens int32)",
    causal="bottom-right",
    lse_base="e",
    lse_layout="(batch, heads_q, seqlen_q); varlen (heads_q, total_q)",
    lse_empty_rows="+inf",
    returns="out, or (out, softmax_lse, S_dmask) with return_attn_probs=True; kv-cache "
            "(out, softmax_lse) with return_softmax_lse=True",
    source="Dao-AILab/flash-attention flash_attn/flash_attn_interface.py (2.8)",
)

_TRITON_LIMITS = {
    "window": "window_size is accepted but not passed to the kernels by rocm-triton "
              "(flash_attn_triton_amd, 2.7/2.8)",
    "softcap": "softcap is accepted but not passed to the kernels by rocm-triton "
               "(flash_attn_triton_amd, 2.7/2.8)",
    "paged": "block_table is accepted but not passed to the kernels by rocm-triton "
             "(flash_attn_triton_amd, 2.7/2.8)",
    "deterministic_backward": "rocm-triton accepts deterministic but does not pass it "
                              "to the kernels (flash_attn_triton_amd, 2.7/2.8)",
}

#: Combinations the CUDA original refuses, in its own words (TORCH_CHECKs, so a RuntimeError:
#: csrc/flash_attn/flash_api.cpp @ v2.8.3, mha_fwd l.397 and mha_fwd_kvcache l.1247, l.1396).
#: A module imitating flash-attn is asked the same (``--audit`` still runs them).
CUDA_EXCLUSIVE = (("softcap", "dropout"), ("paged", "batch-idx"), ("paged", "leftpad"))
CUDA_REFUSALS = {
    "softcap+dropout": "\"Softcapping does not support dropout for now\" (flash-attn "
                       "csrc/flash_attn/flash_api.cpp v2.8.3, mha_fwd l.397)",
    "paged+batch-idx": "\"Paged KVcache does not support cache_batch_idx\" (flash-attn "
                       "csrc/flash_attn/flash_api.cpp v2.8.3, mha_fwd_kvcache l.1247)",
    "paged+leftpad": "\"We don't support Paged KV and leftpad_k running at the same time yet\" "
                     "(flash-attn csrc/flash_attn/flash_api.cpp v2.8.3, mha_fwd_kvcache l.1396)",
}
#: The CK build's (ROCm/flash-attention @ b3ae4966, the same in Dao-AILab's csrc/flash_attn_ck):
#: paged with cache_batch_idx refused (mha_fwd_kvcache.cpp l.308), paged varlen with dropout
#: refused (mha_varlen_fwd.cpp); cache_leftpad is a commented-out parameter (l.279), so it is
#: accepted and ignored: not refused with a paged cache as the CUDA build does, not honoured.
CK_EXCLUSIVE = (("paged", "batch-idx"), ("paged", "dropout"))
CK_REFUSALS = {
    "paged+batch-idx": "\"Paged KVcache does not support cache_batch_idx\" (ROCm/flash-attention "
                       "csrc/flash_attn_ck/mha_fwd_kvcache.cpp l.308)",
    "paged+dropout": "\"Paged KV does not support dropout\" (ROCm/flash-attention "
                     "csrc/flash_attn_ck/mha_varlen_fwd.cpp)",
    "leftpad": "cache_leftpad is accepted and silently ignored by rocm-ck (leftpad_k is a "
               "commented-out parameter of mha_fwd_kvcache: csrc/flash_attn_ck/"
               "mha_fwd_kvcache.cpp l.279)",
}
#: AITER's Triton FA2 interface, which current upstream's Triton flavor is
#: (aiter/ops/triton/_triton_kernels/flash_attn_triton_amd/interface_v2.py @ e4048607):
#: fwd_kvcache raises on num_splits > 1 and prints cache_leftpad only under DEBUG (Dao #1788).
AITER_TRITON_REFUSALS = {
    "softcap": "NotImplementedError(\"softcap is not supported in the AMD Triton FA2 interface "
               "(expected 0.0).\") (ROCm/aiter flash_attn_triton_amd/interface_v2.py fwd)",
    "splits": "NotImplementedError(\"num_splits > 1 not supported in AMD Triton FA2 "
              "fwd_kvcache.\") (ROCm/aiter flash_attn_triton_amd/interface_v2.py)",
    "leftpad": "cache_leftpad is accepted and silently ignored by rocm-triton-aiter (fwd_kvcache "
               "only prints it under DEBUG: ROCm/aiter flash_attn_triton_amd/interface_v2.py; "
               "Dao-AILab/flash-attention #1788)",
}

#: Issue 26's problems in flash-attn 2: refused by every build (v2.8.3), each with its source.
ISSUE26_NOTES = {
    "mla": "flash-attn 2 takes one head dim for q, k and v: csrc/flash_attn/flash_api.cpp "
           "(v2.8.3) CHECK_SHAPE(v, batch_size, seqlen_k, num_heads_k, head_size), CK "
           "csrc/flash_attn_ck/mha_fwd.cpp the same (vLLM pads v to the qk head dim for it: "
           "vllm/v1/attention/backends/mla/common.py)",
    "sink": "flash-attn 2's API takes no learnable sink (flash_attn/flash_attn_interface.py "
            "v2.8.3; FA4's flash_attn.cute takes learnable_sink)",
    "sink-tokens": "flash-attn 2's window_size has no sink element (flash_attn_interface.py "
                   "v2.8.3)",
    "fp8-kv": "flash-attn 2 takes fp16/bf16 only, k and v in q's dtype: \"FlashAttention only "
              "support fp16 and bf16 data type\", \"query and key must have the same dtype\" "
              "(csrc/flash_attn/flash_api.cpp v2.8.3)",
    "padded": "flash_attn_varlen_func takes no seqused_q/seqused_k (flash_attn_interface.py "
              "v2.8.3): a padded varlen layout cannot be described to it",
}

#: What each flavor claims, with the public source of every restriction.
FLAVOR_CAPABILITIES: dict[str, Capabilities] = {
    # flash_attn/flash_attn_interface.py and csrc/flash_attn/flash_api.cpp (Dao-AILab 2.8):
    # fp16/bf16, head_dim <= 256, softcap excludes dropout, paged blocks divisible by 256.
    "cuda": Capabilities(
        dtypes=FP16, head_dim_max=256, features=ALL, entries=ENTRIES, paged_block_multiple=256,
        exclusive=CUDA_EXCLUSIVE,  # in the original's words: CUDA_REFUSALS
        returns_lse=True,
        # called with deterministic=True, which flash-attn's own tests hold to bitwise repeats
        deterministic_backward=True, notes={**ISSUE26_NOTES, **CUDA_REFUSALS},
    ),
    # ROCm/flash-attention, csrc/flash_attn_ck/mha_fwd.cpp: the softcap argument is commented
    # out, so it is accepted and ignored, and so is mha_fwd_kvcache's leftpad_k; paged KV needs
    # blocks divisible by 128 (CK_REFUSALS).
    "rocm-ck": Capabilities(
        dtypes=FP16, head_dim_max=256, features=ALL - {"softcap", "leftpad"}, entries=ENTRIES,
        paged_block_multiple=128, exclusive=CK_EXCLUSIVE, returns_lse=True,
        deterministic_backward=True,
        notes={"softcap": "softcap is accepted and silently ignored by rocm-ck "
                          "(csrc/flash_attn_ck/mha_fwd.cpp)", **ISSUE26_NOTES, **CK_REFUSALS},
    ),
    # ROCm/flash-attention, flash_attn/flash_attn_triton_amd (2.7/2.8 era): window_size, softcap,
    # deterministic and block_table are accepted but not passed to the kernels.
    "rocm-triton": Capabilities(
        dtypes=FLOATS, head_dim_max=256,
        features=ALL - {"window", "softcap", "paged"}, entries=ENTRIES, returns_lse=True,
        deterministic_backward=False, notes={**_TRITON_LIMITS, **ISSUE26_NOTES},
    ),
    # Dao-AILab PR #2230 moved the Triton AMD backend to ROCm/aiter
    # (aiter/ops/triton/_triton_kernels/flash_attn_triton_amd). Its limits are carried over from
    # the in-tree backend it was moved from until a run on an AMD GPU measures them (--audit).
    # Read since in AITER's interface_v2.py (AITER_TRITON_REFUSALS): softcap and num_splits > 1
    # raise, cache_leftpad is ignored.
    "rocm-triton-aiter": Capabilities(
        dtypes=FLOATS, head_dim_max=256,
        features=ALL - {"window", "softcap", "paged", "splits", "leftpad"}, entries=ENTRIES,
        returns_lse=True, deterministic_backward=False,
        notes={**{k: v.replace("rocm-triton (flash_attn_triton_amd, 2.7/2.8)",
                               "rocm-triton-aiter (carried over from flash_attn_triton_amd "
                               "2.8; unmeasured)")
                  for k, v in _TRITON_LIMITS.items()}, **ISSUE26_NOTES,
               **AITER_TRITON_REFUSALS},
    ),
    # flash-attn@TARGET: what the API can express (flash_attn_interface.py signatures); the
    # module narrows it with ATTN_HARNESS_CAPABILITIES. Issue 26's problems are posed to a
    # module whose functions take the keywords later releases and forks use for them
    # (FEATURE_KEYWORDS): learnable_sink (FA4), sink_token_length (FA3 before 5458c78e and
    # flash_attn/utils/testing.py), k_descale/v_descale (FA3), seqused_q/seqused_k (FA3, FA4);
    # a head_dim_v of its own and v as a view of k need no keyword. The combinations the
    # original refuses (CUDA_REFUSALS) are not asked of a module either: a real flash-attn
    # given as flash-attn@flash_attn.flash_attn_interface raises there.
    "module": Capabilities(dtypes=FLOATS, head_dim_max=0, features=ALL | set(OPT_IN_FEATURES),
                           entries=ENTRIES, exclusive=CUDA_EXCLUSIVE, returns_lse=True,
                           deterministic_backward=True, notes=dict(CUDA_REFUSALS)),
}


@dataclass(frozen=True)
class ArchRule:
    """Which architectures and runtimes a flavor runs on."""

    archs: tuple[str, ...] = ()  # exact names; empty = any of the vendor's
    min_sm: int = 0  # NVIDIA compute capability * 10
    min_rocm: tuple[int, int] = (0, 0)
    vendors: tuple[str, ...] = ("nvidia", "amd")
    what: str = ""
    #: Why the other vendors are excluded, when there is more to say than the rule.
    why_not_vendor: str = ""
    #: Entry points that do run on the other vendors all the same (their kernels differ).
    other_vendor_entries: tuple[str, ...] = ()


_TRITON_RULE = ArchRule(vendors=("amd",), min_rocm=(6, 0),
                        what="an AMD GPU that Triton supports",
                        why_not_vendor="its prefill kernels pass the AMD-only launch option "
                                       "waves_per_eu, which Triton on NVIDIA rejects "
                                       "(seen with flash-attn 2.8.3, triton 3.6)",
                        other_vendor_entries=("kvcache",))

ARCH_RULES = {
    "cuda": ArchRule(min_sm=80, vendors=("nvidia",), what="Ampere (sm_80) or newer"),
    "rocm-ck": ArchRule(archs=("gfx90a", "gfx942", "gfx950"), min_rocm=(6, 0), vendors=("amd",),
                        what="a CK target (gfx90a, gfx942, gfx950)"),
    # Seen on an H200 (triton 3.6, flash-attn 2.8.3.post2): every dense and varlen kernel launch
    # fails with "Keyword argument waves_per_eu was specified but unrecognised" (an AMD-only
    # launch option); the kv-cache decode kernel launched and computed correctly (--audit).
    "rocm-triton": _TRITON_RULE,
    "rocm-triton-aiter": _TRITON_RULE,
}


#: The environment switch flash-attn reads at import time. flash_attn_interface compares it
#: with the exact string ``"TRUE"`` (``os.getenv(...) == "TRUE"``), so ``true`` or ``1`` do
#: not select the Triton backend and neither may the harness.
TRITON_AMD_ENV = "FLASH_ATTENTION_TRITON_AMD_ENABLE"
#: Where upstream's Triton AMD backend lives since Dao-AILab PR #2230.
AITER_TRITON_MODULE = "aiter.ops.triton._triton_kernels.flash_attn_triton_amd"


def _backend_module_name(module: Any) -> str:
    """The ``__name__`` of the kernel module flash_attn_interface bound (``flash_attn_gpu`` on
    2.7+, ``flash_attn_cuda`` before), or ''."""
    for attr in ("flash_attn_gpu", "flash_attn_cuda"):
        bound = getattr(module, attr, None)
        name = getattr(bound, "__name__", "") if bound is not None else ""
        if name:
            return name
    return ""


def installed_layout(find_spec=importlib.util.find_spec) -> dict[str, bool]:
    """Which flash-attn pieces are installed, without importing flash_attn (or aiter).

    Returns:
        ``flash_attn``: the package is installed; ``cuda_extension``: a ``flash_attn_2_cuda``
        extension exists; ``in_tree_triton``: the
        flash_attn package has its own ``flash_attn_triton_amd``; ``aiter``: AITER is installed.
    """
    def found(name: str) -> Any:
        try:
            return find_spec(name)
        except (ImportError, ValueError):
            return None

    spec = found("flash_attn")
    in_tree = False
    for location in (getattr(spec, "submodule_search_locations", None) or []):
        in_tree = in_tree or (Path(location) / "flash_attn_triton_amd").is_dir()
    return {"flash_attn": spec is not None,
            "cuda_extension": found("flash_attn_2_cuda") is not None,
            "in_tree_triton": in_tree, "aiter": found("aiter") is not None}


def detect_flavor(hip: str, environ: Any = os.environ, module: Any = None,
                  installed: dict[str, bool] | None = None) -> str:
    """cuda, rocm-ck, rocm-triton or rocm-triton-aiter: which build of flash-attn runs here.

    Args:
        hip: ``torch.version.hip`` ('' or None on CUDA and CPU builds of torch).
        environ: the environment flash-attn was (or will be) imported under.
        module: the imported ``flash_attn_interface``, when there is one; the kernel module it
            bound (``flash_attn_gpu``) and its ``USE_TRITON_ROCM`` flag decided the import, so
            they win over ``environ``.
        installed: :func:`installed_layout` (looked up when needed and not given), used without
            a module to predict PR #2343's fallback and PR #2230's AITER backend.
    """
    bound = _backend_module_name(module) if module is not None else ""
    if "aiter" in bound:
        return "rocm-triton-aiter"
    if "triton_amd" in bound:
        return "rocm-triton"
    triton = getattr(module, "USE_TRITON_ROCM", None)
    if module is not None and triton is not None:
        if not triton:
            return "rocm-ck" if hip else "cuda"
    elif module is None:
        triton = environ.get(TRITON_AMD_ENV, "") == "TRUE"
        if hip and not triton:
            installed = installed if installed is not None else installed_layout()
            # PR #2343: on HIP without a compiled extension, flash-attn falls back to Triton
            # (only a prediction for an installed flash-attn: an absent one has no fallback).
            triton = installed.get("flash_attn", True) and not installed.get("cuda_extension",
                                                                            True)
        if triton:
            installed = installed if installed is not None else installed_layout()
            if installed.get("aiter") and not installed.get("in_tree_triton"):
                return "rocm-triton-aiter"
    if triton:
        return "rocm-triton"
    return "rocm-ck" if hip else "cuda"


def _rocm_release(runtime_version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", runtime_version)[:2])


def arch_reasons(flavor: str, target, entry: str = "dense") -> list[str]:
    """Why this flavor cannot run ``entry`` on ``target``'s device (empty when it can)."""
    rule = ARCH_RULES.get(flavor)
    if rule is None:
        return [f"unknown flash-attn flavor {flavor!r} (known: {', '.join(ARCH_RULES)})"]
    if target.vendor not in rule.vendors and entry not in rule.other_vendor_entries:
        why = f": {rule.why_not_vendor}" if rule.why_not_vendor else ""
        return [f"flash-attn {flavor} does not run on {target.vendor} devices{why}"]
    if target.vendor == "nvidia" and rule.min_sm:
        match = re.match(r"sm_(\d+)", target.arch)
        if match and int(match.group(1)) < rule.min_sm:
            return [f"{target.arch} is older than flash-attn {flavor} supports ({rule.what})"]
    if target.vendor == "amd":
        if rule.archs and target.arch not in rule.archs:
            return [f"{target.arch} is not {rule.what}"]
        version = _rocm_release(target.runtime_version)
        if version and version < rule.min_rocm:
            need = ".".join(map(str, rule.min_rocm))
            return [f"ROCm {target.runtime_version} is older than flash-attn's minimum ROCm {need}"]
    return []


#: Optional packed entry points, used when the case's layout is packed and the module has them
#: (otherwise the q, k, v views of the packed buffer go through the plain function).
PACKED_FUNCTIONS = {
    ("dense", "packed-qkv"): "flash_attn_qkvpacked_func",
    ("dense", "packed-kv"): "flash_attn_kvpacked_func",
    ("varlen", "packed-qkv"): "flash_attn_varlen_qkvpacked_func",
    ("varlen", "packed-kv"): "flash_attn_varlen_kvpacked_func",
}

#: case feature -> flash-attn keyword that expresses it (a module without it cannot be asked).
FEATURE_KEYWORDS = {
    "dropout": {"dense": ("dropout_p",), "varlen": ("dropout_p",)},
    "scale": {"*": ("softmax_scale",)},
    "causal": {"*": ("causal",)},
    "window": {"*": ("window_size",)},
    "softcap": {"*": ("softcap",)},
    "alibi": {"*": ("alibi_slopes",)},
    "alibi-per-batch": {"*": ("alibi_slopes",)},
    "paged": {"varlen": ("block_table",), "kvcache": ("block_table",)},
    "append": {"kvcache": ("k",)},
    "rotary": {"kvcache": ("rotary_cos",)},
    "leftpad": {"kvcache": ("cache_leftpad",)},
    "batch-idx": {"kvcache": ("cache_batch_idx",)},
    "splits": {"kvcache": ("num_splits",)},
    "sink": {"*": ("learnable_sink",)},
    "sink-tokens": {"*": ("sink_token_length",)},
    "fp8-kv": {"*": ("k_descale",)},
    "padded": {"varlen": ("seqused_q",)},
}


def issue26_arguments(inputs) -> dict[str, Any]:
    """The keywords of issue 26's problems, for the functions that take them (the callers keep
    those the function accepts): the learnable sink (FA4's ``learnable_sink``), sink tokens
    (``sink_token_length``), the descales of an fp8 KV cache (FA3's ``k_descale``/``v_descale``,
    ``(batch, heads_kv)`` float32) and a padded varlen layout's lengths (``seqused_q``,
    ``seqused_k``). Only what the case poses is returned."""
    case = inputs.case
    out: dict[str, Any] = {}
    if getattr(case, "learnable_sink", False):
        out["learnable_sink"] = inputs_value(inputs, "learnable_sink")
    if getattr(case, "sink_tokens", 0):
        out["sink_token_length"] = case.sink_tokens
    if getattr(case, "kv_dtype", ""):
        out["k_descale"] = inputs_value(inputs, "k_descale")
        out["v_descale"] = inputs_value(inputs, "v_descale")
    if case.entry == "varlen" and case.layout == "padded":
        out["seqused_q"] = inputs_value(inputs, "seqused_q")
        out["seqused_k"] = inputs_value(inputs, "seqused_k")
    return out


class FlashAttnBackend(ModuleBackend):
    """flash_attn_func / flash_attn_varlen_func / flash_attn_with_kvcache and the packed ones.

    ``FlashAttnBackend()`` imports the installed flash-attn (a GPU build: refused on the CPU);
    ``FlashAttnBackend(module, target="...")`` is the module backend ``flash-attn@TARGET``, which
    runs wherever the module puts its tensors. ``module=`` without ``target`` stands in for the
    installed package (tests pass fakes so).
    """

    family = "flash-attn"
    default_module = "flash_attn.flash_attn_interface"
    device_types = ("cuda",)
    entry_functions = {"dense": "flash_attn_func", "varlen": "flash_attn_varlen_func",
                       "kvcache": "flash_attn_with_kvcache"}
    feature_keywords = FEATURE_KEYWORDS
    convention = CONVENTION
    lse_convention = "flash-attn"

    def __init__(self, module: Any = None, flavor: str | None = None,
                 target: str | None = None) -> None:
        import torch

        if flavor is not None and flavor not in FLAVOR_CAPABILITIES:
            raise UsageError(f"flash-attn flavor {flavor!r} is unknown "
                             f"(known: {', '.join(FLAVOR_CAPABILITIES)})")
        hip = getattr(torch.version, "hip", None) or ""
        error = ""
        version = ""
        if module is None and target is None:
            try:
                import flash_attn
                import flash_attn.flash_attn_interface as iface

                module = iface
                version = getattr(flash_attn, "__version__", "")
            except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable
                first = str(exc).splitlines()[0] if str(exc) else ""
                error = f"{type(exc).__name__}: {first}"[:300]
        if target is not None:
            declared = getattr(module, FLAVOR_ATTR, None)
            chosen = flavor or (declared if declared in FLAVOR_CAPABILITIES else "module")
        else:
            chosen = flavor or detect_flavor(hip, os.environ, module)
        super().__init__(module, target, base=FLAVOR_CAPABILITIES[chosen], import_error=error)
        self.version = version or self.version
        # An absent flash-attn has no flavor to report; the capabilities are the ones it would
        # have, so that dispatch can still explain what it would not support.
        self.flavor = chosen if module is not None else ""
        self._flavor_rules = chosen

    def unavailable_reason(self) -> str:
        if "No module named 'flash_attn'" in self._error:
            return "flash-attn is not installed (pip install 'attn-harness[flash-attn]')"
        hint = ""
        if "flash_attn_2_cuda" in self._error:
            hint = (f" (no compiled CUDA/CK extension; a Triton build of the ROCm fork needs "
                    f"{TRITON_AMD_ENV}=TRUE at run time too)")
        return f"import flash_attn failed: {self._error}{hint}"

    def availability(self) -> str | None:
        import torch

        reason = super().availability()
        if reason is None and self.target is None and not torch.cuda.is_available():
            return "no GPU here: flash-attn runs on CUDA and ROCm devices only"
        return reason

    def unsupported_reasons(self, case: Case, target) -> list[str]:
        reasons = super().unsupported_reasons(case, target)
        if target.vendor != "cpu" and self._flavor_rules in ARCH_RULES:
            reasons = arch_reasons(self._flavor_rules, target, case.entry) + reasons
        return list(dict.fromkeys(reasons))

    # ------------------------------------------------------------------------------ calling

    def _kwargs(self, func_entry: str, wanted: dict[str, Any], func=None) -> dict[str, Any]:
        """The keywords of ``wanted`` that the function takes (the rest were ruled out by
        :meth:`call_reasons` when the case needs them)."""
        sig = Signature.of(func) if func is not None else self.signature(func_entry)
        return {k: v for k, v in wanted.items() if sig.accepts(k)}

    def _packed(self, inputs) -> tuple[str, Any] | None:
        """``(function name, buffer)`` when the case is packed and the module has its function."""
        case = inputs.case
        layout = case.layout
        name = PACKED_FUNCTIONS.get((case.entry, layout))
        func = getattr(self._module, name, None) if name else None
        buffer = inputs_value(inputs, "packed")
        if func is None or buffer is None:
            return None
        views = (inputs.q, inputs.k, inputs.v) if layout == "packed-qkv" else (inputs.k, inputs.v)
        return (name, buffer) if same_storage(buffer, *views) else None

    def forward(self, inputs, *, deterministic: bool = True):
        from harness.exact.outputs import Outputs

        case = inputs.case
        common: dict[str, Any] = {
            "softmax_scale": case.scale,
            "causal": case.causal,
            "window_size": case.window,
            "softcap": case.softcap,
            "alibi_slopes": inputs.alibi_slopes,
            **issue26_arguments(inputs),
        }
        if case.entry == "kvcache":
            return self._kvcache(inputs, common)
        # return_attn_probs=True returns (out, lse, S); S is only materialised with dropout,
        # so lse is requested only without dropout to keep memory at the kernel's own.
        want_lse = case.dropout_p == 0
        wanted = {**common, "dropout_p": case.dropout_p, "deterministic": deterministic,
                  "return_attn_probs": want_lse}
        paged = case.entry == "varlen" and bool(case.paged_block_size)
        if paged:
            wanted["block_table"] = inputs.block_table
        packed = None if paged else self._packed(inputs)
        fa = self._module
        if packed is not None:
            name, buffer = packed
            func = getattr(fa, name)
            kw = self._kwargs(case.entry, wanted, func)
            if case.entry == "varlen" and case.layout == "packed-qkv":
                result = func(buffer, inputs.cu_seqlens_q, case.seqlen_q, **kw)
            elif case.entry == "varlen":
                result = func(inputs.q, buffer, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                              case.seqlen_q, case.seqlen_k, **kw)
            elif case.layout == "packed-qkv":
                result = func(buffer, **kw)
            else:
                result = func(inputs.q, buffer, **kw)
        elif case.entry == "varlen":
            name, kw = "flash_attn_varlen_func", self._kwargs("varlen", wanted)
            k = inputs_value(inputs, "k_pages") if paged else inputs.k
            v = inputs_value(inputs, "v_pages") if paged else inputs.v
            result = fa.flash_attn_varlen_func(
                inputs.q, k, v, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                case.seqlen_q, case.seqlen_k, **kw)
        else:
            name, kw = "flash_attn_func", self._kwargs("dense", wanted)
            result = fa.flash_attn_func(inputs.q, inputs.k, inputs.v, **kw)
        # flash_attn_interface.py: `out if not return_softmax else (out, softmax_lse, S_dmask)`
        if kw.get("return_attn_probs"):
            out, lse = take_return(result, name, "(out, softmax_lse, S_dmask)")
            if case.entry == "varlen":
                lse = varlen_lse_layout(lse, case)
            return Outputs(out=out, lse=lse)
        return Outputs(out=take_return(result, name, "out")[0])

    def _kvcache(self, inputs, common: dict[str, Any]):
        """flash_attn_with_kvcache: appends (k=, v=) write into the cache tensors of ``inputs``
        in place, which is what the cache check reads afterwards."""
        from harness.exact.outputs import Outputs

        case = inputs.case
        paged = bool(case.paged_block_size)
        rotary = bool(case_value(case, "rotary_dim", 0))
        wanted: dict[str, Any] = {
            "k": inputs_value(inputs, "k_new"),
            "v": inputs_value(inputs, "v_new"),
            "rotary_cos": inputs_value(inputs, "rotary_cos") if rotary else None,
            "rotary_sin": inputs_value(inputs, "rotary_sin") if rotary else None,
            "cache_seqlens": inputs.cache_seqlens,
            "cache_batch_idx": inputs_value(inputs, "cache_batch_idx"),
            "cache_leftpad": inputs_value(inputs, "cache_leftpad"),
            "block_table": inputs.block_table,
            **common,
            "num_splits": case_value(case, "num_splits", 0),
            "return_softmax_lse": True,
        }
        if rotary:
            wanted["rotary_interleaved"] = bool(case_value(case, "rotary_interleaved", False))
        kw = self._kwargs("kvcache", wanted)
        result = self._module.flash_attn_with_kvcache(
            inputs.q,
            inputs.k_pages if paged else inputs.k,
            inputs.v_pages if paged else inputs.v,
            **kw)
        # `return (out, softmax_lse) if return_softmax_lse else out`
        out, lse = take_return(result, "flash_attn_with_kvcache",
                               "(out, softmax_lse)" if kw.get("return_softmax_lse") else "out")
        return Outputs(out=out, lse=lse)


def machine_facts(hip: str, environ: Any = os.environ) -> dict[str, str]:
    """flash-attn's contribution to the machine fingerprint, without importing it.

    Returns:
        ``flash_attn`` (the installed distribution's version) and ``flash_attn_flavor`` (how it
        will load here, :func:`detect_flavor`); empty when flash-attn is not installed.
    """
    version = ""
    for dist in ("flash-attn", "flash_attn"):
        try:
            version = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    if not version:
        return {}
    return {"flash_attn": version, "flash_attn_flavor": detect_flavor(hip, environ)}


def varlen_lse_layout(lse, case: Case):
    """The varlen log-sum-exp as ``(heads_q, total_q)``.

    The CUDA and CK builds return it so; the Triton AMD backend's PyTorch reference path
    (``FLASH_ATTENTION_TRITON_AMD_REF=1``, flash-attn 2.8.3) returns ``(total_q, heads_q)``.
    Only that exact transposition is undone; any other shape is left for the judge to reject.
    """
    rows = case.rows_q  # padding rows of a padded layout included
    if (lse is not None and lse.dim() == 2 and rows != case.heads_q
            and tuple(lse.shape) == (rows, case.heads_q)):
        return lse.t()
    return lse
