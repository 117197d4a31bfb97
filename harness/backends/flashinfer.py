"""FlashInfer (``flashinfer``, PyPI ``flashinfer-python``) as a family, ``flashinfer``.

Every fact was read in flashinfer-ai/flashinfer at ``fb28d724`` (``version.txt`` 0.6.18) unless
another source is named; the ROCm port is ROCm/flashinfer at ``89ed3c18`` (tags
``v0.5.3+amd.N``, installed as ``amd-flashinfer``).

Call convention:

* dense: ``single_prefill_with_kv_cache(q, k, v, ..., causal, kv_layout, pos_encoding_mode,
  sm_scale, window_left, logits_soft_cap, return_lse, k_scale, v_scale)`` per sequence (q
  ``[qo_len, H_qo, D_qk]``, k ``[kv_len, H_kv, D_qk]`` NHD or ``[H_kv, kv_len, D_qk]`` HND), or
  ``single_decode_with_kv_cache(q [H_qo, D], k, v, ...)`` for one query of equal head dims.
* varlen and kv-cache: ``BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout)`` then
  ``plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
  num_kv_heads, head_dim_qk, page_size, head_dim_vo=..., causal=..., ...)`` and ``run(q,
  (k_cache, v_cache), return_lse=True, ...)`` (prefill.py l.2120); one query per sequence and
  equal head dims go through ``BatchDecodeWithPagedKVCacheWrapper`` (decode.py l.1280: one
  ``head_dim``, options after ``page_size`` by name). A varlen k without pages is a cache of
  pages of one token; a kv-cache without pages a cache of one page per sequence
  (``page_size`` = its capacity). A sequence is ``(pages - 1) * page_size + last_page_len``
  keys long (``page.py get_seq_lens``); an empty one has no page and ``last_page_len`` 0.
* The lse is base 2 (the kernels store ``log2(d) + m``, persistent.cuh l.489), ``[tokens,
  heads]`` (decode ``[batch, heads]``); 0.6.18 has no option to change either (facts.md's
  ``lse_base="ln"`` is 0.7.x's, not read). The adapter converts to natural log ``(heads,
  tokens)``.
* Causal masks are bottom-right (prefill.cuh l.1517); the single prefill kernel refuses causal
  with ``kv_len < qo_len`` ("When mask_mode is set to MaskMode::kCausal, kv_len must be
  greater than or equal to qo_len", prefill.cuh l.2535). ``window_left`` keeps keys ``kv_idx
  + qo_len + window_left >= kv_len + qo_idx`` (variants.cuh l.89): flash-attn's left window.
  There is no right window ("window_right != 0" raises NotImplementedError except on the
  cute-dsl backend, decode.py).
* ``logits_soft_cap`` is flash-attn's softcap. ALiBi is ``pos_encoding_mode="ALIBI"`` with fixed
  slopes ``get_alibi_slopes(num_qo_heads)`` (utils.py l.209, the harness's standard slopes) and
  the bias ``slope * (kv_idx - qo_idx)`` with the raw query index (variants.cuh l.68-70; decode
  passes ``qo_idx = 0``). Where every visible key is left of the diagonal (causal) that is
  flash-attn's ``-slope * |i + sk - sq - j|`` plus ``slope * (sk - sq)`` per sequence: the same
  softmax, and an lse larger by that, which the adapter takes off. Elsewhere (keys right of
  the diagonal) the sign differs: refused. With softcap the bias is added before the tanh
  (and the scale applied twice): refused.
* fp8 KV cache (``float8_e4m3fn``/``float8_e5m2``) under 16-bit queries: ``k_scale`` is folded
  into ``sm_scale``, ``v_scale`` multiplies the output (one float per tensor; per-head scales
  exist only for fp8 queries).
* The CUDA-core decode kernels take GQA ratios 1, 2, 3, 4, 6, 8 only (``DISPATCH_GQA_GROUP_SIZE``,
  include/flashinfer/utils.cuh l.142-165: "Unsupported group_size"); other ratios (16) are
  posed with ``use_tensor_cores=True``, the prefill kernel, as a user must.
* ``kv_layout``: ``NHD`` unless the case's v is heads-major (``v-transposed``), then ``HND``
  with k and v both passed as heads-major views.
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

from harness.backends.base import DEFAULT_FEATURES, Capabilities
from harness.backends.module import (
    Convention,
    ModuleBackend,
    Signature,
    import_default,
    inputs_value,
    take_return,
)
from harness.case import Case

SOURCE = "flashinfer-ai/flashinfer @ fb28d724 (0.6.18)"
ROCM_SOURCE = "ROCm/flashinfer @ 89ed3c18 README, Known Limitations"
#: PyPI distributions: upstream's, and the ROCm port's (pypi.amd.com).
DISTRIBUTIONS = ("flashinfer-python", "amd-flashinfer", "flashinfer")

CONVENTION = Convention(
    layout="single: [tokens, heads, dim] per sequence; batch: paged KV (NHD or HND) with "
           "qo_indptr / kv_indptr / indices / last_page_len",
    causal="bottom-right",
    lse_base="2",
    lse_layout="[tokens, heads] (decode [batch, heads])",
    lse_empty_rows="-inf",
    returns="out, or (out, lse) with return_lse=True",
    source=SOURCE + " flashinfer/prefill.py, decode.py",
)

FP16 = frozenset({"float16", "bfloat16"})
#: GQA ratios the CUDA-core decode kernels are instantiated for (utils.cuh l.142-165).
DECODE_GROUP_SIZES = (1, 2, 3, 4, 6, 8)
#: fp8 formats a KV cache may be stored in (flashinfer/jit/utils.py dtype maps: no fnuz).
KV_FP8 = ("float8_e4m3fn", "float8_e5m2")

_WORDS = {
    "dropout": "flashinfer has no dropout (inference kernels)",
    "backward": "flashinfer's attention kernels are forward only (inference)",
    "alibi-per-batch": "flashinfer's ALiBi slopes are fixed, get_alibi_slopes(num_qo_heads) "
                       f"(flashinfer/utils.py l.209 @ {SOURCE}): no per-sequence slopes",
    "sink": "run(sinks=...) reaches only the trtllm-gen backend; the fa2 and fa3 branches of "
            f"BatchPrefillWithPagedKVCacheWrapper.run never pass it (prefill.py l.748-838 @ "
            f"{SOURCE}; read, not run): silently ignored on SM80/SM90",
    "sink-tokens": "flashinfer's window has no sink tokens (window_left only)",
    "padded": "flashinfer takes no seqused_q: a padded varlen layout cannot be described "
              "(run raises ValueError when q.size(0) != qo_indptr[-1])",
    "packed": "q, k and v views of one packed buffer are not posed to flashinfer",
    "append": "flashinfer's attention wrappers do not append to the cache (append_paged_kv_cache "
              "is a separate call)",
    "rotary": "flashinfer's rope is pos_encoding_mode='ROPE_LLAMA' on q and k inside the kernel, "
              "not flash-attn's rotary append",
    "leftpad": "flashinfer has no cache_leftpad", "batch-idx": "flashinfer has no cache_batch_idx",
    "splits": "flashinfer chooses split-KV itself (fixed_split_size, disable_split_kv): "
              "num_splits is not posed",
    "dtype:float32": "flashinfer's kernels take fp16/bf16 queries (jit/utils.py dtype maps)",
    "head_dims_v": f"fa3 prefill takes (192, 128) beside equal dims "
                   f"(utils.is_fa3_prefill_head_dim_supported, aot.py l.1050 @ {SOURCE})",
    "alibi+softcap": "with ALiBi and a softcap flashinfer adds the bias before the tanh and "
                     "applies sm_scale twice (DefaultAttention logits transform, "
                     f"include/flashinfer/attention/variants.cuh l.67-75 @ {SOURCE}); the "
                     "harness's order is scale, softcap, ALiBi",
}
for _fmt in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2"):
    _WORDS[f"dtype:{_fmt}"] = ("fp8 queries are not posed to flashinfer (they need q, k, v of "
                               "one fp8 dtype, window_left -1 and per-head scale_q/k/v)")
#: flashinfer prefill never validates head_dim (open issue flashinfer #4299): a head dim that is
#: not a multiple of 64 faults or is silently wrong, so only multiples of 64 are claimed.
HEAD_DIM_WORDS = ("flashinfer claims head dims that are multiples of 64 (flashinfer-ai/"
                  "flashinfer #4299: FA2 prefill never validates head_dim; others fault or are "
                  "silently wrong)")

_NOT = {"dropout", "alibi-per-batch", "sink", "sink-tokens", "padded", "packed", "append",
        "rotary", "leftpad", "batch-idx", "splits", "dout-strided"}
CUDA_FEATURES = (frozenset(DEFAULT_FEATURES) - _NOT) | {"mla", "latent-kv", "fp8-kv"}

FLAVOR_CAPABILITIES: dict[str, Capabilities] = {
    "cuda": Capabilities(
        dtypes=FP16, head_dim_max=256, head_dim_multiple=64, features=CUDA_FEATURES,
        entries=frozenset({"dense", "varlen", "kvcache"}), backward=False, returns_lse=True,
        exclusive=(("alibi", "softcap"),), head_dims_v=(((192, 192), (128, 128)),),
        notes=dict(_WORDS),
    ),
    # ROCm/flashinfer README "Known Limitations": backend="auto" routes fp16/bf16 NHD batch
    # prefill and decode to AITER, where ALiBi slopes, sinks and the fp8 dequant scales are
    # "silently ignored" ("can produce wrong results"); gfx942 and gfx950.
    "rocm": Capabilities(
        dtypes=FP16, head_dim_max=256, head_dim_multiple=64,
        features=CUDA_FEATURES - {"alibi", "fp8-kv", "mla"},
        entries=frozenset({"dense", "varlen", "kvcache"}), backward=False, returns_lse=True,
        notes={**_WORDS,
               "alibi": f"ALiBi slopes are silently ignored on the AITER path ({ROCM_SOURCE})",
               "fp8-kv": f"fp8 dequant scales are silently ignored on the AITER path; fp8 KV is "
                         f"E4M3FNUZ on the HIP batch-decode path only ({ROCM_SOURCE})",
               "mla": f"the AITER path needs equal q/kv head dims ({ROCM_SOURCE})",
               "sink": f"sinks are silently ignored on the AITER path ({ROCM_SOURCE})"},
    ),
    # flashinfer@TARGET: what the API can express, sinks included (run(sinks=...), natural-log
    # logits per query head); the module narrows.
    "module": Capabilities(
        dtypes=FP16, head_dim_max=0, features=CUDA_FEATURES | {"sink"},
        entries=frozenset({"dense", "varlen", "kvcache"}), backward=False, returns_lse=True,
        exclusive=(("alibi", "softcap"),), notes=dict(_WORDS),
    ),
}
#: gfx targets of the ROCm port (README: gfx942 and gfx950).
ROCM_ARCHS = ("gfx942", "gfx950")

#: case feature -> the keyword(s) of the entry's function(s) that express it (for the
#: wrappers: of ``plan`` and ``run``).
FEATURE_KEYWORDS = {
    "scale": {"*": ("sm_scale",)},
    "window": {"*": ("window_left",)},
    "softcap": {"*": ("logits_soft_cap",)},
    "alibi": {"*": ("pos_encoding_mode",)},
    "sink": {"*": ("sinks",)},
    "fp8-kv": {"*": ("k_scale",)},
    "mla": {"varlen": ("head_dim_vo",), "kvcache": ("head_dim_vo",)},
}


def rules(case: Case) -> list[str]:
    """The refusals no capability field says: a right window, causal with more queries than
    keys (single prefill), ALiBi where flashinfer's sign differs, random slopes, per-head or
    fnuz fp8 caches."""
    out = []
    left, right = case.mask_window
    if right > 0:
        out.append(f"window right side {right}: flashinfer has only window_left (plan's "
                   f"window_right != 0 raises NotImplementedError except on cute-dsl: "
                   f"flashinfer/decode.py @ {SOURCE})")
    causal = right == 0
    if causal and case.entry == "dense" and case.seqlen_q > case.seqlen_k:
        out.append("causal with seqlen_q > seqlen_k: \"When mask_mode is set to "
                   "MaskMode::kCausal, kv_len must be greater than or equal to qo_len\" "
                   f"(include/flashinfer/attention/prefill.cuh l.2535 @ {SOURCE})")
    if case.alibi and not causal:
        out.append("ALiBi without a causal mask: flashinfer's bias is slope * (kv_idx - qo_idx) "
                   f"(variants.cuh l.68-70 @ {SOURCE}), opposite in sign to flash-attn's "
                   "-slope * |i + sk - sq - j| for keys right of the diagonal")
    if case.alibi and case.alibi_slopes != "standard":
        out.append(f"alibi_slopes={case.alibi_slopes}: flashinfer's slopes are fixed, "
                   f"get_alibi_slopes(num_qo_heads) (flashinfer/utils.py l.209 @ {SOURCE})")
    if case.kv_fp8:
        if case.kv_dtype not in KV_FP8:
            out.append(f"kv_dtype={case.kv_dtype}: flashinfer maps float8_e4m3fn and "
                       f"float8_e5m2 (flashinfer/jit/utils.py @ {SOURCE}), not fnuz")
        if case.fp8_recipe != "per-tensor":
            out.append(f"fp8_recipe={case.fp8_recipe}: k_scale and v_scale are one float per "
                       f"tensor (run(k_scale=...), prefill.py @ {SOURCE}); per-head scales "
                       "exist only for fp8 queries")
    return out


def decode_path(case: Case) -> bool:
    """Whether the case is one query per sequence of equal head dims: the decode kernels."""
    if case.dv != case.head_dim:
        return False
    if case.entry == "varlen":
        return bool(case.seqlens_q) and all(n == 1 for n in case.seqlens_q)
    return case.seqlen_q == 1


def paged_description(inputs, device) -> dict[str, Any]:
    """The paged-KV description of a case's keys: ``indptr``, ``indices``, ``last_page_len``
    (int32 on ``device``), ``page_size`` and the ``(k_cache, v_cache)`` pages (NHD)."""
    import torch

    case = inputs.case
    if case.entry == "varlen":
        lengths = list(case.seqlens_k)
    else:
        lengths = [int(n) for n in inputs.cache_seqlens.tolist()]
    if case.paged_block_size:
        size = case.paged_block_size
        k, v = inputs.k_pages, inputs.v_pages
        table = inputs.block_table.tolist()
        pages = [table[b][: -(-n // size)] for b, n in enumerate(lengths)]
    elif case.entry == "varlen":  # packed tokens: pages of one token
        size = 1
        k, v = inputs.k.unsqueeze(1), inputs.v.unsqueeze(1)
        starts = inputs.cu_seqlens_k.tolist()
        pages = [list(range(starts[b], starts[b] + n)) for b, n in enumerate(lengths)]
    else:  # a contiguous cache: one page per sequence, the capacity long
        size = case.seqlen_k
        k, v = inputs.k, inputs.v
        pages = [[b] if n else [] for b, n in enumerate(lengths)]
    indptr = [0]
    for p in pages:
        indptr.append(indptr[-1] + len(p))
    last = [n - (len(p) - 1) * size if p else 0 for n, p in zip(lengths, pages, strict=True)]

    def int32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    return {"indptr": int32(indptr), "indices": int32([i for p in pages for i in p]),
            "last_page_len": int32(last), "page_size": size, "cache": (k, v),
            "lengths": lengths}


class FlashInferBackend(ModuleBackend):
    """flashinfer's single prefill/decode functions and its paged batch wrappers."""

    family = "flashinfer"
    default_module = "flashinfer"
    device_types = ("cuda",)
    entry_functions = {"dense": "single_prefill_with_kv_cache",
                       "varlen": "BatchPrefillWithPagedKVCacheWrapper",
                       "kvcache": "BatchPrefillWithPagedKVCacheWrapper"}
    feature_keywords = FEATURE_KEYWORDS
    convention = CONVENTION

    def __init__(self, module: Any = None, target: str | None = None,
                 flavor: str | None = None) -> None:
        import torch

        error = ""
        if module is None and target is None:
            module, error = import_default(self.default_module)
        if flavor is None:
            hip = bool(getattr(torch.version, "hip", None))
            flavor = "module" if target is not None else ("rocm" if hip else "cuda")
        super().__init__(module, target, base=FLAVOR_CAPABILITIES[flavor], import_error=error)
        self.flavor = flavor if module is not None else ""
        self._workspace: dict[str, Any] = {}
        if module is not None and target is None:
            self.version = distribution_version() or self.version

    def unavailable_reason(self) -> str:
        if "No module named 'flashinfer'" in self._error:
            return ("flashinfer is not installed (PyPI flashinfer-python; the ROCm port is "
                    "amd-flashinfer from pypi.amd.com)")
        return f"import flashinfer failed: {self._error}"

    def availability(self) -> str | None:
        import torch

        reason = super().availability()
        if reason is None and self.target is None and not torch.cuda.is_available():
            return "no GPU here: flashinfer runs on NVIDIA GPUs (and AMD gfx942/gfx950 as the " \
                   "ROCm port)"
        return reason

    def signature(self, entry: str) -> Signature:
        """A wrapper class's keywords are those of its ``plan`` and ``run``."""
        func = self.function(entry)
        if func is None:
            return Signature((), False, {})
        if not isinstance(func, type):
            return Signature.of(func)
        sigs = [Signature.of(m) for m in (getattr(func, "plan", None), getattr(func, "run", None))
                if m is not None]
        params = tuple(dict.fromkeys(n for sig in sigs for n in sig.params))
        defaults = {k: v for sig in sigs for k, v in sig.defaults.items()}
        return Signature(params, any(sig.var_kw for sig in sigs), defaults)

    def unsupported_reasons(self, case: Case, target) -> list[str]:
        reasons = super().unsupported_reasons(case, target)
        generic = f"head_dim={case.head_dim} is not a multiple of 64"
        reasons = [HEAD_DIM_WORDS if r == generic else r for r in reasons]
        if self.flavor == "rocm" and target.vendor == "amd" and target.arch not in ROCM_ARCHS:
            reasons.insert(0, f"{target.arch} is not a target of flashinfer's ROCm port "
                              f"({', '.join(ROCM_ARCHS)})")
        return list(dict.fromkeys(reasons + rules(case)))

    # ------------------------------------------------------------------------------ calling

    def _buffer(self, device):
        """A 128 MiB workspace per device (flashinfer's examples allocate this much)."""
        import torch

        key = str(device)
        if key not in self._workspace:
            self._workspace[key] = torch.empty(128 << 20, dtype=torch.uint8, device=device)
        return self._workspace[key]

    def _options(self, inputs) -> dict[str, Any]:
        """The mask and logit options every call takes (decode has no ``causal``: one query
        sees every key under a bottom-right causal mask)."""
        case = inputs.case
        left, _ = case.mask_window
        return {"sm_scale": case.scale, "window_left": left,
                "logits_soft_cap": case.softcap or None,
                "pos_encoding_mode": "ALIBI" if case.alibi else "NONE"}

    def forward(self, inputs, *, deterministic: bool = True):
        from harness.exact.outputs import Outputs

        case = inputs.case
        scales: dict[str, Any] = {}
        if case.kv_fp8:  # one float per tensor (per-tensor recipe: every entry is the same)
            scales = {"k_scale": float(inputs.k_descale.flatten()[0]),
                      "v_scale": float(inputs.v_descale.flatten()[0])}
        heads_major = case.layout == "v-transposed"
        if case.entry == "dense":
            out, lse2 = self._dense(inputs, scales, heads_major)
        else:
            out, lse2 = self._batch(inputs, scales, heads_major)
        return Outputs(out=out, lse=self._harness_lse(lse2, inputs))

    def _dense(self, inputs, scales, heads_major):
        """One single_prefill (or single_decode) call per sequence; results stacked."""
        import torch

        case = inputs.case
        fi = self._module
        opts = self._options(inputs)
        causal = case.mask_window[1] == 0
        layout = "HND" if heads_major else "NHD"
        decode = decode_path(case) and callable(getattr(fi, "single_decode_with_kv_cache", None))
        outs, lses = [], []
        for b in range(case.batch):
            k, v = inputs.k[b], inputs.v[b]
            if heads_major:
                k, v = k.transpose(0, 1), v.transpose(0, 1)
            if decode:
                o, s = take_return(fi.single_decode_with_kv_cache(
                    inputs.q[b, 0], k, v, kv_layout=layout,
                    use_tensor_cores=case.group_size not in DECODE_GROUP_SIZES,
                    return_lse=True, **opts, **scales), "single_decode_with_kv_cache", "(out, lse)")
                o, s = o[None], s[None]
            else:
                o, s = take_return(fi.single_prefill_with_kv_cache(
                    inputs.q[b], k, v, causal=causal, kv_layout=layout, return_lse=True,
                    **opts, **scales), "single_prefill_with_kv_cache", "(out, lse)")
            outs.append(o)
            lses.append(s)
        return torch.stack(outs), torch.stack(lses)  # (b, sq, h, dv), (b, sq, h)

    def _batch(self, inputs, scales, heads_major):
        """The paged wrappers: plan, then run with the cache as a (k, v) tuple."""
        import torch

        case = inputs.case
        fi = self._module
        device = inputs.q.device
        paged = paged_description(inputs, device)
        k, v = paged["cache"]
        if heads_major:  # [pages, H, page, D]
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        layout = "HND" if heads_major else "NHD"
        q = inputs.q if case.entry == "varlen" else inputs.q.reshape(-1, *inputs.q.shape[2:])
        opts = self._options(inputs)
        causal = case.mask_window[1] == 0
        run_kw: dict[str, Any] = {"return_lse": True, **scales}
        if case.learnable_sink:
            run_kw["sinks"] = inputs_value(inputs, "learnable_sink")
        decoder = getattr(fi, "BatchDecodeWithPagedKVCacheWrapper", None)
        common = (paged["indptr"], paged["indices"], paged["last_page_len"], case.heads_q,
                  case.heads_kv, case.head_dim, paged["page_size"])
        types = {"q_data_type": q.dtype, "kv_data_type": k.dtype}
        if decode_path(case) and decoder is not None:
            wrapper = decoder(self._buffer(device), kv_layout=layout,
                              use_tensor_cores=case.group_size not in DECODE_GROUP_SIZES)
            wrapper.plan(*common, **opts, **types)
        else:
            if case.entry == "varlen":
                qo_indptr = inputs.cu_seqlens_q
            else:
                qo_indptr = torch.arange(0, (case.batch + 1) * case.seqlen_q, case.seqlen_q,
                                         dtype=torch.int32, device=device)
            wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(self._buffer(device),
                                                             kv_layout=layout)
            wrapper.plan(qo_indptr, *common, head_dim_vo=case.dv, causal=causal, **opts, **types)
        out, lse2 = take_return(wrapper.run(q, (k, v), **run_kw), "run", "(out, lse)")
        if case.entry == "kvcache":
            out = out.reshape(*inputs.q.shape[:-1], case.dv)
            lse2 = lse2.reshape(case.batch, case.seqlen_q, case.heads_q)
        return out, lse2

    def _harness_lse(self, lse2, inputs):
        """flashinfer's base-2 ``[tokens, heads]`` lse as the harness's natural-log ``(batch,
        heads, seqlen_q)`` / ``(heads, total_q)``, with ALiBi's per-sequence shift ``slope *
        (sk - sq)`` taken off (the raw-index bias adds it to every logit of the sequence)."""
        import torch

        case = inputs.case
        lse = lse2.float() * math.log(2.0)
        lse = lse.t() if case.entry == "varlen" else lse.permute(0, 2, 1)
        if case.alibi:
            from harness.exact.inputs import alibi_slopes

            slopes = torch.tensor(alibi_slopes(case.heads_q), dtype=torch.float32,
                                  device=lse.device)
            if case.entry == "varlen":  # per token: its sequence's sk - sq
                shift = [float(sk - sq) for sq, sk in zip(case.seqlens_q, case.seqlens_k,
                                                          strict=True) for _ in range(sq)]
                lse = lse - slopes[:, None] * torch.tensor(shift, device=lse.device)[None, :]
            else:  # per batch row (a kv-cache row's keys are its cache_seqlens)
                keys = (inputs.cache_seqlens.tolist() if case.entry == "kvcache"
                        else [case.seqlen_k] * case.batch)
                shift = torch.tensor([float(n - case.seqlen_q) for n in keys],
                                     device=lse.device)
                lse = lse - slopes[None, :, None] * shift[:, None, None]
        return lse.contiguous()


def distribution_version() -> str:
    """The installed flashinfer's version ('' when none), without importing it."""
    for dist in DISTRIBUTIONS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


def machine_facts() -> dict[str, str]:
    """flashinfer's version when installed (``flashinfer-python``, or ``amd-flashinfer``)."""
    version = distribution_version()
    return {"flashinfer": version} if version else {}
