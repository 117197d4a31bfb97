"""The families: API conventions a kernel can be tested through, and where each usually lives.

A family is a name (``flash-attn``, ``flash-attn3``, ``flash-attn4``, ``aiter``,
``flashinfer``, ``vllm-flash-attn``, ``xformers``, ``flex-attention``, ``sdpa``), the module it
imports by default, a backend class that speaks its call convention (see each class's module
for the convention and its capabilities, with sources), and the facts it adds to the machine
fingerprint. Nothing here imports torch or a kernel package at module level: the registry is
read by the CLI's argument parsing and the pytest plugin.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from harness.backends.module import first_line


@dataclass(frozen=True)
class Family:
    """One API convention.

    Attributes:
        name: the family name used in specs (``FAMILY`` and ``FAMILY@TARGET``).
        default_module: what a bare ``FAMILY`` imports.
        backend: ``"module:Class"`` of its backend class (imported on first use).
        summary: one line for ``info`` and the README.
        facts: ``"module:function"`` contributing machine facts, or ''.
        module_targets: whether ``FAMILY@TARGET`` is allowed.
    """

    name: str
    default_module: str
    backend: str
    summary: str
    facts: str = ""
    module_targets: bool = True

    def backend_class(self) -> type:
        module, _, attr = self.backend.partition(":")
        return getattr(importlib.import_module(module), attr)

    def make(self, module: Any = None, target: str | None = None):
        """The backend: the family's default module (``target`` None) or a loaded module."""
        cls = self.backend_class()
        if target is None:
            return cls()
        return cls(module=module, target=target)

    def machine_facts(self, hip: str, environ: Mapping[str, str]) -> dict[str, str]:
        if not self.facts:
            return {}
        module, _, attr = self.facts.partition(":")
        func: Callable[..., dict[str, str]] = getattr(importlib.import_module(module), attr)
        try:
            params = func.__code__.co_varnames[:func.__code__.co_argcount]
        except AttributeError:
            params = ()
        kwargs = {k: v for k, v in (("hip", hip), ("environ", environ)) if k in params}
        return {k: str(v) for k, v in func(**kwargs).items()}


_B = "harness.backends."

#: Every family, in the order ``info`` lists them.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("flash-attn", "flash_attn.flash_attn_interface", _B + "flash_attn:FlashAttnBackend",
           "flash-attn 2.x (CUDA, ROCm CK, ROCm Triton / AITER Triton) or any module with its API",
           facts=_B + "flash_attn:machine_facts"),
    Family("flash-attn3", "flash_attn_interface", _B + "fa3:FlashAttn3Backend",
           "flash-attn 3 (hopper/ flash_attn_interface): no dropout, no ALiBi; page_table",
           facts=_B + "fa3:machine_facts"),
    Family("flash-attn4", "flash_attn.cute", _B + "fa4:FlashAttn4Backend",
           "FlashAttention-4 (flash_attn.cute, PyPI flash-attn-4): learnable_sink, page_table, "
           "seqused_q/k, qv (absorbed MLA); claims per architecture sm80-sm120",
           facts=_B + "fa4:machine_facts"),
    Family("aiter", "aiter", _B + "aiter_fa:AiterBackend",
           "AITER's flash_attn_func / flash_attn_varlen_func (ROCm gfx942, gfx950)",
           facts=_B + "aiter_fa:machine_facts"),
    Family("flashinfer", "flashinfer", _B + "flashinfer:FlashInferBackend",
           "FlashInfer: single prefill/decode and paged batch wrappers (lse base 2, NHD/HND); "
           "the ROCm port as flavor rocm", facts=_B + "flashinfer:machine_facts"),
    Family("vllm-flash-attn", "vllm.vllm_flash_attn", _B + "vllm_fa:VllmFlashAttnBackend",
           "vLLM's flash-attention fork: varlen (max_seqlen_q first, seqused_k) and kv-cache",
           facts=_B + "vllm_fa:machine_facts"),
    Family("xformers", "xformers.ops", _B + "xformers_ops:XformersBackend",
           "xformers memory_efficient_attention with bottom-right mask objects (forward only)",
           facts=_B + "xformers_ops:machine_facts"),
    Family("flex-attention", "torch.nn.attention.flex_attention", _B + "flex:FlexAttentionBackend",
           "torch's FlexAttention, compiled, with block masks and score_mod"),
    Family("sdpa", "torch.nn.functional", _B + "sdpa:SdpaBackend",
           "torch's scaled_dot_product_attention pinned to one kernel (sdpa-math, sdpa-flash, "
           "sdpa-efficient, sdpa-cudnn)", facts=_B + "sdpa:machine_facts",
           module_targets=False),
)}

#: Families whose bare name is itself a built-in backend (sdpa is spelled sdpa-<kernel>).
BARE = tuple(name for name, f in FAMILIES.items() if f.module_targets)


def machine_facts(hip: str | None = None,
                  environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Every family's contribution to the machine fingerprint (strings), importing no kernel.

    A family whose facts cannot be read contributes ``<family>_facts_error`` instead.
    """
    if hip is None:
        import torch

        hip = getattr(torch.version, "hip", None) or ""
    out: dict[str, str] = {}
    for family in FAMILIES.values():
        try:
            out.update(family.machine_facts(hip, environ))
        except Exception as exc:  # noqa: BLE001 - a fingerprint must not fail for one family
            out[f"{family.name}_facts_error"] = first_line(exc)
    return out
