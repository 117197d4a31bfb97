"""The attention semantics, written once: the logits of a block of query rows and key columns.

flash-attn 2.x applies, in this order: the softmax scale, the tanh softcap of the scaled scores,
the ALiBi bias ``-slope * |i + seqlen_k - seqlen_q - j|`` and the bottom-right aligned window
mask (query ``i`` sees key ``j`` when ``-right <= i + seqlen_k - seqlen_q - j <= left``, a side of
-1 unbounded). The exact reference, the same-precision baseline, its widened twin and the fp8
baseline all build their logits here (:func:`logits`) and differ only in the *precision* they
are computed at, which is this module's one parameter (:class:`Precision`). What each does with
the logits afterwards (an online softmax, a plain one, ``P`` rounded to fp8) is its own business.

Two kinds of sink (issue 26), also defined here and nowhere else:

* **Sink tokens** (``Case.sink_tokens = n``; StreamingLLM, AITER's ``window_size[2]``): keys
  ``j < n`` are exempt from the window's *left* bound, never from its right bound, so a row
  sees a sink token only once it is at or before the row's own bottom-right position (plus the
  right window). This is the rule of the kernels: CK's ``IsOutOfSinkBound`` unmasks column
  ``i_x`` only when ``i_x < sink && i_x < i_y + x`` (the right edge; ROCm/rocm-libraries
  projects/composablekernel/include/ck_tile/ops/fmha/block/block_masking.hpp @ 07c6e390), and
  FA4's reference ``construct_local_mask(..., sink_token_length)`` exempts them from the left
  bound only (flash_attn/cute/testing.py @ 0251105a). AITER's own test reference
  (op_tests/test_batch_prefill.py ``ref_masked_attention_with_sink``) would also show them to
  causal rows before them, rows its tests never reach (``kv_len >= qo_len + window``). CK also
  keeps a sink from query rows ``i >= seqlen_k`` (``i_y < x_total``), which only exist when
  ``seqlen_q > seqlen_k``; the harness does not model that corner.
* **A learnable sink** (``Case.learnable_sink``; gpt-oss ``sinks``, FA4 ``learnable_sink``,
  AITER ``sink_ptr``): one more logit per query head, in natural-log units of the already
  scaled score (not scaled, not soft-capped, no ALiBi, never masked), appended to every row.
  It joins the softmax denominator and the lse, ``lse = log(sum_j exp(s_j) + exp(sink))``, but
  not the output's numerator: ``out = sum_j exp(s_j - lse) v_j``. A row that sees no key has
  output 0 and lse = sink (FA4 ``attention_ref`` in flash_attn/cute/testing.py; gpt-oss's
  ``eager_attention_forward`` concatenates ``sinks`` as a column and drops it after the
  softmax). :func:`sink_column` gives the logit as that column, :func:`open_rows` the state an
  online softmax starts from; the consumers use one or the other.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from harness.case import Case


@dataclass(frozen=True)
class Params:
    """Scalar attention parameters, with causal folded into the window.

    Attributes:
        scale: softmax scale.
        left, right: bottom-right aligned window; -1 = unbounded.
        softcap: tanh cap of the scaled scores; 0 = off.
        sink_tokens: keys ``j < sink_tokens`` ignore the left bound (module docstring).
    """

    scale: float
    left: int = -1
    right: int = -1
    softcap: float = 0.0
    sink_tokens: int = 0

    @classmethod
    def of(cls, case: Case) -> Params:
        left, right = case.mask_window
        scale = case.scale if case.scale is not None else 1.0 / math.sqrt(case.head_dim)
        return cls(scale=scale, left=left, right=right, softcap=case.softcap,
                   sink_tokens=getattr(case, "sink_tokens", 0))

    @property
    def masked(self) -> bool:
        return self.left >= 0 or self.right >= 0


class Precision(enum.Enum):
    """Where the logits are rounded.

    EXACT: the reference: ``q . k`` at the computation's (high) dtype, then scaled; the ALiBi
        bias at that dtype.
    BASELINE: flash-attn's same-precision yardstick, plain PyTorch at the kernel's dtype: q
        scaled first, ``q . k`` at that dtype (:func:`matmul`), the ALiBi bias computed in
        float32 and rounded to the dtype before it is added.
    WIDENED: flash-attn's own precision split, for inputs whose 16-bit scores overflow: scores,
        softcap and ALiBi in float32; the gradient of the scores rounded to the inputs' dtype
        (as a kernel that stores dS at that dtype).
    FP8: an fp8 kernel: fp8 products accumulated in float32, then the descales and the scale.
    """

    EXACT = "exact"
    BASELINE = "baseline"
    WIDENED = "widened"
    FP8 = "fp8"


def matmul(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.einsum`` at the operands' dtype, as the baseline's matmuls are.

    A 16-bit matmul accumulates in float32 and rounds once at the end (cuBLAS, rocBLAS and
    PyTorch's CPU kernels alike); a CPU without 16-bit matrix units runs it as a scalar loop,
    4-7x slower than float32. There the product is taken in float32 and rounded to the dtype:
    the same arithmetic up to the order of the float32 sums (about 0.1% of fp16 products differ
    from PyTorch's CPU kernel by one ulp, as two BLAS libraries' would). Differentiable, with
    the same precision in the backward (its products in float32, rounded to the dtype)."""
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        return torch.einsum(equation, a.float(), b.float()).to(a.dtype)
    return torch.einsum(equation, a, b)


class _RoundGrad(torch.autograd.Function):
    """Identity forward; the backward rounds the gradient to ``dtype`` (as a kernel that
    stores dS at the input dtype before its dq/dk matmuls does)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).to(grad.dtype), None


def per_head(slopes: torch.Tensor, hkv: int, group: int) -> torch.Tensor:
    """ALiBi slopes ``(Hq,)`` or per sequence ``(B, Hq)`` shaped to broadcast over logits
    ``(B, Hkv, G, i, j)``."""
    lead = slopes.shape[0] if slopes.dim() == 2 else 1
    return slopes.reshape(lead, hkv, group, 1, 1)


def relative(rows: torch.Tensor, j0: int, n_cols: int, off: int) -> torch.Tensor:
    """``i + seqlen_k - seqlen_q - j`` for query positions ``rows`` and keys ``j0..j0+n_cols``,
    ``(len(rows), n_cols)``; ``off = seqlen_k - seqlen_q``."""
    cols = torch.arange(j0, j0 + n_cols, device=rows.device)
    return rows[:, None] + off - cols[None, :]


def visible(rel: torch.Tensor, p: Params, j0: int = 0) -> torch.Tensor:
    """Which (row, key) pairs the window leaves visible, from :func:`relative` (keys from
    ``j0``): the left bound spares the sink tokens, the right bound spares nothing."""
    seen = torch.ones_like(rel, dtype=torch.bool)
    if p.left >= 0:
        left_ok = rel <= p.left
        if p.sink_tokens > j0:
            cols = torch.arange(j0, j0 + rel.shape[-1], device=rel.device)
            left_ok = left_ok | (cols < p.sink_tokens)[None, :]
        seen &= left_ok
    if p.right >= 0:
        seen &= -rel <= p.right
    return seen


def sink_column(sinks: torch.Tensor, like: torch.Tensor, hkv: int, group: int) -> torch.Tensor:
    """The learnable sink as one more logit column of ``like`` (logits ``(B, Hkv, G, n, ck)``):
    ``(B, Hkv, G, n, 1)`` in ``like``'s dtype. ``sinks`` is ``(Hq,)``; query head ``h`` is kv
    head ``h // group``, member ``h % group``. Append it with :func:`with_sink`."""
    col = sinks.reshape(1, hkv, group, 1, 1).to(like.dtype)
    return col.expand(like.shape[0], hkv, group, like.shape[3], 1)


def with_sink(s: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Logits ``(B, Hkv, G, n, ck)`` with the sink column appended last (unchanged without a
    sink): a plain softmax over the result is the softmax with the sink, and its last column
    is dropped before ``P V``."""
    if sinks is None:
        return s
    return torch.cat([s, sink_column(sinks, s, s.shape[1], s.shape[2])], dim=-1)


def open_rows(sinks: torch.Tensor | None, shape: tuple[int, int, int, int], dtype, device):
    """The state ``(running max, running sum)`` an online softmax over rows of ``shape`` ``(B,
    Hkv, G, n)`` starts from: ``(-inf, 0)``, or with a learnable sink the sink as a row's
    first logit, ``(sink, 1)`` (a zero-valued key: it adds to the sum, not to the output)."""
    if sinks is None:
        return (torch.full(shape, -math.inf, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device))
    B, hkv, group, n = shape
    m = sinks.to(device=device, dtype=dtype).reshape(1, hkv, group, 1).expand(shape).clone()
    return m, torch.ones(shape, dtype=dtype, device=device)


def logits(qg: torch.Tensor, k: torch.Tensor, p: Params, *, rows: torch.Tensor, off: int,
           j0: int = 0, slopes: torch.Tensor | None = None, precision: Precision = Precision.EXACT,
           need_mask: bool | None = None, descale: torch.Tensor | None = None):
    """The logits of query rows ``rows`` against keys ``j0..j0+len(k)``, scale, softcap, ALiBi
    and window applied, at ``precision``.

    Args:
        qg: queries grouped by kv head, ``(B, n, Hkv, G, d)``.
        k: ``(B, ck, Hkv, d)``, the block's keys.
        p: scale, window and softcap.
        rows: int64 positions of q's rows among the sequence's ``seqlen_q`` queries.
        off: ``seqlen_k - seqlen_q`` of the sequence.
        j0: position of the block's first key.
        slopes: ALiBi slopes ``(Hq,)`` or ``(B, Hq)`` (any float dtype), or None.
        precision: where the logits are rounded (:class:`Precision`).
        need_mask: whether some pair of the block is masked (False skips the mask for a block
            known to be fully visible); default: whenever the window bounds anything.
        descale: fp8 only: the product of the q and k descales, ``(B, Hkv)``.

    Returns:
        ``(s, t, seen)``: the logits ``(B, Hkv, G, n, ck)`` (-inf where masked),
        ``tanh(raw / softcap)`` (the softcap backward's factor is ``1 - t**2``; None without
        softcap) and the visibility mask (None when nothing was masked).
    """
    B, _, hkv, group, _ = qg.shape
    dtype = qg.dtype
    if precision is Precision.EXACT:
        s = torch.einsum("bihgd,bjhd->bhgij", qg, k) * p.scale
    elif precision is Precision.BASELINE:
        s = matmul("bihgd,bjhd->bhgij", qg * p.scale, k)
    elif precision is Precision.WIDENED:
        s = torch.einsum("bihgd,bjhd->bhgij", qg.float() * p.scale, k.float())
        s = _RoundGrad.apply(s, dtype)
    else:
        s = torch.einsum("bihgd,bjhd->bhgij", qg.float(), k.float())
        s = s * (descale * p.scale).view(B, hkv, 1, 1, 1)
    t = None
    if p.softcap:
        t = torch.tanh(s / p.softcap)
        s = t * p.softcap
    mask = p.masked if need_mask is None else need_mask
    rel = relative(rows, j0, k.shape[1], off) if slopes is not None or mask else None
    if slopes is not None:
        if precision is Precision.BASELINE:
            bias = -per_head(slopes, hkv, group) * rel.abs().to(slopes.dtype)
            s = s + bias.to(s.dtype)
        else:
            s = s - per_head(slopes.to(s.dtype), hkv, group) * rel.abs().to(s.dtype)
    seen = None
    if mask:
        seen = visible(rel, p, j0)
        s = s.masked_fill(~seen, -math.inf)
    return s, t, seen
