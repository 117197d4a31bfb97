"""PyTorch's ``scaled_dot_product_attention`` pinned to one kernel with ``sdpa_kernel``.

flash-attn semantics are translated, never passed through: SDPA's ``is_causal`` is top-left
aligned, so it is used only when ``seqlen_q == seqlen_k`` (where both alignments agree); every
other causal or local mask, and ALiBi, goes in as an explicit bottom-right ``attn_mask``. Where
the pinned kernel refuses the call, torch's own explanation (emitted as warnings) becomes the
skip reason.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from dataclasses import replace

from harness.backends.base import Backend, Capabilities, Unsupported
from harness.case import Case
from harness.vocab import FEATURES, OPT_IN_FEATURES

KERNELS = {
    "sdpa-math": "MATH",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}

_NO_SOFTCAP = "softcap is not a parameter of SDPA"
_NO_PAGED = "SDPA has no paged kv-cache"
_NONDETERMINISTIC_BWD = ("torch's GPU SDPA kernels take no deterministic flag; their dq differed "
                         "between identical runs on an H200 (torch 2.11)")
_FUSED_LASTDIM = ("torch's fused SDPA kernels require the last dimension to have stride 1 "
                  "(only sdpa-math takes lastdim-strided)")
_NO_MASK_CUDA = "{name} takes no attn_mask on GPUs, so {feature} cannot be expressed"
#: Of issue 26's problems SDPA poses a value head dim of its own ("value: (N, ..., S, Ev)",
#: torch.nn.functional.scaled_dot_product_attention's docstring), v as a view of k, and sink
#: tokens (in the explicit bottom-right attn_mask); a learnable sink has no parameter, fp8 and
#: padded varlen no entry point.
_ISSUE26 = {"mla", "latent-kv", "sink-tokens"}
_NO_SINK = "SDPA has no learnable sink (no parameter adds a logit to the softmax denominator)"
_NO_FP8 = "SDPA takes no fp8 KV cache (q, k and v of one dtype)"
_FLASH_SAME_DIM = ("torch refuses it: \"Flash attention requires q,k,v to have the same last "
                   "dimension\" (aten/src/ATen/native/transformers, check_head_dim_size_flash)")


def _base_caps(**changes) -> Capabilities:
    features = (frozenset(FEATURES) - {"softcap", "paged"} - frozenset(OPT_IN_FEATURES)
                | _ISSUE26)
    caps = Capabilities(features=features, entries=frozenset({"dense"}),
                        notes={"softcap": _NO_SOFTCAP, "paged": _NO_PAGED, "sink": _NO_SINK,
                               "fp8-kv": _NO_FP8})
    return replace(caps, **changes)


#: ``torch.backends.cuda.preferred_rocm_fa_library()`` names -> the library that serves SDPA
#: flash/efficient on ROCm. ``Default`` is AOTriton (torch's docstring: "Currently AOTriton").
_ROCM_FA_LIBRARIES = {"default": "aotriton", "aotriton": "aotriton", "ck": "ck"}


def rocm_fa_library(torch_module=None) -> str:
    """Which library serves SDPA flash/efficient on ROCm: ``aotriton`` or ``ck``.

    torch 2.3-2.5 have only AOTriton and no ``preferred_rocm_fa_library``. A CK preference on a
    build without CK kernels (``is_ck_sdpa_available() == False``) still runs AOTriton.
    """
    if torch_module is None:
        import torch as torch_module
    cuda = torch_module.backends.cuda
    pref = getattr(cuda, "preferred_rocm_fa_library", None)
    if pref is None:
        return "aotriton"
    try:
        name = str(pref()).rsplit(".", 1)[-1].lower()
    except Exception:  # noqa: BLE001 - a build without the ROCm bits may refuse the query
        return "aotriton"
    library = _ROCM_FA_LIBRARIES.get(name, name)
    ck_available = getattr(cuda, "is_ck_sdpa_available", None)
    if library == "ck" and ck_available is not None:
        try:
            if not ck_available():
                return "aotriton"
        except Exception:  # noqa: BLE001
            return "aotriton"
    return library


def _has_enable_gqa() -> bool:
    import torch.nn.functional as F

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # builtins without a signature: parse the docstring
        return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class SdpaBackend(Backend):
    """One SDPA kernel. Capabilities depend on the device (CPU or GPU) and on torch's version."""

    family = "sdpa"

    def __init__(self, name: str, *, device_type: str | None = None, rocm: bool | None = None,
                 enable_gqa: bool | None = None) -> None:
        """Pin ``name`` (a key of :data:`KERNELS`).

        The keywords describe another machine instead of this one (tests use them to check the
        GPU rules on a CPU): ``device_type`` ``cpu`` or ``cuda``, ``rocm`` for a ROCm build,
        ``enable_gqa`` whether this torch's SDPA has ``enable_gqa`` (torch >= 2.5).
        """
        import torch

        if name not in KERNELS:
            raise ValueError(name)
        self.name = name
        self.version = torch.__version__
        self.device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        self.rocm = bool(getattr(torch.version, "hip", None)) if rocm is None else rocm
        self.enable_gqa = _has_enable_gqa() if enable_gqa is None else enable_gqa
        self.flavor = self._flavor()
        self.capabilities = self._capabilities()

    def _flavor(self) -> str:
        if self.device_type == "cpu":
            return "cpu"
        if self.rocm and self.name in ("sdpa-flash", "sdpa-efficient"):
            return "rocm-" + rocm_fa_library()
        return "rocm" if self.rocm else "cuda"

    def _capabilities(self) -> Capabilities:
        caps = _base_caps()
        if not self.enable_gqa:
            caps = replace(caps, features=caps.features - {"gqa"},
                           notes={**caps.notes,
                                  "gqa": "this torch has no enable_gqa (torch >= 2.5)"})
        if self.name == "sdpa-math":
            return caps
        # torch: "All fused kernels require the last dimension of the input to have stride 1"
        caps = replace(caps, features=caps.features - {"lastdim-strided"},
                       notes={**caps.notes, "lastdim-strided": _FUSED_LASTDIM})
        # torch's flash kernels (CPU and GPU) refuse a value head dim of its own: "Flash
        # attention requires q,k,v to have the same last dimension" (sdp_utils).
        if self.name == "sdpa-flash":
            caps = replace(caps, features=caps.features - {"mla", "latent-kv"},
                           notes={**caps.notes, "mla": _FLASH_SAME_DIM,
                                  "latent-kv": _FLASH_SAME_DIM})
        if self.device_type == "cpu":
            if self.name == "sdpa-flash":
                return replace(caps, features=caps.features - {"dropout"},
                               notes={**caps.notes,
                                      "dropout": "sdpa-flash on the CPU has no dropout"})
            return caps
        fp16 = frozenset({"float16", "bfloat16"})
        caps = replace(caps, deterministic_backward=False,
                       notes={**caps.notes, "deterministic_backward": _NONDETERMINISTIC_BWD})
        if self.name == "sdpa-flash":
            notes = {**caps.notes, **{f: _NO_MASK_CUDA.format(name=self.name, feature=f)
                                      for f in ("window", "alibi", "sink-tokens")}}
            return replace(caps, dtypes=fp16, head_dim_max=256, notes=notes,
                           features=caps.features - {"window", "alibi", "sink-tokens"})
        if self.name == "sdpa-efficient":
            return replace(caps, features=caps.features - {"gqa"},
                           notes={**caps.notes, "gqa": "sdpa-efficient has no GQA (enable_gqa)"})
        return replace(caps, dtypes=fp16)  # cudnn: the rest is decided by torch at call time

    def availability(self) -> str | None:
        import torch
        from torch.nn.attention import SDPBackend

        if getattr(SDPBackend, KERNELS[self.name], None) is None:
            return f"torch {torch.__version__} has no SDPBackend.{KERNELS[self.name]}"
        if self.device_type == "cpu":
            if self.name in ("sdpa-efficient", "sdpa-cudnn"):
                return f"no GPU here: torch {torch.__version__} has no CPU kernel for {self.name}"
            return None
        if self.name == "sdpa-cudnn" and self.rocm:
            return "cuDNN does not exist on ROCm"
        if self.name == "sdpa-cudnn" and not torch.backends.cudnn.is_available():
            return "this torch build has no cuDNN"
        check = {"sdpa-flash": "is_flash_attention_available"}.get(self.name)
        fn = getattr(torch.backends.cuda, check, None) if check else None
        if fn is not None and not fn():
            return f"this torch build has no {self.name} kernel"
        return None

    def unsupported_reasons(self, case: Case, target) -> list[str]:
        reasons = super().unsupported_reasons(case, target)
        if (self.device_type == "cuda" and self.name == "sdpa-flash" and case.causal
                and case.seqlen_q != case.seqlen_k):
            reasons.append("sdpa-flash takes no attn_mask on GPUs and its is_causal is top-left "
                           "aligned, so bottom-right causal with seqlen_q != seqlen_k cannot be "
                           "expressed")
        return reasons

    # ------------------------------------------------------------------------------ calling

    def forward(self, inputs, *, deterministic: bool = True):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from harness.exact.outputs import Outputs

        case = inputs.case
        q = inputs.q.transpose(1, 2)
        k = inputs.k.transpose(1, 2)
        v = inputs.v.transpose(1, 2)
        kwargs: dict = {"dropout_p": case.dropout_p, "scale": case.scale}
        if case.heads_kv != case.heads_q:
            kwargs["enable_gqa"] = True
        mask = None
        simple_causal = (case.mask_window == (-1, 0) and case.seqlen_q == case.seqlen_k
                         and not case.sink_tokens)
        if case.alibi or (case.has_mask and not simple_causal):
            mask = attn_mask(case, inputs.alibi_slopes, q.dtype, q.device)
        elif simple_causal:
            kwargs["is_causal"] = True
        kernel = getattr(SDPBackend, KERNELS[self.name])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([kernel]):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
            except RuntimeError as exc:
                if "No available kernel" in str(exc) or "No viable backend" in str(exc):
                    raise Unsupported(self._refusal(caught, mask is not None)) from None
                raise
        return Outputs(out=out.transpose(1, 2))

    def _refusal(self, caught, with_mask: bool) -> str:
        said = []
        for w in caught:
            text = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message)).strip()
            if text and not text.endswith("because:") and text not in said:
                said.append(text)
        how = " (given an explicit bottom-right attn_mask)" if with_mask else ""
        return f"torch refused {self.name}{how}: " + ("; ".join(said) or "no reason given")


def attn_mask(case: Case, slopes, dtype, device):
    """The bottom-right aligned mask as SDPA wants it, sink tokens included.

    Boolean ``(seqlen_q, seqlen_k)`` (True = attend) without ALiBi; with ALiBi an additive
    ``(1, heads_q, seqlen_q, seqlen_k)`` bias holding ``-slope * |i + sk - sq - j|`` where visible
    and ``-inf`` elsewhere; ``(batch, heads_q, ...)`` when the slopes are per batch entry
    (``(batch, heads_q)``, flash-attn's other accepted shape).
    """
    import torch

    sq, sk = case.seqlen_q, case.seqlen_k
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    rel = i + (sk - sq) - j
    visible = torch.ones(sq, sk, dtype=torch.bool, device=device)
    left, right = case.mask_window
    if left >= 0:  # sink tokens are spared the left bound, never the right one
        visible &= (rel <= left) | (j < case.sink_tokens)
    if right >= 0:
        visible &= -rel <= right
    if not case.alibi:
        return visible
    rows = slopes.shape[0] if slopes.dim() == 2 else 1
    bias = -slopes.reshape(rows, case.heads_q, 1, 1).float() * rel.abs().float()
    bias = bias.masked_fill(~visible, -math.inf)
    return bias.to(dtype)


def machine_facts(hip: str) -> dict[str, str]:
    """SDPA's contribution to the machine fingerprint: on ROCm, the library serving its flash
    and efficient kernels (:func:`rocm_fa_library`, key ``sdpa_rocm_library``)."""
    return {"sdpa_rocm_library": rocm_fa_library()} if hip else {}
