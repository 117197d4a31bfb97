"""flash-attn 2.x through its public API, in whichever flavor is installed.

Flavors (detected at run time, see :func:`detect_flavor`):

* ``cuda``: the Dao-AILab build (``flash_attn_2_cuda``), NVIDIA sm80 and newer.
* ``rocm-ck``: the ROCm fork's Composable Kernel build, MI200/MI300 (gfx90a, gfx942, gfx950).
* ``rocm-triton``: the ROCm fork's (or upstream's) Triton backend, selected with
  ``FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE``; pure Python, AMD GPUs (on NVIDIA its 2.8.3 kernels
  fail at launch, see :data:`ARCH_RULES`).

Capabilities per flavor are data (:data:`FLAVOR_CAPABILITIES`), each limit with its source.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from harness.backends.base import FEATURES, Backend, Capabilities
from harness.case import Case
from harness.errors import UsageError

ALL = frozenset(FEATURES)
ENTRIES = frozenset({"dense", "varlen", "kvcache"})
FP16 = frozenset({"float16", "bfloat16"})

#: What each flavor claims, with the public source of every restriction.
FLAVOR_CAPABILITIES: dict[str, Capabilities] = {
    # flash_attn/flash_attn_interface.py and csrc/flash_attn/flash_api.cpp (Dao-AILab 2.8):
    # fp16/bf16, head_dim <= 256, softcap excludes dropout, paged blocks divisible by 256.
    "cuda": Capabilities(
        dtypes=FP16, head_dim_max=256, features=ALL, entries=ENTRIES, paged_block_multiple=256,
        exclusive=(("softcap", "dropout"),), returns_lse=True,
        # called with deterministic=True, which flash-attn's own tests hold to bitwise repeats
        deterministic_backward=True,
    ),
    # ROCm/flash-attention, csrc/flash_attn_ck/mha_fwd.cpp: the softcap argument is commented
    # out, so it is accepted and ignored; paged KV needs blocks divisible by 128.
    "rocm-ck": Capabilities(
        dtypes=FP16, head_dim_max=256, features=ALL - {"softcap"}, entries=ENTRIES,
        paged_block_multiple=128, returns_lse=True, deterministic_backward=True,
        notes={"softcap": "softcap is accepted and silently ignored by rocm-ck "
                          "(csrc/flash_attn_ck/mha_fwd.cpp)"},
    ),
    # ROCm/flash-attention, flash_attn/flash_attn_triton_amd (2.7/2.8 era): window_size, softcap,
    # deterministic and block_table are accepted but not passed to the kernels.
    "rocm-triton": Capabilities(
        dtypes=frozenset({"float16", "bfloat16", "float32"}), head_dim_max=256,
        features=ALL - {"window", "softcap", "paged"}, entries=ENTRIES, returns_lse=True,
        deterministic_backward=False,
        notes={
            "window": "window_size is accepted but not passed to the kernels by rocm-triton "
                      "(flash_attn_triton_amd, 2.7/2.8)",
            "softcap": "softcap is accepted but not passed to the kernels by rocm-triton "
                       "(flash_attn_triton_amd, 2.7/2.8)",
            "paged": "block_table is accepted but not passed to the kernels by rocm-triton "
                     "(flash_attn_triton_amd, 2.7/2.8)",
            "deterministic_backward": "rocm-triton accepts deterministic but does not pass it "
                                      "to the kernels (flash_attn_triton_amd, 2.7/2.8)",
        },
    ),
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


ARCH_RULES = {
    "cuda": ArchRule(min_sm=80, vendors=("nvidia",), what="Ampere (sm_80) or newer"),
    "rocm-ck": ArchRule(archs=("gfx90a", "gfx942", "gfx950"), min_rocm=(6, 0), vendors=("amd",),
                        what="a CK target (gfx90a, gfx942, gfx950)"),
    # Seen on an H200 (triton 3.6, flash-attn 2.8.3.post2): every dense and varlen kernel launch
    # fails with "Keyword argument waves_per_eu was specified but unrecognised" (an AMD-only
    # launch option); the kv-cache decode kernel launched and computed correctly (--audit).
    "rocm-triton": ArchRule(vendors=("amd",), min_rocm=(6, 0),
                            what="an AMD GPU that Triton supports",
                            why_not_vendor="its prefill kernels pass the AMD-only launch option "
                                           "waves_per_eu, which Triton on NVIDIA rejects "
                                           "(seen with flash-attn 2.8.3, triton 3.6)",
                            other_vendor_entries=("kvcache",)),
}


#: The environment switch flash-attn reads at import time. flash_attn_interface compares it
#: with the exact string ``"TRUE"`` (``os.getenv(...) == "TRUE"``), so ``true`` or ``1`` do
#: not select the Triton backend and neither may the harness.
TRITON_AMD_ENV = "FLASH_ATTENTION_TRITON_AMD_ENABLE"


def detect_flavor(hip: str, environ: Any = os.environ, module: Any = None) -> str:
    """cuda, rocm-ck or rocm-triton: which build of flash-attn runs here.

    Args:
        hip: ``torch.version.hip`` ('' or None on CUDA and CPU builds of torch).
        environ: the environment flash-attn was (or will be) imported under.
        module: the imported ``flash_attn_interface``, when there is one; its own
            ``USE_TRITON_ROCM`` flag is what decided the import, so it wins over ``environ``.
    """
    triton = getattr(module, "USE_TRITON_ROCM", None)
    if triton is None:
        triton = environ.get(TRITON_AMD_ENV, "") == "TRUE"
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


class FlashAttnBackend(Backend):
    """flash_attn_func / flash_attn_varlen_func / flash_attn_with_kvcache."""

    name = "flash-attn"
    family = "flash-attn"
    device_types = ("cuda",)

    def __init__(self, module: Any = None, flavor: str | None = None) -> None:
        import torch

        if flavor is not None and flavor not in FLAVOR_CAPABILITIES:
            raise UsageError(f"flash-attn flavor {flavor!r} is unknown "
                             f"(known: {', '.join(FLAVOR_CAPABILITIES)})")
        hip = getattr(torch.version, "hip", None) or ""
        self._module = module
        self._error = ""
        self.version = getattr(module, "__version__", "") if module is not None else ""
        if module is None:
            try:
                import flash_attn
                import flash_attn.flash_attn_interface as iface

                self._module = iface
                self.version = getattr(flash_attn, "__version__", "")
            except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable
                first = str(exc).splitlines()[0] if str(exc) else ""
                self._error = f"{type(exc).__name__}: {first}"[:300]
        detected = detect_flavor(hip, os.environ, self._module)
        # An absent flash-attn has no flavor to report; the capabilities are the ones it would
        # have, so that dispatch can still explain what it would not support.
        self.flavor = flavor or (detected if self._module is not None else "")
        self.capabilities = FLAVOR_CAPABILITIES[flavor or detected]

    def availability(self) -> str | None:
        import torch

        if self._module is None:
            if "No module named 'flash_attn'" in self._error:
                return "flash-attn is not installed (pip install 'attn-harness[flash-attn]')"
            hint = ""
            if "flash_attn_2_cuda" in self._error:
                hint = (f" (no compiled CUDA/CK extension; a Triton build of the ROCm fork needs "
                        f"{TRITON_AMD_ENV}=TRUE at run time too)")
            return f"import flash_attn failed: {self._error}{hint}"
        if not torch.cuda.is_available():
            return "no GPU here: flash-attn runs on CUDA and ROCm devices only"
        return None

    def unsupported_reasons(self, case: Case, target) -> list[str]:
        reasons = super().unsupported_reasons(case, target)
        if target.vendor != "cpu" and self.flavor:
            reasons = arch_reasons(self.flavor, target, case.entry) + reasons
        return list(dict.fromkeys(reasons))

    def forward(self, inputs, *, deterministic: bool = True):
        from harness.outputs import Outputs

        fa = self._module
        case = inputs.case
        common: dict[str, Any] = {
            "softmax_scale": case.scale,
            "causal": case.causal,
            "window_size": case.window,
            "softcap": case.softcap,
            "alibi_slopes": inputs.alibi_slopes,
        }
        if case.entry == "kvcache":
            out, lse = fa.flash_attn_with_kvcache(
                inputs.q,
                inputs.k_pages if case.paged_block_size else inputs.k,
                inputs.v_pages if case.paged_block_size else inputs.v,
                cache_seqlens=inputs.cache_seqlens,
                block_table=inputs.block_table,
                return_softmax_lse=True,
                **common,
            )
            return Outputs(out=out, lse=lse)
        # return_attn_probs=True returns (out, lse, S); S is only materialised with dropout,
        # so lse is requested only without dropout to keep memory at the kernel's own.
        want_lse = case.dropout_p == 0
        kwargs = {**common, "dropout_p": case.dropout_p, "deterministic": deterministic,
                  "return_attn_probs": want_lse}
        if case.entry == "varlen":
            result = fa.flash_attn_varlen_func(
                inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                case.seqlen_q, case.seqlen_k, **kwargs)
        else:
            result = fa.flash_attn_func(inputs.q, inputs.k, inputs.v, **kwargs)
        if want_lse:
            lse = result[1]
            if case.entry == "varlen":
                lse = varlen_lse_layout(lse, case)
            return Outputs(out=result[0], lse=lse)
        return Outputs(out=result)


def varlen_lse_layout(lse, case: Case):
    """The varlen log-sum-exp as ``(heads_q, total_q)``.

    The CUDA and CK builds return it so; the Triton AMD backend's PyTorch reference path
    (``FLASH_ATTENTION_TRITON_AMD_REF=1``, flash-attn 2.8.3) returns ``(total_q, heads_q)``.
    Only that exact transposition is undone; any other shape is left for the judge to reject.
    """
    if (lse is not None and lse.dim() == 2 and case.total_q != case.heads_q
            and tuple(lse.shape) == (case.total_q, case.heads_q)):
        return lse.t()
    return lse
