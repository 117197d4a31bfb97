"""Exact softmax attention with flash-attn 2.x semantics, and the same-precision baseline.

The *reference* runs in float64 (or float32 for 16-bit cases on a GPU, see
:func:`reference_dtype`) and is chunked over queries and keys with exact online-softmax merging,
so its memory is proportional to one block of ``block_elems`` scores, never to
``seqlen_q * seqlen_k``. Its backward is the textbook recomputation (FlashAttention's algorithm
in high precision), also chunked.

The *baseline* is the same math written the plain PyTorch way at the kernel's own dtype (scores,
softmax, ``P @ V`` all in float16/bfloat16), chunked over query rows only, which changes nothing
numerically because softmax rows are independent. Its error against the reference is the yardstick
of flash-attn's parity rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import torch

from harness.case import Case
from harness.exact.inputs import Inputs
from harness.exact.kvcache import (  # noqa: F401 - cache_after and LSE_CONVENTIONS are re-exported
    LSE_CONVENTIONS,
    cache_after,
    convert_lse,
    resolve_cache,
)
from harness.exact.outputs import Outputs
from harness.exact.scores import Params, Precision, logits, matmul, open_rows, with_sink

#: Scores held at once by the reference (per block) and the baseline (per query-row chunk).
BLOCK_ELEMS = 1 << 22


def ieee_float32(fn):
    """Run ``fn`` with float32 matmuls at full precision on NVIDIA GPUs.

    With TF32 allowed (``torch.backends.cuda.matmul.allow_tf32``, or
    ``torch.set_float32_matmul_precision("high")`` in a user kernel's module), a float32
    reference errs about 1e-3, as much as the 16-bit kernels it judges, and a float32 baseline
    grows lenient. The setting is restored afterwards, so kernels run as they were configured.
    Where torch has ``fp32_precision`` (2.9 and later), restoring ``allow_tf32 = False`` leaves
    ``"ieee"`` in place of a fresh process's ``"none"``, a setting torch.compile keys its cached
    graphs on (graphs compiled after the first reference then differed from a fresh process's);
    so ``"none"`` is put back too. The legacy flag stays the one set and restored: torch refuses
    to read it once the two APIs were mixed otherwise.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        matmul = torch.backends.cuda.matmul
        untouched = getattr(matmul, "fp32_precision", None) == "none"
        saved = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            return fn(*args, **kwargs)
        finally:
            matmul.allow_tf32 = saved
            if untouched:
                matmul.fp32_precision = "none"

    return wrapper


def reference_dtype(case_dtype: str, device: torch.device | str) -> torch.dtype:
    """float64 on the CPU and for float32 cases; float32 for 16-bit cases on a GPU.

    A float32 reference is ~1e-7 relative, four orders below a 16-bit baseline's error, and
    runs at full GPU speed; float32 kernels need float64 to be judged at all.
    """
    if torch.device(device).type == "cpu" or case_dtype == "float32":
        return torch.float64
    return torch.float32


# ----------------------------------------------------------------------------- the pieces


def _row_index(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device)


def _chunk_sizes(groups: int, rows: int, keys: int, block_elems: int) -> tuple[int, int]:
    """Query and key chunk lengths so that ``groups * cq * ck <= block_elems``."""
    cq = max(1, min(rows, 256))
    while cq > 1 and groups * cq * min(keys, 64) > block_elems:
        cq //= 2
    ck = max(1, min(keys, block_elems // max(1, groups * cq)))
    return cq, ck


def _block_visibility(p: Params, r0: int, r1: int, j0: int, j1: int, off: int) -> str:
    """'none', 'all' or 'some' keys of block rows [r0..r1] x cols [j0, j1) are visible."""
    min_rel = r0 + off - (j1 - 1)  # rel = i + off - j
    max_rel = r1 + off - j0
    if p.right >= 0 and -max_rel > p.right:
        return "none"
    if p.left >= 0 and min_rel > p.left:
        # left of every row's window; sink tokens (keys < sink_tokens) are spared that bound
        return "some" if j0 < p.sink_tokens else "none"
    if (p.left < 0 or max_rel <= p.left) and (p.right < 0 or -min_rel <= p.right):
        return "all"
    return "some"


def _piece_slopes(slopes: torch.Tensor | None, piece, index: int) -> torch.Tensor | None:
    """The slopes of one piece of the batch: per-sequence ``(batch, Hq)`` slopes are cut to the
    piece's sequences (``index`` is its place in :meth:`Inputs.sequences`)."""
    if slopes is None or slopes.dim() == 1:
        return slopes
    return slopes[index:index + 1] if piece.packed else slopes[piece.rows]


def _blocks(p, rows_chunk: torch.Tensor, sk: int, ck: int,
            off: int) -> Iterator[tuple[int, int, bool]]:
    """Key blocks worth visiting for these query rows, and whether each needs a mask."""
    r0, r1 = int(rows_chunk[0]), int(rows_chunk[-1])
    for j0 in range(0, sk, ck):
        j1 = min(sk, j0 + ck)
        vis = _block_visibility(p, r0, r1, j0, j1, off) if p.masked else "all"
        if vis != "none":
            yield j0, j1, vis == "some"


# ---------------------------------------------------------------------------- reference


def attention_forward(q, k, v, p: Params, slopes=None, *, rows=None, seqlen_q=None,
                      block_elems: int = BLOCK_ELEMS, sinks=None):
    """Exact attention of one uniform batch, chunked.

    Args:
        q: ``(B, n, Hq, d)``, the query rows to compute (all rows unless ``rows`` is given).
        k: ``(B, sk, Hkv, d)``; v: ``(B, sk, Hkv, dv)``.
        p: scale, window and softcap.
        slopes: ALiBi slopes ``(Hq,)`` or None.
        rows: sorted int64 positions of q's rows among ``seqlen_q`` queries (row sampling).
        seqlen_q: the full query length the positions refer to (default ``n``).
        block_elems: scores held at once.
        sinks: learnable sink logits ``(Hq,)`` or None (:mod:`harness.exact.scores`).

    Returns:
        ``(out (B, n, Hq, dv), lse (B, Hq, n))`` in q's dtype; rows that see no key are 0 /
        -inf (0 / the sink with a learnable sink).
    """
    B, n, Hq, d = q.shape
    sk, Hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    seqlen_q = n if seqlen_q is None else seqlen_q
    rows = _row_index(n, q.device) if rows is None else rows
    off = sk - seqlen_q
    qg = q.reshape(B, n, Hkv, G, d)
    sl = None if slopes is None else slopes.to(q.dtype)
    out = q.new_zeros(B, Hkv, G, n, dv)
    lse = q.new_full((B, Hkv, G, n), -math.inf)
    cq, ck = _chunk_sizes(B * Hq, n, sk, block_elems)
    for i0 in range(0, n, cq):
        i1 = min(n, i0 + cq)
        qb, rb = qg[:, i0:i1], rows[i0:i1]
        m, l_sum = open_rows(sinks, (B, Hkv, G, i1 - i0), q.dtype, q.device)
        acc = q.new_zeros(B, Hkv, G, i1 - i0, dv)
        for j0, j1, need_mask in _blocks(p, rb, sk, ck, off):
            s, _, _ = logits(qb, k[:, j0:j1].to(q.dtype), p, rows=rb, off=off, j0=j0, slopes=sl,
                             need_mask=need_mask)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            e = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l_sum = l_sum * alpha + e.sum(-1)
            vb = v[:, j0:j1].to(q.dtype)
            acc = acc * alpha[..., None] + torch.einsum("bhgij,bjhd->bhgid", e, vb)
            m = m_new
        seen = l_sum > 0
        normalised = acc / l_sum.clamp_min(1e-300)[..., None]
        out[:, :, :, i0:i1] = torch.where(seen[..., None], normalised, 0.0)
        lse[:, :, :, i0:i1] = torch.where(seen, m + torch.log(l_sum.clamp_min(1e-300)), -math.inf)
    return out.permute(0, 3, 1, 2, 4).reshape(B, n, Hq, dv), lse.reshape(B, Hq, n)


def attention_backward(q, k, v, out, lse, dout, p: Params, slopes=None, *,
                       block_elems: int = BLOCK_ELEMS):
    """Exact gradients of one uniform batch: ``(dq, dk, dv)`` shaped like ``(q, k, v)``.

    ``out`` and ``lse`` are the reference forward's results for the same inputs (a learnable
    sink is in the lse: the probabilities ``exp(s - lse)`` are the ones it leaves the keys).
    """
    B, sq, Hq, d = q.shape
    sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    off = sk - sq
    rows = _row_index(sq, q.device)
    qg = q.reshape(B, sq, Hkv, G, d)
    dog = dout.reshape(B, sq, Hkv, G, dout.shape[-1])
    delta = (dout * out).sum(-1).reshape(B, sq, Hkv, G).permute(0, 2, 3, 1)  # (B, Hkv, G, sq)
    lse = lse.reshape(B, Hkv, G, sq)
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse)
    sl = None if slopes is None else slopes.to(q.dtype)
    dq = torch.zeros_like(qg)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    cq, ck = _chunk_sizes(B * Hq, sq, sk, block_elems)
    for i0 in range(0, sq, cq):
        i1 = min(sq, i0 + cq)
        qb, dob, rb = qg[:, i0:i1], dog[:, i0:i1], rows[i0:i1]
        lse_b, delta_b = lse_safe[..., i0:i1, None], delta[..., i0:i1, None]
        for j0, j1, need_mask in _blocks(p, rb, sk, ck, off):
            kb, vb = k[:, j0:j1].to(q.dtype), v[:, j0:j1].to(q.dtype)
            s, t, _ = logits(qb, kb, p, rows=rb, off=off, j0=j0, slopes=sl, need_mask=need_mask)
            prob = torch.exp(s - lse_b)
            dv[:, j0:j1] += torch.einsum("bhgij,bihgd->bjhd", prob, dob)
            dp = torch.einsum("bihgd,bjhd->bhgij", dob, vb)
            ds = prob * (dp - delta_b)
            if t is not None:
                ds = ds * (1 - t * t)
            dq[:, i0:i1] += torch.einsum("bhgij,bjhd->bihgd", ds, kb) * p.scale
            dk[:, j0:j1] += torch.einsum("bhgij,bihgd->bjhd", ds, qb) * p.scale
    return dq.reshape(B, sq, Hq, d), dk, dv


def _probability_blocks(q, k, v, lse, p: Params, slopes, block_elems: int, *, rows=None,
                        seqlen_q=None):
    """The exact probabilities of one uniform batch, block by block, from its lse: yields
    ``(i0, i1, qb, kb, vb, prob)``, with q grouped ``(B, n, Hkv, G, d)``, the key block's k and
    v in q's dtype and ``prob`` ``(B, Hkv, G, i1 - i0, ck)``. For the passes that need ``P``
    after the forward (the dropout variance, the score-rounding allowance). ``rows`` and
    ``seqlen_q`` as in :func:`attention_forward`."""
    B, n, Hq, d = q.shape
    sk, Hkv = k.shape[1], k.shape[2]
    off = sk - (n if seqlen_q is None else seqlen_q)
    rows = _row_index(n, q.device) if rows is None else rows
    qg = q.reshape(B, n, Hkv, Hq // Hkv, d)
    lse = lse.reshape(B, Hkv, Hq // Hkv, n)
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse)
    sl = None if slopes is None else slopes.to(q.dtype)
    cq, ck = _chunk_sizes(B * Hq, n, sk, block_elems)
    for i0 in range(0, n, cq):
        i1 = min(n, i0 + cq)
        qb = qg[:, i0:i1]
        for j0, j1, need_mask in _blocks(p, rows[i0:i1], sk, ck, off):
            kb, vb = k[:, j0:j1].to(q.dtype), v[:, j0:j1].to(q.dtype)
            s, _, _ = logits(qb, kb, p, rows=rows[i0:i1], off=off, j0=j0, slopes=sl,
                             need_mask=need_mask)
            yield i0, i1, qb, kb, vb, torch.exp(s - lse_safe[..., i0:i1, None])


def dropout_variance_forward(q, k, v, lse, p: Params, slopes=None, *,
                             block_elems: int = BLOCK_ELEMS):
    """``sum_j P_ij**2 * v_jd**2`` per output element: with inverted dropout of probability
    ``dp`` each kept term is scaled by ``1/(1-dp)``, so the output's variance is
    ``dp / (1 - dp)`` times this. ``lse`` comes from :func:`attention_forward`."""
    B, sq, Hq, d = q.shape
    Hkv, dv = k.shape[2], v.shape[-1]
    acc = q.new_zeros(B, Hkv, Hq // Hkv, sq, dv)
    for i0, i1, _, _, vb, prob in _probability_blocks(q, k, v, lse, p, slopes, block_elems):
        acc[:, :, :, i0:i1] += torch.einsum("bhgij,bjhd->bhgid", prob * prob, vb * vb)
    return acc.permute(0, 3, 1, 2, 4).reshape(B, sq, Hq, dv)


def score_rounding_forward(q, k, v, out, lse, p: Params, slopes=None, *, unit: float,
                           rows=None, seqlen_q=None, block_elems: int = BLOCK_ELEMS):
    """How far a correct kernel's out and lse may move because its scores are rounded.

    A kernel computes each score ``s_j = scale * q.k_j`` in floating point (float32 at least);
    the sum's rounding error is about ``sqrt(d) * unit * scale * sum_i |q_i k_ji|`` (the
    probabilistic bound of Higham and Mary, 2019), which on ill-conditioned rows (scores of
    1e4-1e5 from products that cancel) reaches a tenth of a unit and beyond: too much for the
    softmax to be determined at that precision. To first order a score error ``ds_j`` moves
    ``out_c`` by ``sum_j P_j ds_j (v_jc - out_c)`` and the lse by ``sum_j P_j ds_j``. With
    ``w_j = P_j |ds_j|``, the out bound is ``sqrt(sum_j w_j * sum_j w_j (v_jc - out_c)**2)``
    (Cauchy-Schwarz: at least ``sum_j w_j |v_jc - out_c|``, and three matmuls instead of a
    tensor per row, key and column), so a near one-hot row (``v_j = out`` for its one key) gets
    almost none.

    Returns ``(out_slack (B, n, Hq, d), lse_slack (B, Hq, n))`` in q's dtype; ``out`` and
    ``lse`` from :func:`attention_forward` (``rows`` and ``seqlen_q`` as there).
    """
    B, n, Hq, d = q.shape
    Hkv, dv = k.shape[2], v.shape[-1]
    G = Hq // Hkv
    gamma = math.sqrt(d) * unit * abs(p.scale)
    first = q.new_zeros(B, Hkv, G, n, dv)  # sum_j w_j v_jc
    second = q.new_zeros(B, Hkv, G, n, dv)  # sum_j w_j v_jc**2
    weight = q.new_zeros(B, Hkv, G, n)  # sum_j w_j
    for i0, i1, qb, kb, vb, prob in _probability_blocks(q, k, v, lse, p, slopes, block_elems,
                                                        rows=rows, seqlen_q=seqlen_q):
        w = prob * torch.einsum("bihgd,bjhd->bhgij", qb.abs(), kb.abs()) * gamma
        first[:, :, :, i0:i1] += torch.einsum("bhgij,bjhd->bhgid", w, vb)
        second[:, :, :, i0:i1] += torch.einsum("bhgij,bjhd->bhgid", w, vb * vb)
        weight[:, :, :, i0:i1] += w.sum(-1)
    o = out.reshape(B, n, Hkv, G, dv).permute(0, 2, 3, 1, 4)
    spread = (second - 2 * o * first + o * o * weight[..., None]).clamp_min(0)
    slack = torch.sqrt(weight[..., None] * spread)
    return slack.permute(0, 3, 1, 2, 4).reshape(B, n, Hq, dv), weight.reshape(B, Hq, n)


def score_rounding_backward(q, k, v, out, lse, dout, p: Params, slopes=None, *, unit: float,
                            block_elems: int = BLOCK_ELEMS):
    """How far a correct kernel's dq, dk and dv may move because its scores are rounded: the
    backward's counterpart of :func:`score_rounding_forward`, to first order.

    With raw score errors ``|dr_ij| <= e_ij = sqrt(d) * unit * scale * sum_c |q_ic k_jc|`` and
    ``g = 1 - tanh(r / softcap)**2`` (1 without softcap), a score moves by at most
    ``a_ij = g_ij e_ij`` and a probability, ``P_ij sum_l P_il (ds_ij - ds_il)``, by ``p_ij =
    P_ij (a_ij (1 - 2 P_ij) + W_i)`` with ``W_i = sum_j P_ij a_ij`` (0 for a row's only key;
    never more than ``max(P_ij, 1 - P_ij)``). So ``dv = P^T dout`` moves by ``sum_i p_ij
    |dout_i|``; ``dS = g P (dP - Delta)`` (``dP = dout v^T``, ``Delta_i = dout_i . out_i``,
    which moves by at most ``E_i = sum_j P_ij a_ij |dP_ij - Delta_i|``) by ``A_ij = g (p_ij
    |dP_ij - Delta_i| + P_ij E_i)`` plus, with softcap, ``2 |t_ij| g_ij e_ij / softcap``
    times ``P_ij |dP_ij - Delta_i|`` (the change of ``g``); and ``dq = scale dS k``, ``dk =
    scale dS^T q`` by ``scale A |k|`` and ``scale A^T |q|``. Triangle bounds throughout: where
    the scores are well conditioned every term is a few float32 units of the gradient.

    Returns ``(dq_slack, dk_slack, dv_slack)`` shaped like ``(q, k, v)`` in q's dtype;
    ``out`` and ``lse`` from :func:`attention_forward`.
    """
    B, sq, Hq, d = q.shape
    sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    off = sk - sq
    gamma = math.sqrt(d) * unit * abs(p.scale)
    rows = _row_index(sq, q.device)
    qg, dog = q.reshape(B, sq, Hkv, G, d), dout.reshape(B, sq, Hkv, G, dout.shape[-1])
    delta = (dout * out).sum(-1).reshape(B, sq, Hkv, G).permute(0, 2, 3, 1)
    lse = lse.reshape(B, Hkv, G, sq)
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse)
    sl = None if slopes is None else slopes.to(q.dtype)
    dq, dk, dv = torch.zeros_like(qg), torch.zeros_like(k), torch.zeros_like(v)
    cq, ck = _chunk_sizes(B * Hq, sq, sk, block_elems)

    def terms(qb, dob, rb, i0, i1, j0, j1, need_mask):
        kb, vb = k[:, j0:j1], v[:, j0:j1]
        s, t, _ = logits(qb, kb, p, rows=rb, off=off, j0=j0, slopes=sl, need_mask=need_mask)
        prob = torch.exp(s - lse_safe[..., i0:i1, None])
        e = torch.einsum("bihgd,bjhd->bhgij", qb.abs(), kb.abs()) * gamma
        g = 1 - t * t if t is not None else None
        a = e if g is None else g * e
        r = (torch.einsum("bihgd,bjhd->bhgij", dob, vb) - delta[..., i0:i1, None]).abs()
        return kb, prob, e, g, t, a, r

    for i0 in range(0, sq, cq):
        i1 = min(sq, i0 + cq)
        qb, dob, rb = qg[:, i0:i1], dog[:, i0:i1], rows[i0:i1]
        weight = q.new_zeros(B, Hkv, G, i1 - i0, 1)  # W_i
        moved = q.new_zeros(B, Hkv, G, i1 - i0, 1)  # E_i
        blocks = list(_blocks(p, rb, sk, ck, off))
        for j0, j1, need_mask in blocks:
            _, prob, _, _, _, a, r = terms(qb, dob, rb, i0, i1, j0, j1, need_mask)
            weight += (prob * a).sum(-1, keepdim=True)
            moved += (prob * a * r).sum(-1, keepdim=True)
        for j0, j1, need_mask in blocks:
            kb, prob, e, g, t, a, r = terms(qb, dob, rb, i0, i1, j0, j1, need_mask)
            # |dP_ij| = P_ij |sum_l P_il (ds_ij - ds_il)| <= P_ij (a_ij (1 - 2 P_ij) + W_i), and
            # no probability leaves [0, 1]: a row's only key gets none
            dprob = torch.minimum(prob * (a * (1 - 2 * prob) + weight).clamp_min(0),
                                  torch.maximum(prob, 1 - prob))
            big_a = dprob * r + prob * moved
            if g is not None:
                big_a = g * big_a + prob * r * (2 * t.abs() * g * e / p.softcap)
            dv[:, j0:j1] += torch.einsum("bhgij,bihgd->bjhd", dprob, dob.abs())
            dq[:, i0:i1] += torch.einsum("bhgij,bjhd->bihgd", big_a, kb.abs()) * abs(p.scale)
            dk[:, j0:j1] += torch.einsum("bhgij,bihgd->bjhd", big_a, qb.abs()) * abs(p.scale)
    return dq.reshape(B, sq, Hq, d), dk, dv


def delta_rounding_backward(q, k, v, out, lse, dout, p: Params, slopes=None, *, unit: float,
                            block_elems: int = BLOCK_ELEMS):
    """How far a correct FlashAttention-style backward's dq and dk may move because it takes
    ``D_i = sum_c dO_ic O_ic`` from the output as stored at the kernel's dtype (flash-attn's
    ``flash_bwd_preprocess``: ``dot(dO, O)`` on the saved O). Rounding O moves ``D_i`` by at
    most ``unit * sum_c |dO_ic O_ic|``; ``dS_ij = P_ij g_ij (dP_ij - D_i)`` then by ``P_ij
    |dD_i|`` (``g <= 1``), so ``dq_i`` by ``scale |dD_i| sum_j P_ij |k_j|`` and ``dk_j`` by
    ``scale sum_i P_ij |dD_i| |q_i|``. Negligible for N(0, 1) v and dout; with a v far from 0
    and large dout rows it reaches several times the same-dtype baseline's error.

    Returns ``(dq_slack, dk_slack, dv_slack = 0)`` shaped like ``(q, k, v)``; ``out`` and ``lse``
    from :func:`attention_forward`."""
    B, sq, Hq, d = q.shape
    sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    off = sk - sq
    rows = _row_index(sq, q.device)
    qg = q.reshape(B, sq, Hkv, G, d)
    moved = unit * (dout.abs() * out.abs()).sum(-1)  # (B, sq, Hq)
    moved = moved.reshape(B, sq, Hkv, G).permute(0, 2, 3, 1)  # (B, Hkv, G, sq)
    lse = lse.reshape(B, Hkv, G, sq)
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse)
    sl = None if slopes is None else slopes.to(q.dtype)
    dq = torch.zeros_like(qg)
    dk = torch.zeros_like(k)
    cq, ck = _chunk_sizes(B * Hq, sq, sk, block_elems)
    for i0 in range(0, sq, cq):
        i1 = min(sq, i0 + cq)
        qb, rb = qg[:, i0:i1], rows[i0:i1]
        for j0, j1, need_mask in _blocks(p, rb, sk, ck, off):
            kb = k[:, j0:j1]
            s, _, _ = logits(qb, kb, p, rows=rb, off=off, j0=j0, slopes=sl, need_mask=need_mask)
            w = torch.exp(s - lse_safe[..., i0:i1, None]) * moved[..., i0:i1, None]
            dq[:, i0:i1] += torch.einsum("bhgij,bjhd->bihgd", w, kb.abs()) * abs(p.scale)
            dk[:, j0:j1] += torch.einsum("bhgij,bihgd->bjhd", w, qb.abs()) * abs(p.scale)
    return dq.reshape(B, sq, Hq, d), dk, torch.zeros_like(v)


@ieee_float32
def delta_rounding(inputs: Inputs, unit: float, *, block_elems: int = BLOCK_ELEMS) -> Outputs:
    """:func:`delta_rounding_backward` over a whole case (dense and varlen; the backward's
    entry points): the allowances as an :class:`Outputs` in the reference's dtype, out and lse
    zero."""
    case = inputs.case
    dtype = reference_dtype(case.dtype, inputs.device)
    p = Params.of(case)
    slopes = inputs.alibi_slopes.to(dtype) if case.alibi and inputs.alibi_slopes is not None \
        else None
    sinks = case_sinks(inputs, dtype)
    result = _empty_result(inputs, dtype, dtype, True)
    result.lse.zero_()
    for index, piece in enumerate(inputs.sequences()):
        q, k, v = piece.q_like(inputs.q), piece.kv_like(inputs.k), piece.kv_like(inputs.v)
        if q.shape[1] == 0 or k.shape[1] == 0:
            continue
        q = q.to(dtype)
        sl = _piece_slopes(slopes, piece, index)
        out, lse = attention_forward(q, k, v, p, sl, block_elems=block_elems, sinks=sinks)
        do = piece.q_like(inputs.dout).to(dtype)
        dq, dk, dv = delta_rounding_backward(q, k.to(dtype), v.to(dtype), out, lse, do, p, sl,
                                             unit=unit, block_elems=block_elems)
        piece.put_q(result.dq, dq)
        piece.put_kv(result.dk, dk)
        piece.put_kv(result.dv, dv)
    return result


@ieee_float32
def score_rounding(inputs: Inputs, unit: float, *, grads: bool = False,
                   rows: list[torch.Tensor | None] | None = None,
                   block_elems: int = BLOCK_ELEMS) -> Outputs:
    """:func:`score_rounding_forward` (and with ``grads`` :func:`score_rounding_backward` for
    ``inputs.dout``) over a whole case, every entry point: the allowances as an
    :class:`Outputs` in the reference's dtype and layouts (lse in the harness's convention; the
    slack of a shifted lse is the same). ``rows`` as in :func:`reference` (forward only)."""
    if rows is not None and grads:
        raise ValueError("row sampling is for the forward only")
    inputs = resolve_cache(inputs)
    case = inputs.case
    dtype = reference_dtype(case.dtype, inputs.device)
    p = Params.of(case)
    slopes = inputs.alibi_slopes.to(dtype) if case.alibi and inputs.alibi_slopes is not None \
        else None
    sinks = case_sinks(inputs, dtype)
    result = _empty_result(inputs, dtype, dtype, grads)
    result.lse.zero_()
    result.rows = _row_mask(inputs, rows)
    for index, piece in enumerate(inputs.sequences()):
        q, k, v = piece.q_like(inputs.q), piece.kv_like(inputs.k), piece.kv_like(inputs.v)
        if q.shape[1] == 0 or k.shape[1] == 0:
            continue
        q = q.to(dtype)
        sl = _piece_slopes(slopes, piece, index)
        chosen = rows[index] if rows is not None else None
        if chosen is not None:
            out, lse = attention_forward(q[:, chosen], k, v, p, sl, rows=chosen,
                                         seqlen_q=q.shape[1], block_elems=block_elems,
                                         sinks=sinks)
            o_s, l_s = score_rounding_forward(q[:, chosen], k, v, out, lse, p, sl, unit=unit,
                                              rows=chosen, seqlen_q=q.shape[1],
                                              block_elems=block_elems)
            piece.put_q_rows(result.out, chosen, o_s)
            piece.put_lse_rows(result.lse, chosen, l_s)
            continue
        out, lse = attention_forward(q, k, v, p, sl, block_elems=block_elems, sinks=sinks)
        o_s, l_s = score_rounding_forward(q, k, v, out, lse, p, sl, unit=unit,
                                          block_elems=block_elems)
        piece.put_q(result.out, o_s)
        piece.put_lse(result.lse, l_s)
        if grads:
            do = piece.q_like(inputs.dout).to(dtype)
            dq, dk, dv = score_rounding_backward(q, k.to(dtype), v.to(dtype), out, lse, do, p,
                                                 sl, unit=unit, block_elems=block_elems)
            piece.put_q(result.dq, dq)
            piece.put_kv(result.dk, dk)
            piece.put_kv(result.dv, dv)
    return result


# ----------------------------------------------------------------------------- baseline


def _plain_chunk(qc, k, v, rows, off, p: Params, slopes, precision: Precision, sinks=None):
    """Attention of query rows ``rows`` written the plain way (one softmax over all keys and
    the learnable sink's column, which is dropped before ``P @ V``), with the logits at
    ``precision`` and ``P @ V`` at the inputs' dtype; differentiable."""
    B, n, Hq, d = qc.shape
    Hkv = k.shape[2]
    qg = qc.reshape(B, n, Hkv, Hq // Hkv, d)
    s, _, seen = logits(qg, k, p, rows=rows, off=off, slopes=slopes, precision=precision)
    keys = s.shape[-1]
    s = with_sink(s, sinks)
    lse = torch.logsumexp(s.float(), -1)
    prob = torch.softmax(s, dim=-1)[..., :keys]
    if seen is not None:  # rows that see no key: 0, not the NaN of a softmax over -inf
        prob = prob.masked_fill(~seen.any(-1)[:, None], 0.0)
    o = matmul("bhgij,bjhd->bihgd", prob.to(qc.dtype), v).reshape(B, n, Hq, v.shape[-1])
    return o, lse.reshape(B, Hq, n)


def _baseline_chunk(qc, k, v, rows, off, p: Params, slopes, sinks=None):
    """Plain attention of query rows ``rows`` in the inputs' own dtype (the logits, the sink
    among them, at :attr:`Precision.BASELINE`); differentiable."""
    return _plain_chunk(qc, k, v, rows, off, p, slopes, Precision.BASELINE, sinks)


def _split_scale_chunk(qc, k, v, rows, off, p: Params, slopes, sinks=None):
    """The baseline with the softmax scale split between q and k (``sqrt(scale)`` each, as
    PyTorch's math SDPA does) instead of applied to q: the same math, another correct rounding
    order, which on ill-conditioned float32 cases errs up to a few times the plain one."""
    root = math.sqrt(p.scale)
    return _baseline_chunk(qc * root, k * root, v, rows, off, dataclasses.replace(p, scale=1.0),
                           slopes, sinks)


def _widened_chunk(qc, k, v, rows, off, p: Params, slopes, sinks=None):
    """The baseline with flash-attn's precision split instead of plain PyTorch's: scores,
    softcap, ALiBi and softmax in float32 (so they cannot overflow at float16), ``P`` rounded to
    the inputs' dtype before ``P @ V`` at that dtype, and in the backward ``dS`` rounded to it
    before the dq/dk products (:attr:`Precision.WIDENED`). Differentiable; ``(out, lse
    float32)`` like :func:`_baseline_chunk`."""
    return _plain_chunk(qc, k, v, rows, off, p, slopes, Precision.WIDENED, sinks)


def _baseline_rows(B: int, Hq: int, sk: int, block_elems: int) -> int:
    return max(1, block_elems // max(1, B * Hq * sk))


def baseline_forward(q, k, v, p: Params, slopes=None, *, block_elems: int = BLOCK_ELEMS,
                     chunk=None, sinks=None):
    """The same math as the reference in the inputs' dtype: ``(out, lse float32)``.

    Results go straight into preallocated tensors: keeping small per-chunk results alive
    between large temporaries fragments the CPU heap and grows the process by the size of
    the whole problem.
    """
    B, sq, Hq, d = q.shape
    off = k.shape[1] - sq
    rows = _row_index(sq, q.device)
    step = _baseline_rows(B, Hq, k.shape[1], block_elems)
    out = torch.empty(B, sq, Hq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, sq, dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for i0 in range(0, sq, step):
            o, l_ = (chunk or _baseline_chunk)(q[:, i0:i0 + step], k, v, rows[i0:i0 + step],
                                               off, p, slopes, sinks)
            out[:, i0:i0 + step] = o
            lse[:, :, i0:i0 + step] = l_
            del o, l_
    return out, lse


def baseline_rows(q, k, v, rows: torch.Tensor, p: Params, slopes=None, *,
                  block_elems: int = BLOCK_ELEMS, chunk=None, sinks=None):
    """The baseline of the query rows ``rows`` only: ``(out (B, len(rows), Hq, dv), lse)``."""
    B, sq, Hq, d = q.shape
    off = k.shape[1] - sq
    step = _baseline_rows(B, Hq, k.shape[1], block_elems)
    out = torch.empty(B, len(rows), Hq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, len(rows), dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for i0 in range(0, len(rows), step):
            chosen = rows[i0:i0 + step]
            o, l_ = (chunk or _baseline_chunk)(q[:, chosen], k, v, chosen, off, p, slopes,
                                               sinks)
            out[:, i0:i0 + step] = o
            lse[:, :, i0:i0 + step] = l_
    return out, lse


def baseline_backward(q, k, v, dout, p: Params, slopes=None, *, block_elems: int = BLOCK_ELEMS,
                      chunk=None, sinks=None):
    """Gradients of the baseline by autograd, one query chunk at a time; the chunks' dk and dv
    are summed in float32 (one plain backward over all rows would accumulate them in one
    matmul)."""
    B, sq, Hq, _ = q.shape
    off = k.shape[1] - sq
    rows = _row_index(sq, q.device)
    step = _baseline_rows(B, Hq, k.shape[1], block_elems // 4)
    kk = k.detach().requires_grad_(True)
    vv = v.detach().requires_grad_(True)
    group = Hq // k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for i0 in range(0, sq, step):
        qc = q[:, i0:i0 + step].detach().requires_grad_(True)
        with torch.enable_grad():
            # As flash-attn's tests do: kv heads repeated for the query heads, so the gradient
            # sum over each group happens in the low dtype too.
            ke = kk.repeat_interleave(group, dim=2) if group > 1 else kk
            ve = vv.repeat_interleave(group, dim=2) if group > 1 else vv
            o, _ = (chunk or _baseline_chunk)(qc, ke, ve, rows[i0:i0 + step], off, p, slopes,
                                              sinks)
            gq, gk, gv = torch.autograd.grad(o, (qc, kk, vv), dout[:, i0:i0 + step])
        dq[:, i0:i0 + step] = gq
        dk += gk.float()
        dv += gv.float()
        del o, gq, gk, gv
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------- whole cases (any entry point)


def empty_lse(case: Case, device, dtype) -> torch.Tensor:
    """An lse tensor of the case's layout filled with -inf (rows that see no key, and the
    padding rows of a padded varlen layout)."""
    if case.entry == "varlen":
        return torch.full((case.heads_q, case.rows_q), -math.inf, dtype=dtype, device=device)
    return torch.full((case.batch, case.heads_q, case.seqlen_q), -math.inf, dtype=dtype,
                      device=device)


def _empty_result(inputs: Inputs, dtype, lse_dtype, grads: bool) -> Outputs:
    dev = inputs.device
    out_shape = (*inputs.q.shape[:-1], inputs.case.dv)
    result = Outputs(out=torch.zeros(out_shape, dtype=dtype, device=dev),
                     lse=empty_lse(inputs.case, dev, lse_dtype))
    if grads:
        result.dq = torch.zeros(inputs.q.shape, dtype=dtype, device=dev)
        result.dk = torch.zeros(inputs.k.shape, dtype=dtype, device=dev)
        result.dv = torch.zeros(inputs.v.shape, dtype=dtype, device=dev)
    return result


def sample_rows(inputs: Inputs, count: int, seed: int) -> list[torch.Tensor | None]:
    """Per piece of the batch, the query rows a row-sampled verdict judges: the first and last
    row and ``count - 2`` more drawn with ``seed``; None where the piece has ``count`` rows or
    fewer (all are judged)."""
    gen = torch.Generator().manual_seed(seed)
    chosen: list[torch.Tensor | None] = []
    for piece in inputs.sequences():
        n = piece.n_rows
        if n <= count:
            chosen.append(None)
            continue
        picks = torch.randperm(n - 2, generator=gen)[: count - 2] + 1
        rows = torch.cat([torch.tensor([0, n - 1]), picks]).unique(sorted=True)
        chosen.append(rows.to(inputs.device))
    return chosen


def _row_mask(inputs: Inputs, rows: list[torch.Tensor | None] | None) -> torch.Tensor | None:
    """The rows a result holds: the sampled ones, and never the padding rows of a padded
    varlen layout (whose output the kernel need not write); None for all rows."""
    padded = inputs.case.layout == "padded"
    if not padded and (rows is None or all(r is None for r in rows)):
        return None
    pieces = list(inputs.sequences())
    chosen_rows = rows if rows is not None else [None] * len(pieces)
    mask = torch.zeros(inputs.q.shape[:-2], dtype=torch.bool, device=inputs.device)
    for piece, chosen in zip(pieces, chosen_rows, strict=True):
        piece.mark_rows(mask, chosen)
    return mask


def case_sinks(inputs: Inputs, dtype: torch.dtype, use: bool | None = None
               ) -> torch.Tensor | None:
    """The learnable sink logits ``(Hq,)`` at ``dtype`` when the case has them (``use``
    overrides whether they apply), else None."""
    wanted = inputs.case.learnable_sink if use is None else use
    sinks = getattr(inputs, "learnable_sink", None)
    return sinks.to(dtype) if wanted and sinks is not None else None


def _no_keys(piece, lse: torch.Tensor, sinks: torch.Tensor | None, rows: int) -> None:
    """A sequence without keys: its rows' lse is the sink (output 0), or stays -inf."""
    if sinks is None or rows == 0:
        return
    value = sinks.to(lse.dtype)[None, :, None].expand(1 if piece.packed else lse[piece.rows]
                                                      .shape[0], -1, rows)
    piece.put_lse(lse, value)


@ieee_float32
def reference(inputs: Inputs, *, dtype: torch.dtype | None = None, params: Params | None = None,
              alibi: bool | None = None, grads: bool = False,
              rows: list[torch.Tensor | None] | None = None,
              block_elems: int = BLOCK_ELEMS, lse_convention: str = "harness",
              sink: bool | None = None) -> Outputs:
    """The exact result of a case, in the layout of its entry point.

    kv-cache cases attend the cache as it is after the call: appended keys and values, rotary
    q and keys, ``cache_batch_idx`` and ``cache_leftpad`` as flash-attn applies them
    (:func:`harness.exact.kvcache.resolve_cache`); :func:`cache_after` gives the cache itself.

    Args:
        inputs: the case's tensors.
        dtype: computation dtype (default :func:`reference_dtype`).
        params: override the case's scale/window/softcap (feature-effect checks use this).
        alibi: override whether ALiBi applies.
        sink: override whether the learnable sink applies.
        grads: also compute dq, dk, dv for ``inputs.dout``.
        rows: per piece, the query rows to compute (:func:`sample_rows`); the others stay zero
            and ``Outputs.rows`` marks the computed ones. Forward only.
        block_elems: scores held at once (bounds memory).
        lse_convention: ``harness`` (the default) or ``flash-attn``, the lse a family's kernel
            returns (:data:`LSE_CONVENTIONS`, :func:`convert_lse`).

    Rows that see no key (and sequences with no keys) have zero output, -inf lse (+inf in the
    flash-attn convention) and zero gradients; cache slots past a kv-cache row's length get
    zero gradients.
    """
    if lse_convention not in LSE_CONVENTIONS:
        raise ValueError(f"lse_convention={lse_convention!r} is not one of "
                         f"{', '.join(LSE_CONVENTIONS)}")
    if inputs.q_descale is not None:
        raise ValueError("fp8 inputs: the exact reference is harness.exact.fp8.fp8_reference "
                         "(on the dequantised values)")
    inputs = resolve_cache(inputs)
    case = inputs.case
    dtype = dtype or reference_dtype(case.dtype, inputs.device)
    p = params or Params.of(case)
    use_alibi = case.alibi if alibi is None else alibi
    slopes = None
    if use_alibi and inputs.alibi_slopes is not None:
        slopes = inputs.alibi_slopes.to(dtype)
    sinks = case_sinks(inputs, dtype, sink)
    if rows is not None and grads:
        raise ValueError("row sampling is for the forward only")
    result = _empty_result(inputs, dtype, dtype, grads)
    result.rows = _row_mask(inputs, rows)

    def forward_rows(q, k, v, chosen, sl):
        return attention_forward(q[:, chosen], k, v, p, sl, rows=chosen, seqlen_q=q.shape[1],
                                 block_elems=block_elems, sinks=sinks)

    def forward(q, k, v, sl):
        return attention_forward(q, k, v, p, sl, block_elems=block_elems, sinks=sinks)

    def backward(q, k, v, o, lse, do, sl):
        return attention_backward(q, k.to(dtype), v.to(dtype), o, lse, do.to(dtype), p, sl,
                                  block_elems=block_elems)

    # Keys and values stay at the input dtype and are widened one block at a time, so the
    # reference's memory follows the block, not the key length (a 1M-token cache).
    return _by_piece(inputs, result, sinks, slopes, rows, grads, lse_convention, forward,
                     forward_rows, backward, q_dtype=dtype)


@ieee_float32
def baseline(inputs: Inputs, *, grads: bool = False,
             rows: list[torch.Tensor | None] | None = None,
             block_elems: int = BLOCK_ELEMS, widened: bool = False,
             split_scale: bool = False, lse_convention: str = "harness") -> Outputs:
    """The same-precision baseline of a case (see the module docstring); lse in float32.
    ``rows`` samples query rows as in :func:`reference`; ``widened`` computes scores and
    softmax in float32 (:func:`_widened_chunk`), the yardstick where the plain one overflows;
    ``split_scale`` scales q and k by ``sqrt(scale)`` each (:func:`_split_scale_chunk`), one of
    the float32 yardsticks; ``lse_convention`` as in :func:`reference` (the shift is added in
    float64, then rounded)."""
    if inputs.q_descale is not None:
        raise ValueError("fp8 inputs: the baseline is harness.exact.fp8.fp8_baseline (it "
                         "emulates fp8 P)")
    chunk = _widened_chunk if widened else _split_scale_chunk if split_scale else None
    inputs = resolve_cache(inputs)
    case = inputs.case
    p = Params.of(case)
    slopes = inputs.alibi_slopes if case.alibi else None
    sinks = case_sinks(inputs, torch.float32)
    result = _empty_result(inputs, inputs.q.dtype, torch.float32, grads)
    result.rows = _row_mask(inputs, rows)

    def forward_rows(q, k, v, chosen, sl):
        return baseline_rows(q, k, v, chosen, p, sl, block_elems=block_elems, chunk=chunk,
                             sinks=sinks)

    def forward(q, k, v, sl):
        return baseline_forward(q, k, v, p, sl, block_elems=block_elems, chunk=chunk,
                                sinks=sinks)

    def backward(q, k, v, o, lse, do, sl):
        return baseline_backward(q, k, v, do, p, sl, block_elems=block_elems, chunk=chunk,
                                 sinks=sinks)

    return _by_piece(inputs, result, sinks, slopes, rows, grads, lse_convention, forward,
                     forward_rows, backward)


def _by_piece(inputs: Inputs, result: Outputs, sinks, slopes, rows, grads: bool,
              lse_convention: str, forward: Callable, forward_rows: Callable,
              backward: Callable, *, q_dtype: torch.dtype | None = None) -> Outputs:
    """Fill ``result`` sequence by sequence, the loop :func:`reference` and :func:`baseline`
    share: a sequence without queries or keys gets :func:`_no_keys`; with ``rows``, only the
    chosen query rows (``forward_rows(q, k, v, chosen, slopes)``); else the whole sequence
    (``forward(q, k, v, slopes)``, both giving ``(out, lse)``) and, with ``grads``,
    ``backward(q, k, v, out, lse, dout, slopes)`` giving ``(dq, dk, dv)``. ``q_dtype``: each
    sequence's queries are converted to it first. The lse is then converted to
    ``lse_convention``."""
    for index, piece in enumerate(inputs.sequences()):
        q, k, v = piece.q_like(inputs.q), piece.kv_like(inputs.k), piece.kv_like(inputs.v)
        if q.shape[1] == 0 or k.shape[1] == 0:
            _no_keys(piece, result.lse, sinks, q.shape[1])
            continue
        if q_dtype is not None:
            q = q.to(q_dtype)
        sl = _piece_slopes(slopes, piece, index)
        chosen = rows[index] if rows is not None else None
        if chosen is not None:
            o, lse = forward_rows(q, k, v, chosen, sl)
            piece.put_q_rows(result.out, chosen, o)
            piece.put_lse_rows(result.lse, chosen, lse)
            continue
        o, lse = forward(q, k, v, sl)
        piece.put_q(result.out, o)
        piece.put_lse(result.lse, lse)
        if grads:
            dq, dk, dv = backward(q, k, v, o, lse, piece.q_like(inputs.dout), sl)
            piece.put_q(result.dq, dq)
            piece.put_kv(result.dk, dk)
            piece.put_kv(result.dv, dv)
    if lse_convention != "harness":
        result.lse = convert_lse(result.lse, inputs, "harness", lse_convention)
    return result


@ieee_float32
def dropout_variance(inputs: Inputs, *, dtype: torch.dtype | None = None,
                     block_elems: int = BLOCK_ELEMS) -> torch.Tensor:
    """The theoretical variance of each output element under the case's dropout."""
    case = inputs.case
    dtype = dtype or reference_dtype(case.dtype, inputs.device)
    p = Params.of(case)
    slopes = None
    if case.alibi and inputs.alibi_slopes is not None:
        slopes = inputs.alibi_slopes.to(dtype)
    var = torch.zeros(inputs.q.shape, dtype=dtype, device=inputs.device)
    for index, piece in enumerate(inputs.sequences()):
        q, k, v = piece.q_like(inputs.q), piece.kv_like(inputs.k), piece.kv_like(inputs.v)
        if q.shape[1] == 0 or k.shape[1] == 0:
            continue
        q = q.to(dtype)  # keys and values are widened one block at a time
        sl = _piece_slopes(slopes, piece, index)
        _, lse = attention_forward(q, k, v, p, sl, block_elems=block_elems)
        piece.put_q(var, dropout_variance_forward(q, k, v, lse, p, sl, block_elems=block_elems))
    return var * (case.dropout_p / (1.0 - case.dropout_p))


# ------------------------------------------------- whole probability matrices (small cases)


def probabilities(q, k, p: Params, slopes=None):
    """Exact softmax probabilities ``P`` of one uniform piece, all scores at once.

    For small problems only (exact dropout judging, ``harness.exact.dropout``): memory is
    ``B * Hq * sq * sk`` elements of q's dtype, several times over.

    Args:
        q: ``(B, sq, Hq, d)``; its dtype is the computation's (float64 for the reference).
        k: ``(B, sk, Hkv, d)``.
        p: scale, window and softcap.
        slopes: ALiBi slopes ``(Hq,)`` in q's dtype, or None.

    Returns:
        ``(P, t)``: ``P`` ``(B, Hq, sq, sk)``, zero at masked keys and in rows that see no key;
        ``t = tanh(raw / softcap)`` of the same shape (the softcap backward's factor is
        ``1 - t**2``), or None without softcap.
    """
    B, sq, Hq, d = q.shape
    sk, Hkv = k.shape[1], k.shape[2]
    qg = q.reshape(B, sq, Hkv, Hq // Hkv, d)
    s, t, _ = logits(qg, k.to(q.dtype), p, rows=_row_index(sq, q.device), off=sk - sq,
                     slopes=slopes)
    lse = torch.logsumexp(s, -1, keepdim=True)
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse)
    prob = torch.exp(s - lse).reshape(B, Hq, sq, sk)
    return prob, None if t is None else t.reshape(B, Hq, sq, sk)


def baseline_probabilities(q, k, p: Params, slopes=None, *, widened: bool = False):
    """The baseline's softmax probabilities of one uniform piece, ``(B, Hq, sq, sk)`` in the
    inputs' dtype: the math of the same-precision baseline (the logits at
    :attr:`Precision.BASELINE`, the softmax at the kernel's dtype), differentiable. ``slopes`` is
    float32 ``(Hq,)``/``(B, Hq)`` or None. ``widened``: logits and softmax in float32, ``P``
    rounded to the dtype (as :func:`_widened_chunk`), the yardstick where the plain one
    overflows."""
    B, sq, Hq, d = q.shape
    sk, Hkv = k.shape[1], k.shape[2]
    qg = q.reshape(B, sq, Hkv, Hq // Hkv, d)
    s, _, seen = logits(qg, k, p, rows=_row_index(sq, q.device), off=sk - sq, slopes=slopes,
                        precision=Precision.WIDENED if widened else Precision.BASELINE)
    prob = torch.softmax(s, dim=-1)
    if seen is not None:
        prob = prob.masked_fill(~seen.any(-1)[:, None], 0.0)
    return prob.reshape(B, Hq, sq, sk).to(q.dtype)
