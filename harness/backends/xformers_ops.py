"""xformers' ``memory_efficient_attention`` as a family, ``xformers``.

Call convention (facebookresearch/xformers ``xformers/ops/fmha/__init__.py`` and
``xformers/ops/fmha/attn_bias.py``): ``memory_efficient_attention(q, k, v, attn_bias=None, p=0.0,
scale=None)`` with BMHK tensors (flash-attn's ``(batch, seqlen, heads, head_dim)``). Masks are
objects: ``LowerTriangularMask`` is top-left aligned, so bottom-right causal goes in as
``LowerTriangularFromBottomRightMask``; varlen packs the batch into one sequence of a batch of 1
with ``BlockDiagonalMask`` / ``BlockDiagonalCausalFromBottomRightMask`` built ``from_seqlens``.
GQA takes the 5-D BMGHK layout (kv heads as groups, k and v expanded over the heads of a group).
Local windows and ALiBi go in as an additive tensor bias (dense, MHA only). Forward only; no lse.
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

from harness.backends.base import Capabilities, Unsupported
from harness.backends.module import Convention, ModuleBackend, import_default, take_return
from harness.backends.sdpa import attn_mask
from harness.case import Case

CONVENTION = Convention(
    layout="BMHK (GQA: BMGHK); varlen: batch 1 with a BlockDiagonal mask",
    causal="top-left for LowerTriangularMask; the adapter uses the FromBottomRight masks",
    lse_base="e",
    lse_layout="not returned by memory_efficient_attention",
    lse_empty_rows="none",
    returns="out",
    source="facebookresearch/xformers xformers/ops/fmha/__init__.py, attn_bias.py",
)

#: Mask classes the adapter needs, looked up on the module or its ``fmha.attn_bias``.
MASKS = ("LowerTriangularFromBottomRightMask", "BlockDiagonalMask",
         "BlockDiagonalCausalFromBottomRightMask")

#: Issue 26: v may have a head dim of its own ("value: [B, Mkv, H, Kv]",
#: xformers/ops/fmha/__init__.py memory_efficient_attention), v may be a view of k, and sink
#: tokens go into the tensor bias with the window.
_FEATURES = frozenset({"causal", "window", "alibi", "gqa", "scale", "strided",
                       "seqlen_q>seqlen_k", "packed", "v-transposed", "mla", "latent-kv",
                       "sink-tokens"})

FLAVOR_CAPABILITIES: dict[str, Capabilities] = {
    # xformers/ops/fmha: fp16/bf16/fp32 (cutlass op), forward only here; no softcap parameter;
    # no paged KV in memory_efficient_attention; dropout (p) is random and not reproducible
    # against a reference, so it is not posed.
    "any": Capabilities(
        dtypes=frozenset({"float16", "bfloat16", "float32"}), features=_FEATURES,
        entries=frozenset({"dense", "varlen"}), backward=False, returns_lse=False,
        notes={"softcap": "memory_efficient_attention has no softcap",
               "paged": "memory_efficient_attention has no paged KV cache",
               "dropout": "xformers is tested forward-only here (dropout is not posed)",
               "backward": "xformers is tested forward-only here (issue 13)"},
    ),
}


def _mask_class(module: Any, name: str) -> Any:
    found = getattr(module, name, None)
    if found is None:
        fmha = getattr(module, "fmha", None)
        found = getattr(getattr(fmha, "attn_bias", None), name, None)
    return found


class XformersBackend(ModuleBackend):
    """xformers.ops.memory_efficient_attention with bottom-right mask objects."""

    family = "xformers"
    default_module = "xformers.ops"
    device_types = ("cuda",)
    entry_functions = {"dense": "memory_efficient_attention",
                       "varlen": "memory_efficient_attention"}
    feature_keywords = {"scale": {"*": ("scale",)}}
    convention = CONVENTION

    def __init__(self, module: Any = None, target: str | None = None) -> None:
        error = ""
        if module is None and target is None:
            module, error = import_default(self.default_module)
        super().__init__(module, target, base=FLAVOR_CAPABILITIES["any"], import_error=error)
        self.flavor = ("module" if target is not None else "xformers") if module is not None else ""
        if not self.version and module is not None and target is None:
            self.version = machine_facts().get("xformers", "")

    def availability(self) -> str | None:
        import torch

        reason = super().availability()
        if reason is None and self.target is None and not torch.cuda.is_available():
            return "no GPU here: xformers' memory_efficient_attention kernels run on GPUs"
        return reason

    def unavailable_reason(self) -> str:
        if "No module named 'xformers'" in self._error:
            return "xformers is not installed (pip install xformers)"
        return f"import xformers.ops failed: {self._error}"

    def call_reasons(self, case: Case, target) -> list[str]:
        reasons = super().call_reasons(case, target)
        if reasons:
            return reasons
        if self._module is not None:
            needed = ["LowerTriangularFromBottomRightMask"] if case.entry == "dense" else (
                ["BlockDiagonalCausalFromBottomRightMask"] if case.causal
                else ["BlockDiagonalMask"])
            for name in needed:
                if _mask_class(self._module, name) is None:
                    reasons.append(f"{self.name} has no {name}")
        bias = "window" in case.features or case.alibi
        if bias and case.entry == "varlen":
            reasons.append("xformers: windows and ALiBi are posed as a tensor bias, dense only")
        if bias and case.heads_kv != case.heads_q:
            reasons.append("xformers: windows and ALiBi are posed as a tensor bias, MHA only")
        return reasons

    def forward(self, inputs, *, deterministic: bool = True):
        from harness.exact.outputs import Outputs

        case = inputs.case
        xops = self._module
        q, k, v = inputs.q, inputs.k, inputs.v
        if case.entry == "varlen":
            q, k, v = q[None], k[None], v[None]
            name = ("BlockDiagonalCausalFromBottomRightMask" if case.causal
                    else "BlockDiagonalMask")
            bias = _mask_class(xops, name).from_seqlens(list(case.seqlens_q),
                                                         list(case.seqlens_k))
        elif "window" in case.features or case.alibi:
            bias = tensor_bias(case, inputs.alibi_slopes, q.dtype, q.device)
        elif case.causal:
            bias = _mask_class(xops, "LowerTriangularFromBottomRightMask")()
        else:
            bias = None
        group = case.group_size
        if group > 1:  # BMGHK: kv heads are the groups, expanded over the heads of a group
            b, m, hkv = q.shape[0], q.shape[1], case.heads_kv
            q = q.reshape(b, m, hkv, group, q.shape[-1])
            k = k[:, :, :, None].expand(k.shape[0], k.shape[1], hkv, group, k.shape[-1])
            v = v[:, :, :, None].expand(v.shape[0], v.shape[1], hkv, group, v.shape[-1])
        kwargs: dict[str, Any] = {"attn_bias": bias}
        if case.scale is not None:
            kwargs["scale"] = case.scale
        try:
            result = xops.memory_efficient_attention(q, k, v, **kwargs)
        except (NotImplementedError, ValueError) as exc:
            if "No operator found" in str(exc):
                raise Unsupported(f"xformers refused the call: {str(exc).splitlines()[0]}") \
                    from None
            raise
        out = take_return(result, "memory_efficient_attention", "out")[0]
        if group > 1:
            out = out.reshape(out.shape[0], out.shape[1], case.heads_q, out.shape[-1])
        if case.entry == "varlen":
            out = out[0]
        return Outputs(out=out)


def tensor_bias(case: Case, slopes, dtype, device):
    """An additive ``(batch, heads, seqlen_q, seqlen_k)`` bias: the bottom-right window (``-inf``
    outside) plus ALiBi; its storage is padded to a multiple of 8 keys, as xformers requires of
    a tensor bias's last-dimension alignment."""
    import torch

    mask = attn_mask(case, slopes, dtype, device)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, -math.inf)
    sq, sk = case.seqlen_q, case.seqlen_k
    padded = torch.empty(case.batch, case.heads_q, sq, -(-sk // 8) * 8, dtype=dtype,
                         device=device)[..., :sk]
    padded.copy_(mask.expand(case.batch, case.heads_q, sq, sk))
    return padded


def machine_facts() -> dict[str, str]:
    """xformers' version when installed, without importing it."""
    try:
        return {"xformers": metadata.version("xformers")}
    except metadata.PackageNotFoundError:
        return {}
