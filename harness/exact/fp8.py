"""FP8 attention (issue 14): formats, quantised inputs, the emulating baseline and the rule.

**Formats.** ``float8_e4m3fn`` (OCP, max 448: NVIDIA sm_89/sm_90+, AMD gfx950),
``float8_e4m3fnuz`` (no negative zero, exponent bias 8, max 240: AMD gfx942) and ``float8_e5m2``
(OCP, max 57344). The same byte means twice as much in e4m3fn as in e4m3fnuz, so a port that
feeds one format to a kernel built for the other is off by a factor of two and can look
plausible. :data:`ARCH_FORMATS` says which formats each target's kernels take.

**Inputs** (:func:`make_fp8_inputs`) are drawn in float32 like every other case, then quantised
as a user would, with torch casts that are identical on every machine:
``q_fp8 = (q / scale).clamp(-max, max).to(fp8)``; the kernel receives ``descale = scale``
(float32, ``(batch, heads_kv)`` as FA3's ``q_descale``/``k_descale``/``v_descale``; AITER's
``flash_attn_fp8_pertensor_func`` takes one per tensor). The scale is fixed by the case
(``fp8_scales``) or ``amax / max`` over the tensor (``per-tensor``) or over each batch row and kv
head (``per-head``; for q, over the query heads that share the kv head).

**The reference** (:func:`fp8_reference`) is the exact float64 attention of the *dequantised*
values ``fp8 * descale``: quantising the inputs is the user's choice, not the kernel's error.

**The baseline** (:func:`fp8_baseline`) emulates an fp8 kernel's precision: products of the fp8
values accumulated in float32 and scaled by the descales, softmax in float32, the unnormalised
probabilities ``P = exp(s - rowmax)`` scaled by ``2**offset`` (FA3 uses 8 for e4m3fn, "so that
P is in [0, 256]", ``hopper/softmax.h``) and rounded to the case's fp8 format before the ``P V``
product, accumulated in float32 and divided by the float32 row sum. Why fp8 ``P``: an fp8 kernel
feeds ``P`` to an fp8 tensor-core product (FA3 converts it to the input type; that is what makes
the second GEMM fp8 at all), so each probability carries a relative error of up to 2**-4 for
e4m3, far above anything float32 or bf16 accumulation adds; a baseline that kept ``P`` in float32
or bf16 would err ten times less than every correct fp8 kernel, and the rule would flag them all.
Emulating that one rounding (as FA3's own test does with ``intermediate_dtype``) makes the
baseline's error the error an fp8 kernel is entitled to, and nothing more: a kernel that rounds
``P`` more coarsely (e5m2) or reads the wrong scale stands out against it.

**FP8 KV caches with 16-bit queries** (``Case.kv_dtype``, issue 26): k and v are quantised as
above (``fp8_scales`` is ``[k, v]``), q stays in the case's 16-bit dtype and the kernel returns
that dtype. The reference is exact on ``fp8 * descale``. The baseline (:func:`kv_baseline`)
emulates the dequantisation vLLM's kernels do: each fp8 element times its scale in float32,
rounded to the queries' dtype (``scaled_convert`` in csrc/quantization/fp8/nvidia/
quant_utils.cuh: "Dequant(FP8) * scale => HP"), then the same-precision baseline at that dtype
(products accumulated in float32, ``P`` at the dtype). vLLM's scales are per tensor
(``k_scale``/``v_scale`` of shape ``[1]``) or per kv head; ``fp8_recipe`` gives either.

**The rule** (FA3's, ``hopper/test_flash_attn.py``)::

    max|out - ref| <= k * max|baseline - ref| + atol,   k = 2, or 3 with softcap,
    atol = 2 * max|(ref + 0.3 - 0.3) - ref|   (computed at the kernel's output dtype)

plus, because the max rule cannot tell an e5m2 ``P`` (twice e4m3's rounding) from noise at
``k = 2``, a mean rule over cases with at least :data:`MEAN_MIN_ELEMENTS` judged elements:
``mean|out - ref| <= K_MEAN * mean|baseline - ref| + mean|round(ref) - ref|`` (rounding to
the output dtype; the FA4 fp8 test bounds the mean
error against the same emulated baseline, with 3). The lse is judged with the same ``k`` and a
relative floor of 2**-10 (room for tensor-core accumulation narrower than IEEE float32). The
cosine similarity and AITER's ``calc_diff`` (``1 - 2 sum(xy) / sum(x^2 + y^2)``, from its
``op_tests``, adapted from DeepGEMM's tests) are recorded, not judged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from harness.case import FP8_DTYPES, Case
from harness.exact.inputs import TORCH_DTYPES, make_inputs
from harness.exact.judge import Comparison, Verdict, compare
from harness.exact.outputs import Outputs
from harness.exact.reference import (
    BLOCK_ELEMS,
    _empty_result,
    _no_keys,
    _row_mask,
    baseline,
    case_sinks,
    ieee_float32,
    reference,
)
from harness.exact.scores import Params, Precision, logits, with_sink

if TYPE_CHECKING:
    from harness.exact.inputs import Inputs
    from harness.target import Target


@dataclass(frozen=True)
class Format:
    """One fp8 number format.

    Attributes:
        name: torch's dtype name.
        max: largest finite value.
        p_offset: ``P`` is scaled by ``2**p_offset`` before its fp8 rounding (the largest power
            of two not above ``max``; FA3 uses 8 for e4m3fn).
        source: where the numbers come from.
    """

    name: str
    max: float
    p_offset: int
    source: str

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.name)


FORMATS: dict[str, Format] = {
    "float8_e4m3fn": Format("float8_e4m3fn", 448.0, 8,
                            "OCP 8-bit floating point spec (E4M3: max 448, NaN only, no inf); "
                            "FA3 hopper/softmax.h subtracts 8 from the max for FP8 so P is in "
                            "[0, 256]"),
    "float8_e4m3fnuz": Format("float8_e4m3fnuz", 240.0, 7,
                              "torch.finfo(torch.float8_e4m3fnuz).max = 240 (bias 8, no -0)"),
    "float8_e5m2": Format("float8_e5m2", 57344.0, 15, "OCP 8-bit floating point spec (E5M2)"),
}

#: Which fp8 formats each target's kernels take, matched as an arch prefix (first match wins).
#: ``()`` means no fp8 tensor cores. CPUs take every format (the harness's own emulation).
ARCH_FORMATS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("gfx942", ("float8_e4m3fnuz",),
     "ROCm/aiter aiter/utility/dtypes.py defaultDtypes: gfx942 fp8 = torch.float8_e4m3fnuz "
     "(MI300X, MI325X; CDNA 3's fp8 is the fnuz variant, so OCP e5m2 is not taken either)"),
    ("gfx950", ("float8_e4m3fn", "float8_e5m2"),
     "ROCm/aiter aiter/utility/dtypes.py: gfx950 fp8 = torch.float8_e4m3fn (MI350X, MI355X; "
     "CDNA 4 moved to the OCP formats, e4m3fn and e5m2)"),
    ("gfx12", ("float8_e4m3fn",),
     "ROCm/aiter aiter/utility/dtypes.py: gfx1200, gfx1201, gfx1250 fp8 = torch.float8_e4m3fn"),
    ("gfx", (), "no fp8 format in ROCm/aiter aiter/utility/dtypes.py for this architecture "
                "(gfx90a MI200 and RDNA 3 have no fp8 matrix instructions)"),
    ("sm_8", (), "NVIDIA Ampere (sm_80, sm_86) has no fp8 tensor cores; Ada (sm_89) does"),
    ("sm_", ("float8_e4m3fn", "float8_e5m2"),
     "NVIDIA Hopper/Ada/Blackwell tensor cores take FP8 E4M3 and E5M2 (NVIDIA H100 whitepaper); "
     "FA3's fp8 kernels take float8_e4m3fn only (hopper/test_flash_attn.py)"),
)
#: sm_89 is Ada, with fp8 tensor cores, although it starts like the Ampere prefix.
_ARCH_EXCEPTIONS = {"sm_89": ("float8_e4m3fn", "float8_e5m2")}

K_OUT = 2.0
K_SOFTCAP = 3.0
#: The mean rule's multiple (see the module docstring): a correct kernel's mean error sits near
#: the baseline's (the same roundings at other points); an e5m2 ``P`` doubles it.
K_MEAN = 1.5
#: Fewest judged output elements for the mean rule (the mean of fewer is too noisy to judge).
MEAN_MIN_ELEMENTS = 512
#: Relative floor of the lse rule.
LSE_REL_FLOOR = 2.0 ** -10
#: Smallest amax scaling (AITER's ``_cast_to_fp8`` clamps amax at 1e-9 the same way).
AMAX_FLOOR = 1e-9


def is_fp8(dtype: str) -> bool:
    """Whether a case dtype name is an fp8 format."""
    return dtype in FP8_DTYPES


def is_fp8_case(case: Case) -> bool:
    """Whether a case has fp8 inputs: an fp8 dtype or an fp8 KV cache (``kv_dtype``)."""
    return case.dtype in FP8_DTYPES or getattr(case, "kv_dtype", "") in FP8_DTYPES


def fp8_format(case: Case) -> str:
    """The fp8 format of a case's fp8 inputs: ``kv_dtype`` or its dtype."""
    return getattr(case, "kv_dtype", "") or case.dtype


# ---------------------------------------------------------------------------- targets


def target_formats(target: Target) -> tuple[tuple[str, ...], str] | None:
    """``(formats, source)`` of the fp8 formats ``target``'s kernels take; None on a CPU (any)."""
    if target.vendor == "cpu":
        return None
    arch = target.arch
    if arch in _ARCH_EXCEPTIONS:
        return _ARCH_EXCEPTIONS[arch], "NVIDIA Ada (sm_89) tensor cores take FP8 E4M3 and E5M2"
    for prefix, formats, source in ARCH_FORMATS:
        if arch.startswith(prefix):
            return formats, source
    return (), f"no fp8 format is known for {arch}"


def fp8_reasons(case: Case, target: Target) -> list[str]:
    """Why an fp8 case should not run on ``target`` (empty: it may). For the dispatcher: a
    non-empty list is a skip with that reason, and ``--audit`` runs the case anyway to show
    whether the kernel refuses the format or silently misreads it."""
    if not is_fp8_case(case):
        return []
    known = target_formats(target)
    if known is None:
        return []
    formats, source = known
    fmt = fp8_format(case)
    field = "kv_dtype" if fmt != case.dtype else "dtype"
    if fmt in formats:
        return []
    if not formats:
        return [f"{target.arch} kernels take no fp8 format ({source}); {field}={fmt}"]
    what = " for the KV cache (kv_dtype)" if field == "kv_dtype" else ""
    return [f"{target.arch} kernels take {', '.join(formats)}, not {fmt}{what} ({source}); "
            "--audit runs it anyway"]


# ----------------------------------------------------------------------------- inputs


def _q_group(case: Case) -> int:
    return case.heads_q // case.heads_kv


def _token_rows(inputs: Inputs, tokens: str) -> torch.Tensor | None:
    """For varlen, the batch row of every packed token (``tokens`` = q or k); None otherwise."""
    if inputs.case.entry != "varlen":
        return None
    cu = inputs.cu_seqlens_q if tokens == "q" else inputs.cu_seqlens_k
    lengths = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)


def expand_descale(descale: torch.Tensor, like: torch.Tensor, inputs: Inputs,
                   tensor: str) -> torch.Tensor:
    """A ``(batch, heads_kv)`` descale broadcast to ``like`` (q, k or v of ``inputs``)."""
    d = descale
    if tensor == "q" and _q_group(inputs.case) > 1:
        d = d.repeat_interleave(_q_group(inputs.case), dim=1)
    rows = _token_rows(inputs, "q" if tensor == "q" else "k")
    if rows is not None:  # (total, h, d)
        return d[rows][:, :, None]
    return d[:, None, :, None]  # (batch, s, h, d)


def _amax(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.nan_to_num(t.detach().float().abs(), nan=0.0).amax(dim=dims)


def _scales(inputs: Inputs, fmt: Format, names: str = "qkv") -> dict[str, torch.Tensor]:
    """The float32 scales ``(batch, heads_kv)`` of ``names`` (q, k, v; an fp8 KV cache: k, v)
    for the case's recipe. With ``layout = "latent-kv"`` v shares k's bytes and so its scale."""
    case = inputs.case
    shape = (case.batch, case.heads_kv)
    dev = inputs.device
    if case.fp8_scales is not None:
        return {name: torch.full(shape, float(s), dtype=torch.float32, device=dev)
                for name, s in zip(names, case.fp8_scales, strict=True)}
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "v" and case.layout == "latent-kv":
            out[name] = out["k"]
            continue
        t = getattr(inputs, name)
        if case.fp8_recipe == "per-tensor":
            amax = _amax(t, tuple(range(t.dim()))).expand(shape)
        else:
            amax = torch.zeros(shape, dtype=torch.float32, device=dev)
            for b, piece in enumerate(inputs.sequences()):
                part = piece.q_like(t) if name == "q" else piece.kv_like(t)
                if part.numel() == 0:
                    continue
                per = _amax(part, (1, 3))  # (B, h)
                if name == "q":
                    per = per.view(per.shape[0], case.heads_kv, -1).amax(-1)
                if piece.packed:
                    amax[b] = per[0]
                else:
                    amax[piece.rows] = per
        out[name] = (amax.clamp_min(AMAX_FLOOR) / fmt.max).float().contiguous()
    return out


def quantise(x: torch.Tensor, scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``(x / scale).clamp(-max, max).to(fp8)`` in float32, keeping ``x``'s strides and gaps
    (NaN gaps stay NaN). ``scale`` broadcasts against ``x``."""
    values = (x.float() / scale).clamp(-fmt.max, fmt.max).to(fmt.dtype)
    if x.is_contiguous():
        return values
    size = x.untyped_storage().nbytes() // x.element_size()
    buf = torch.full((size,), math.nan, dtype=torch.float32, device=x.device).to(fmt.dtype)
    view = buf.as_strided(x.shape, x.stride(), x.storage_offset())
    view.copy_(values)
    return view


def make_fp8_inputs(case: Case, device: str | torch.device = "cpu", seed: int = 0) -> Inputs:
    """The inputs of an fp8 case: float32 draws quantised with the case's scales (an fp8 KV
    cache: k and v quantised, q rounded to the case's 16-bit dtype).

    The float32 values are those :func:`harness.exact.inputs.make_inputs` draws for the case's
    float32 twin (same fields, dtype float32, fp8 fields off), so they are seeded from the fp8 case
    through the twin's id and identical on every machine.
    """
    kv_only = case.dtype not in FP8_DTYPES
    fmt = FORMATS[fp8_format(case)]
    twin = case.replace(dtype="float32", fp8_recipe="per-tensor", fp8_scales=None,
                        fp8_out="bfloat16", kv_dtype="")
    inputs = make_inputs(twin, device, seed)
    inputs = dataclasses.replace(inputs, case=case)
    names = "kv" if kv_only else "qkv"
    scales = _scales(inputs, fmt, names)
    changes: dict[str, Any] = {}
    for name in names:
        t = getattr(inputs, name)
        if name == "v" and case.layout == "latent-kv":  # k's first head_dim_v dims, quantised
            changes["v"] = changes["k"][..., : case.dv]
            continue
        changes[name] = quantise(t, expand_descale(scales[name], t, inputs, name), fmt)
    if kv_only:
        changes["q"] = inputs.q.to(TORCH_DTYPES[case.dtype])
        changes["dout"] = inputs.dout.to(TORCH_DTYPES[case.dtype])
    if inputs.k_pages is not None and inputs.block_table is not None:
        page_scale = _page_scales(inputs, scales)
        changes["k_pages"] = quantise(inputs.k_pages, page_scale["k"], fmt)
        changes["v_pages"] = (changes["k_pages"][..., : case.dv] if case.layout == "latent-kv"
                              else quantise(inputs.v_pages, page_scale["v"], fmt))
    changes.update(q_descale=None if kv_only else scales["q"], k_descale=scales["k"],
                   v_descale=scales["v"])
    return dataclasses.replace(inputs, **changes)


def _page_scales(inputs: Inputs, scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per page, the scale of the batch row owning it (spare pages take row 0's)."""
    table = inputs.block_table.long()
    owner = torch.zeros(inputs.k_pages.shape[0], dtype=torch.long, device=table.device)
    rows = torch.arange(table.shape[0], device=table.device)[:, None].expand_as(table)
    owner[table.flatten()] = rows.flatten()
    return {name: scales[name][owner][:, None, :, None] for name in ("k", "v")}


def dequantised(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Inputs:
    """A shallow copy whose q, k, v are the exact values ``fp8 * descale`` at ``dtype`` (and
    whose descales are None: they are applied). With an fp8 KV cache q is only widened."""
    changes: dict[str, Any] = {"q_descale": None, "k_descale": None, "v_descale": None}
    for name in "qkv":
        t = getattr(inputs, name)
        descale = getattr(inputs, f"{name}_descale")
        if descale is None:  # the 16-bit queries of an fp8 KV cache
            changes[name] = t.to(dtype)
            continue
        changes[name] = t.to(dtype) * expand_descale(descale.to(dtype), t, inputs, name)
    return dataclasses.replace(inputs, **changes)


def kv_dequantised(inputs: Inputs) -> Inputs:
    """An fp8 KV cache as a 16-bit kernel reads it: each element times its scale in float32,
    rounded to the queries' dtype (vLLM's ``scaled_convert``); q as it is, descales None."""
    dtype = inputs.q.dtype
    changes: dict[str, Any] = {"k_descale": None, "v_descale": None}
    for name in "kv":
        t = getattr(inputs, name)
        descale = getattr(inputs, f"{name}_descale")
        changes[name] = (t.float() * expand_descale(descale.float(), t, inputs, name)).to(dtype)
    return dataclasses.replace(inputs, **changes)


def kv_baseline(inputs: Inputs, **kwargs: Any) -> Outputs:
    """The baseline of an fp8 KV cache with 16-bit queries: the same-precision baseline
    (:func:`harness.exact.reference.baseline`) of the cache as :func:`kv_dequantised` reads it."""
    return baseline(kv_dequantised(inputs), **kwargs)


def fp8_reference(inputs: Inputs, **kwargs: Any) -> Outputs:
    """The exact attention of the dequantised inputs (float64; see the module docstring).
    ``kwargs`` go to :func:`harness.exact.reference.reference` (``rows``, ``params``, ...), which
    dequantises fp8 inputs itself too."""
    kwargs.setdefault("dtype", torch.float64)
    return reference(dequantised(inputs), **kwargs)


# ---------------------------------------------------------------------------- baseline


def _piece_descales(inputs: Inputs, index: int, piece) -> tuple[torch.Tensor, ...]:
    rows = slice(index, index + 1) if piece.packed else piece.rows
    return tuple(getattr(inputs, f"{n}_descale")[rows].float() for n in "qkv")


def _slopes_for(inputs: Inputs, index: int, piece, B: int) -> torch.Tensor | None:
    slopes = inputs.alibi_slopes if inputs.case.alibi else None
    if slopes is None:
        return None
    if slopes.dim() == 1:
        return slopes.float().expand(B, -1)
    rows = slice(index, index + 1) if piece.packed else piece.rows
    return slopes[rows].float()


def baseline_block(q8, k8, v8, descales, p: Params, fmt: Format, slopes=None, *,
                   rows=None, seqlen_q=None, sinks=None):
    """fp8-emulating attention of one uniform batch (see the module docstring).

    Args:
        q8: ``(B, n, Hq, d)`` fp8; k8, v8: ``(B, sk, Hkv, d)`` fp8.
        descales: float32 ``(B, Hkv)`` descales of q, k, v.
        p: scale, window, softcap.
        fmt: the format ``P`` is rounded to.
        slopes: float32 ALiBi slopes ``(B, Hq)`` or None.
        rows: int64 positions of q's rows among ``seqlen_q`` (default all, in order).
        sinks: float32 learnable sink logits ``(Hq,)`` or None.

    Returns:
        ``(out float32 (B, n, Hq, dv), lse float32 (B, Hq, n))``; rows seeing no key 0 / -inf
        (the sink, with one).
    """
    B, n, Hq, d = q8.shape
    sk, Hkv, dv = k8.shape[1], k8.shape[2], v8.shape[-1]
    seqlen_q = n if seqlen_q is None else seqlen_q
    rows = torch.arange(n, device=q8.device) if rows is None else rows
    qd, kd, vd = descales
    s, _, _ = logits(q8.reshape(B, n, Hkv, Hq // Hkv, d), k8, p, rows=rows, off=sk - seqlen_q,
                     slopes=slopes, precision=Precision.FP8, descale=qd * kd)
    s = with_sink(s, sinks)  # the learnable sink's column: in the max and the sum, not in P V
    m = s.amax(-1)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    prob = torch.exp(s - m_safe[..., None])
    l_sum = prob.sum(-1)
    lifted = 2.0 ** fmt.p_offset
    p8 = (prob[..., :sk] * lifted).to(fmt.dtype).float()
    o = torch.einsum("bhgij,bjhd->bhgid", p8, v8.float()) * vd.view(B, Hkv, 1, 1, 1)
    seen = l_sum > 0
    o = torch.where(seen[..., None], o / (l_sum * lifted).clamp_min(1e-30)[..., None], 0.0)
    lse = torch.where(seen, m + torch.log(l_sum.clamp_min(1e-30)), -math.inf)
    return o.permute(0, 3, 1, 2, 4).reshape(B, n, Hq, dv), lse.reshape(B, Hq, n)


@ieee_float32
def fp8_baseline(inputs: Inputs, *, rows: list[torch.Tensor | None] | None = None,
                 block_elems: int = BLOCK_ELEMS) -> Outputs:
    """The fp8-emulating baseline of a case: out float32 (rounded to the kernel's output dtype
    by :func:`fp8_verdict`), lse float32. ``rows`` samples query rows as in
    :func:`harness.exact.reference.reference`."""
    case = inputs.case
    if case.dtype not in FP8_DTYPES:
        raise ValueError("an fp8 KV cache with 16-bit queries: the baseline is kv_baseline")
    fmt = FORMATS[case.dtype]
    p = Params.of(case)
    sinks = case_sinks(inputs, torch.float32)
    result = _empty_result(inputs, torch.float32, torch.float32, False)
    result.rows = _row_mask(inputs, rows)
    with torch.no_grad():
        for index, piece in enumerate(inputs.sequences()):
            q, k, v = piece.q_like(inputs.q), piece.kv_like(inputs.k), piece.kv_like(inputs.v)
            if q.shape[1] == 0 or k.shape[1] == 0:
                _no_keys(piece, result.lse, sinks, q.shape[1])
                continue
            B, n = q.shape[0], q.shape[1]
            descales = _piece_descales(inputs, index, piece)
            slopes = _slopes_for(inputs, index, piece, B)
            chosen = rows[index] if rows is not None else None
            positions = chosen if chosen is not None else torch.arange(n, device=q.device)
            step = max(1, block_elems // max(1, B * case.heads_q * k.shape[1]))
            outs, lses = [], []
            for i0 in range(0, len(positions), step):
                at = positions[i0:i0 + step]
                o, lse = baseline_block(q[:, at], k, v, descales, p, fmt, slopes, rows=at,
                                        seqlen_q=n, sinks=sinks)
                outs.append(o)
                lses.append(lse)
            o, lse = torch.cat(outs, 1), torch.cat(lses, 2)
            if chosen is not None:
                piece.put_q_rows(result.out, chosen, o)
                piece.put_lse_rows(result.lse, chosen, lse)
            else:
                piece.put_q(result.out, o)
                piece.put_lse(result.lse, lse)
    return result


# ----------------------------------------------------------------------------- judging


def fwd_atol(reference_out: torch.Tensor, out_dtype: torch.dtype,
             valid: torch.Tensor | None = None) -> float:
    """FA3's epsilon floor: ``2 * max|(ref + 0.3 - 0.3) - ref|`` with the arithmetic done at
    ``out_dtype`` (``hopper/test_flash_attn.py``: "numerical error if we just do any arithmetic
    on out_ref")."""
    ref = reference_out.detach().to(out_dtype)
    noise = ((ref + 0.3 - 0.3) - ref).abs().double()
    if valid is not None:
        noise = torch.where(valid, noise, torch.zeros_like(noise))
    noise = torch.nan_to_num(noise, nan=0.0, posinf=0.0)
    return 2.0 * float(noise.max()) if noise.numel() else 0.0


def similarity(kernel: torch.Tensor, ref: torch.Tensor,
               valid: torch.Tensor | None = None) -> dict[str, float | None]:
    """Cosine similarity of kernel and reference, and AITER's ``calc_diff`` (1 - 2 sum(xy) /
    sum(x^2 + y^2); 0 = identical), over the valid finite elements."""
    x = kernel.detach().double().flatten()
    y = ref.detach().to(x.device, torch.float64).flatten()
    keep = torch.isfinite(y) & torch.isfinite(x)
    if valid is not None:
        keep &= valid.to(x.device).flatten()
    x, y = x[keep], y[keep]
    xy, xx, yy = float(x @ y), float(x @ x), float(y @ y)
    cosine = xy / math.sqrt(xx * yy) if xx > 0 and yy > 0 else None
    diff = 1.0 - 2.0 * xy / (xx + yy) if xx + yy > 0 else 0.0
    return {"cosine": cosine, "calc_diff": diff}


@dataclass(frozen=True)
class MeanRule:
    """The mean-error rule's numbers (see the module docstring)."""

    err: float
    baseline_err: float
    allowed: float
    elements: int

    @property
    def judged(self) -> bool:
        return self.elements >= MEAN_MIN_ELEMENTS

    @property
    def ok(self) -> bool:
        return not self.judged or self.err <= self.allowed

    @property
    def ratio(self) -> float | None:
        return self.err / self.baseline_err if self.baseline_err > 0 else None

    def metrics(self) -> dict[str, Any]:
        return {"mean_err": self.err, "mean_baseline_err": self.baseline_err,
                "mean_allowed": self.allowed, "mean_ratio": self.ratio,
                "elements": self.elements, "judged": self.judged}

    def message(self) -> str:
        return (f"out: mean |error| {self.err:.3g} over {self.elements} elements is more than "
                f"{K_MEAN:g} x the fp8 baseline's {self.baseline_err:.3g} + output rounding "
                f"(allowed {self.allowed:.3g}; ratio {self.ratio or math.inf:.2f}): coarser "
                "rounding than the case's fp8 format (P rounded to e5m2?) or a misread scale")


def mean_rule(kernel: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor,
              out_dtype: torch.dtype, valid: torch.Tensor | None = None) -> MeanRule:
    """Mean absolute errors of kernel and baseline against the reference; the slack is the mean
    error of rounding the reference itself to ``out_dtype`` (what any kernel returning that
    dtype must err)."""
    r = ref.detach().double()
    keep = torch.isfinite(r) if valid is None else valid & torch.isfinite(r)
    ker = kernel.detach().to(r.device, torch.float64)
    base = baseline.detach().to(r.device, torch.float64)
    n = int(keep.sum())
    if n == 0:
        return MeanRule(0.0, 0.0, 0.0, 0)
    err = float(torch.nan_to_num((ker - r).abs()[keep], nan=math.inf).mean())
    base_err = float((base - r).abs()[keep].mean())
    rounding = float((r.to(out_dtype).double() - r).abs()[keep].mean())
    return MeanRule(err, base_err, K_MEAN * base_err + rounding, n)


def _out_valid(reference_out: Outputs, like: torch.Tensor) -> torch.Tensor | None:
    return reference_out.row_mask(like)


def fp8_verdict(case: Case, kernel: Outputs, baseline: Outputs, ref: Outputs) -> Verdict:
    """Judge an fp8 forward: the max rule on out (and lse when the kernel returns it), the mean
    rule on out, and the recorded similarities. ``baseline`` is :func:`fp8_baseline`'s, ``ref``
    :func:`fp8_reference`'s; row-sampled results (``Outputs.rows``) are judged on their rows."""
    k = K_SOFTCAP if case.softcap else K_OUT
    out_dtype = kernel.out.dtype if kernel.out.dtype.is_floating_point else torch.float32
    valid = _out_valid(ref, ref.out)
    atol = fwd_atol(ref.out, out_dtype, valid)
    base_out = baseline.out.to(out_dtype) if out_dtype.itemsize >= 2 else baseline.out
    comparisons: list[Comparison] = [compare("out", kernel.out, base_out, ref.out, k=k, atol=atol,
                                             valid=valid)]
    notes: list[str] = []
    if kernel.lse is not None and ref.lse is not None:
        lse_valid = None if ref.rows is None else _lse_rows(case, ref)
        finite = ref.lse[torch.isfinite(ref.lse)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        comparisons.append(compare("lse", kernel.lse.float(), baseline.lse, ref.lse, k=k,
                                   atol=LSE_REL_FLOOR * max(1.0, scale), valid=lse_valid))
    mean = mean_rule(kernel.out, base_out, ref.out, out_dtype, valid)
    metrics: dict[str, Any] = {c.name: c.metrics() for c in comparisons}
    ratios = [c.ratio for c in comparisons if c.ratio is not None]
    metrics["ratio"] = max(ratios) if ratios and all(math.isfinite(r) for r in ratios) else None
    metrics["err"] = max(c.err for c in comparisons)
    expected = case.fp8_out if case.dtype in FP8_DTYPES else case.dtype
    metrics["fp8"] = {"format": fp8_format(case), "scales": case.fp8_label, "k": k,
                      "atol": atol, **mean.metrics(), **similarity(kernel.out, ref.out, valid),
                      "out_dtype": str(kernel.out.dtype).replace("torch.", ""),
                      "expected_out_dtype": expected}
    if str(kernel.out.dtype).replace("torch.", "") != expected:
        notes.append(f"the kernel returned {kernel.out.dtype} where the case expects "
                     f"{expected}; judged at {kernel.out.dtype}")
    problems = [c.message() for c in comparisons if not c.ok]
    if not mean.ok and not any(c.nonfinite for c in comparisons):  # NaN says it already
        problems.append(mean.message())
    status = "fail" if problems else "pass"
    return Verdict("fwd", status, metrics, "; ".join(problems + notes))


def _lse_rows(case: Case, ref: Outputs) -> torch.Tensor | None:
    """The sampled rows as an lse-shaped mask (dense/kvcache ``(b, h, s)``, varlen ``(h, t)``)."""
    rows = ref.rows
    if case.entry == "varlen":
        return rows[None, :].expand_as(ref.lse)
    return rows[:, None, :].expand_as(ref.lse)
