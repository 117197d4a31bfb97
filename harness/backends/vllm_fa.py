"""vLLM's flash-attention fork (``vllm.vllm_flash_attn``), family ``vllm-flash-attn``.

Call convention (vllm-project/flash-attention ``vllm_flash_attn/flash_attn_interface.py``):
``flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None,
seqused_k=None, ..., block_table=None, return_softmax_lse=False)`` — ``max_seqlen_q`` comes
*before* ``cu_seqlens_q``, and a paged KV cache (``block_table``) is described by ``seqused_k``
(per-sequence key counts) instead of ``cu_seqlens_k``. ``flash_attn_with_kvcache`` keeps
flash-attn 2's signature. Inference only (no backward), CUDA only (on ROCm vLLM uses AITER).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from harness.backends.base import DEFAULT_FEATURES, Capabilities
from harness.backends.flash_attn import FEATURE_KEYWORDS as FLASH_ATTN_KEYWORDS
from harness.backends.flash_attn import varlen_lse_layout
from harness.backends.module import (
    Convention,
    ModuleBackend,
    case_value,
    import_default,
    inputs_value,
    take_return,
)

#: every feature but lastdim-strided (base.DEFAULT_FEATURES: the API copies such tensors)
ALL = frozenset(DEFAULT_FEATURES)

CONVENTION = Convention(
    layout="thd + cu_seqlens int32 (paged: k/v pages + block_table + seqused_k)",
    causal="bottom-right",
    lse_base="e",
    lse_layout="varlen (heads_q, total_q); kv-cache (batch, heads_q, seqlen_q)",
    lse_empty_rows="+inf",
    returns="out, or (out, softmax_lse) with return_softmax_lse=True",
    source="vllm-project/flash-attention vllm_flash_attn/flash_attn_interface.py",
)

_INFERENCE = ("vllm_flash_attn is built for inference: no backward and no dropout "
              "(vllm-project/flash-attention)")
#: Issue 26's problems vLLM's fork is not asked: each with its source.
_ISSUE26_NOTES = {
    "mla": "vLLM pads v to the qk head dim before flash_attn_varlen_func \"for attention "
           "backends that do not support different headdims\" (FA3 on Hopper and FA4 aside; "
           "vllm/v1/attention/backends/mla/common.py)",
    "fp8-kv": "with an fp8 KV cache vLLM quantises q to fp8 too for its flash-attn backend (one "
              "dtype for q, k, v; docs features/quantization/quantized_kvcache)",
    "padded": "vLLM's flash_attn_varlen_func takes seqused_k but no seqused_q "
              "(vllm_flash_attn/flash_attn_interface.py)",
}

#: Combinations vLLM's fork refuses, in its words (vllm-project/flash-attention
#: csrc/flash_attn/flash_api.cpp @ 04325b67, mha_fwd_kvcache; a TORCH_CHECK, so a RuntimeError).
_EXCLUSIVE = (("paged", "batch-idx"),)
_REFUSALS = {"paged+batch-idx": "\"Paged KVcache does not support cache_batch_idx\" "
                                "(vllm-project/flash-attention csrc/flash_attn/flash_api.cpp, "
                                "mha_fwd_kvcache)"}

FLAVOR_CAPABILITIES: dict[str, Capabilities] = {
    # vllm-project/flash-attention csrc/flash_attn/flash_api.cpp: fp16/bf16, head_dim <= 256,
    # paged KV blocks divisible by 16.
    "cuda": Capabilities(
        dtypes=frozenset({"float16", "bfloat16"}), head_dim_max=256,
        features=ALL - {"dropout"}, entries=frozenset({"varlen", "kvcache"}), backward=False,
        paged_block_multiple=16, exclusive=_EXCLUSIVE, returns_lse=True,
        notes={"dropout": _INFERENCE, "backward": _INFERENCE, **_ISSUE26_NOTES, **_REFUSALS},
    ),
    "module": Capabilities(
        dtypes=frozenset({"float16", "bfloat16", "float32"}), features=ALL - {"dropout"},
        entries=frozenset({"varlen", "kvcache"}), backward=False, exclusive=_EXCLUSIVE,
        returns_lse=True,
        notes={"dropout": _INFERENCE, "backward": _INFERENCE, **_ISSUE26_NOTES, **_REFUSALS},
    ),
}

#: flash-attn's keywords (vLLM's copy keeps its signatures), less dropout (inference only), with
#: ``num_splits`` on both entry points.
FEATURE_KEYWORDS = {**{k: v for k, v in FLASH_ATTN_KEYWORDS.items() if k != "dropout"},
                    "splits": {"*": ("num_splits",)}}


class VllmFlashAttnBackend(ModuleBackend):
    """vllm.vllm_flash_attn's flash_attn_varlen_func and flash_attn_with_kvcache."""

    family = "vllm-flash-attn"
    default_module = "vllm.vllm_flash_attn"
    device_types = ("cuda",)
    entry_functions = {"varlen": "flash_attn_varlen_func", "kvcache": "flash_attn_with_kvcache"}
    feature_keywords = FEATURE_KEYWORDS
    convention = CONVENTION
    lse_convention = "flash-attn"  # a fork of flash-attn 2's kernels (alibi.h unchanged)

    def __init__(self, module: Any = None, target: str | None = None) -> None:
        error = ""
        if module is None and target is None:
            module, error = import_default(self.default_module)
        flavor = "module" if target is not None else "cuda"
        super().__init__(module, target, base=FLAVOR_CAPABILITIES[flavor], import_error=error)
        self.flavor = flavor if module is not None else ""
        if not self.version and module is not None and target is None:
            self.version = machine_facts().get("vllm", "")

    def unavailable_reason(self) -> str:
        if "No module named 'vllm'" in self._error:
            return "vllm is not installed (vllm.vllm_flash_attn ships with vLLM; CUDA only)"
        return f"import vllm.vllm_flash_attn failed: {self._error}"

    def availability(self) -> str | None:
        import torch

        reason = super().availability()
        if reason is None and self.target is None and (
                not torch.cuda.is_available() or getattr(torch.version, "hip", None)):
            return "vllm_flash_attn runs on NVIDIA GPUs only (vLLM uses AITER on ROCm)"
        return reason

    def forward(self, inputs, *, deterministic: bool = True):
        import torch

        from harness.exact.outputs import Outputs

        case = inputs.case
        sig = self.signature(case.entry)
        common: dict[str, Any] = {"softmax_scale": case.scale, "causal": case.causal,
                                  "window_size": case.window, "softcap": case.softcap,
                                  "alibi_slopes": inputs.alibi_slopes,
                                  "return_softmax_lse": True}
        splits = case_value(case, "num_splits", 0)
        if splits:
            common["num_splits"] = splits
        fa = self._module
        paged = bool(case.paged_block_size)
        if case.entry == "kvcache":
            rotary = bool(case_value(case, "rotary_dim", 0))
            wanted = {
                "k": inputs_value(inputs, "k_new"), "v": inputs_value(inputs, "v_new"),
                "rotary_cos": inputs_value(inputs, "rotary_cos") if rotary else None,
                "rotary_sin": inputs_value(inputs, "rotary_sin") if rotary else None,
                "cache_seqlens": inputs.cache_seqlens,
                "cache_batch_idx": inputs_value(inputs, "cache_batch_idx"),
                "cache_leftpad": inputs_value(inputs, "cache_leftpad"),
                "block_table": inputs.block_table, **common,
            }
            if rotary:
                wanted["rotary_interleaved"] = bool(case_value(case, "rotary_interleaved", False))
            kw = {k: v for k, v in wanted.items() if sig.accepts(k)}
            result = fa.flash_attn_with_kvcache(
                inputs.q, inputs.k_pages if paged else inputs.k,
                inputs.v_pages if paged else inputs.v, **kw)
        else:
            wanted = dict(common)
            if paged:
                lens = torch.tensor(case.seqlens_k, dtype=torch.int32, device=inputs.q.device)
                wanted.update(cu_seqlens_k=None, seqused_k=lens, block_table=inputs.block_table)
                k, v = inputs_value(inputs, "k_pages"), inputs_value(inputs, "v_pages")
            else:
                wanted["cu_seqlens_k"] = inputs.cu_seqlens_k
                k, v = inputs.k, inputs.v
            kw = {k_: v_ for k_, v_ in wanted.items() if sig.accepts(k_)}
            # max_seqlen_q comes before cu_seqlens_q in vLLM's signature.
            result = fa.flash_attn_varlen_func(
                inputs.q, k, v, case.seqlen_q, inputs.cu_seqlens_q, case.seqlen_k, **kw)
        # vllm_flash_attn: `(out, softmax_lse) if return_softmax_lse else out`
        name = "flash_attn_with_kvcache" if case.entry == "kvcache" else "flash_attn_varlen_func"
        out, lse = take_return(result, name,
                               "(out, softmax_lse)" if kw.get("return_softmax_lse") else "out")
        if lse is not None and case.entry == "varlen":
            lse = varlen_lse_layout(lse, case)
        return Outputs(out=out, lse=lse)


def machine_facts() -> dict[str, str]:
    """vLLM's version when installed, without importing it."""
    try:
        return {"vllm": metadata.version("vllm")}
    except metadata.PackageNotFoundError:
        return {}
