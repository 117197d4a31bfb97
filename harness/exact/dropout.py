"""Exact dropout judging for kernels that do not expose their dropout mask.

With the RNG seed fixed, a dropout kernel's output is linear in V: ``out = D(P) V`` where
``D(P) = M * P / (1 - p)`` holds the kept (``M = 1``) and rescaled softmax probabilities. Calling
the kernel with V = identity blocks of ``head_dim`` columns reads ``D(P)`` off the outputs,
``head_dim`` keys per call (:func:`recover`). ``D(P)`` is then judged exactly against the float64
reference ``P`` (:func:`judge_forward`): every entry is 0 or ``P_ij / (1 - p)`` within the parity
rule, the kept fraction matches ``1 - p`` (a binomial test far out), and keep patterns differ
between heads (the heads of one GQA group too) and between batch entries. The mask read off the
forward then fixes the backward's reference (:func:`reference_gradients`): a backward that
regenerates another mask than the forward's (PyTorch #197563 on CK) fails the parity rule on dq,
dk and dv (:func:`judge_backward`), which no statistical test can see.

Tolerance of ``D(P)``: for V = identity, ``D(P)`` *is* the kernel's output, so it gets the
forward's parity rule, ``k = 2`` times the error of the same-dtype baseline (softmax at the
kernel's dtype, scaled by ``1/(1-p)`` at that dtype, as flash-attn's tests' ``attention_ref``
with ``upcast=False``) on ``P/(1-p)``, floored at half an ulp of the largest ``P/(1-p)``
(:func:`harness.exact.judge.rounding_floor`), plus ``judge.ATOL``; for float32 the float32 exact
computation's error is taken when larger, as the fwd check does. An ulp floor alone would be
too strict: 16-bit kernels round the scores as well as ``P`` (flash-attn rounds ``P`` to 16 bits
before the second matmul), which the baseline's error measures. An entry closer to 0 than to
``P/(1-p)`` is read as dropped; entries where ``P/(1-p)`` is within twice the tolerance of 0
cannot be told apart and do not count for the keep statistics (whether an entry counts depends
on ``P`` only, so the kept fraction stays unbiased).

Cost: ``ceil(seqlen_k / head_dim) + 3`` kernel calls (one repeat for seed-determinism, two with
another seed) and a few float64 copies of ``D``, so only cases within :data:`EXACT_MAX_CALLS`
and :data:`EXACT_MAX_ENTRIES` are judged exactly; above them (and where two seeded calls
differ) the statistical test of :func:`harness.exact.judge.dropout_verdict` stays the judge, and
:func:`mark_statistical` records why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.case import Case
from harness.exact import judge, reference
from harness.exact.inputs import Inputs
from harness.exact.outputs import Outputs
from harness.exact.scores import Params

#: The ``rng`` salt of the seeded calls: the recovery's forward calls and the backward that is
#: judged against them must share it.
RNG_SALT = "dropout-exact"
#: Salt of one more forward call that must give another mask (a seed-independent dropout fails).
OTHER_SALT = "dropout-exact-other"
#: Most entries of ``D(P)``, summed over the batch (``heads_q * seqlen_q * seqlen_k`` per
#: sequence): 32 MiB of float64; the judge holds about ten such tensors at once.
EXACT_MAX_ENTRIES = 1 << 22
#: Most kernel calls to recover ``D(P)``: ``ceil(seqlen_k / head_dim) + 3``.
EXACT_MAX_CALLS = 34
#: Standard errors out of the binomial test of the kept fraction (as the statistical tests).
KEEP_SIGMAS = judge.DROPOUT_SIGMAS
#: Fewest ``n * p * (1 - p)`` (binomial variance) for the keep-rate test to be run.
KEEP_MIN_VARIANCE = 25.0
#: Chance of two independent masks agreeing on every jointly decided entry that is accepted as
#: "identical": the number of entries compared must push it below this.
IDENTICAL_FALSE_ALARM = 1e-9


def exact_cost(case: Case) -> tuple[int, int]:
    """``(kernel calls, entries of D(P))`` the exact judge of ``case`` needs."""
    lengths = case.sequence_lengths()
    longest = max((sk for _, sk in lengths), default=0)
    calls = max(1, -(-longest // case.dv)) + 3  # V = identity blocks of head_dim_v columns
    entries = sum(case.heads_q * sq * sk for sq, sk in lengths)
    return calls, entries


def exact_refusal(case: Case) -> str:
    """Why ``case``'s dropout cannot be judged exactly (empty when it can)."""
    if not case.dropout_p:
        return "the case has no dropout"
    if case.entry == "kvcache":
        return "the kvcache entry point has no dropout"
    if case.dtype not in ("float16", "bfloat16", "float32"):
        return f"dtype={case.dtype} has no dropout judge"
    calls, entries = exact_cost(case)
    if calls > EXACT_MAX_CALLS or entries > EXACT_MAX_ENTRIES:
        return (f"exact dropout needs {calls} kernel calls and {entries:.3g} entries of D(P) "
                f"(limits {EXACT_MAX_CALLS} and {EXACT_MAX_ENTRIES:.3g})")
    return ""


# ----------------------------------------------------------------------------- recovery


def identity_values(inputs: Inputs, block: int) -> torch.Tensor:
    """V for recovery call ``block``: key ``block * d + c`` of every sequence (and every kv
    head) has the unit vector ``e_c``, all other keys zero. Shaped like ``inputs.v``,
    contiguous, in its dtype (0 and 1 are exact in every dtype)."""
    v = inputs.v
    d = v.shape[-1]
    values = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    for piece in inputs.sequences():
        view = piece.kv_like(values)  # (B, s, hkv, d), a view of values
        j0, j1 = block * d, min(view.shape[1], (block + 1) * d)
        if j1 > j0:
            cols = torch.arange(j1 - j0, device=v.device)
            view[:, j0 + cols, :, cols] = 1
    return values


def with_values(inputs: Inputs, v: torch.Tensor) -> Inputs:
    """A copy of ``inputs`` whose v holds ``v``'s values in ``inputs.v``'s geometry (strides,
    gaps, packing): ``Inputs.clone()`` when the inputs have it, else v alone is rebuilt."""
    clone = getattr(inputs, "clone", None)
    if clone is not None:
        copy = clone()
        with torch.no_grad():
            copy.v.copy_(v)
        return copy
    copy = Inputs(**inputs.__dict__)
    copy.v = _same_geometry(inputs.v, v)
    return copy


def _same_geometry(like: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if like.is_contiguous():
        return values.to(like.dtype).contiguous()
    size = like.untyped_storage().nbytes() // like.element_size()
    buf = torch.full((size,), math.nan, dtype=like.dtype, device=like.device)
    view = buf.as_strided(like.shape, like.stride(), like.storage_offset())
    view.copy_(values)
    return view


@dataclass(frozen=True)
class Recovery:
    """``D(P)`` read off a kernel's seeded outputs.

    Attributes:
        seeded: two calls after the same seed with the same V agreed bitwise.
        calls: kernel calls made.
        d: per piece of the batch (:meth:`Inputs.sequences`), float64 ``(B, Hq, sq, sk)``;
            empty when not seeded.
        differing: elements that differed between the two seeded calls.
        seed_dependent: whether a call under another seed gave another output (None: not tried).
        reason: why the dropout is not a function of the seed (empty when it is).
    """

    seeded: bool
    calls: int
    d: list[torch.Tensor] = field(default_factory=list)
    differing: int = 0
    seed_dependent: bool | None = None
    reason: str = ""


def recover(call: Callable[[torch.Tensor], torch.Tensor], inputs: Inputs,
            other: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Recovery:
    """Recover ``D(P)`` of every (sequence, head) with ``ceil(seqlen_k / head_dim)`` calls.

    Args:
        call: ``call(v) -> out``: the kernel's forward output for the case's inputs with v
            replaced by ``v`` (shaped like ``inputs.v``; lay it out with :func:`with_values`),
            the global RNG seeded identically before every call.
        inputs: the case's inputs (shapes, lengths).
        other: optional, the same call under another seed; when given, its output must differ
            (a dropout that ignores the seed repeats its mask in every training step).

    Returns:
        A :class:`Recovery`; ``seeded`` False (after 2 calls) when two calls with the same V
        differ: the kernel's dropout is then not a function of the seed.
    """
    d = inputs.v.shape[-1]
    longest = max((piece.kv_like(inputs.v).shape[1] for piece in inputs.sequences()), default=0)
    blocks = max(1, -(-longest // d))
    first_v = identity_values(inputs, 0)
    with torch.no_grad():
        first = call(first_v).detach().clone()
        again = call(first_v).detach()
    differing, worst = judge.bitwise_diff(first, again)
    if differing:
        return Recovery(False, 2, differing=differing, reason=(
            f"two calls after the same torch.manual_seed with the same V differ in {differing} "
            f"of {first.numel()} elements (max |diff| {worst:.3g}): the kernel's dropout is not "
            "a function of the seed (or its forward does not repeat)"))
    outs = [first]
    with torch.no_grad():
        for block in range(1, blocks):
            outs.append(call(identity_values(inputs, block)).detach())
    calls = 1 + blocks
    seed_dependent = None
    if other is not None:
        # V = ones: each output is the row sum of D over every key, so the comparison sees the
        # whole mask (an identity block shows only its own keys, possibly none that are visible).
        ones = torch.ones(inputs.v.shape, dtype=inputs.v.dtype, device=inputs.v.device)
        with torch.no_grad():
            here = call(ones).detach()
            elsewhere = other(ones).detach()
        calls += 2
        seed_dependent = judge.bitwise_diff(here, elsewhere)[0] > 0
    pieces = []
    for piece in inputs.sequences():
        sk = piece.kv_like(inputs.v).shape[1]
        cols = [piece.q_like(o).permute(0, 2, 1, 3).to(torch.float64) for o in outs]
        pieces.append(torch.cat(cols, dim=-1)[..., :sk].contiguous())
    return Recovery(True, calls, pieces, seed_dependent=seed_dependent)


# ------------------------------------------------------------------------ the references


def _piece_tensors(inputs: Inputs, slopes_dtype: torch.dtype | None = None):
    """Per piece: ``(piece, (q, k, v, dout), slopes)``, slopes cut to the piece (per-sequence
    ALiBi) and cast to ``slopes_dtype`` (default: as given, float32)."""
    slopes = inputs.alibi_slopes if inputs.case.alibi else None
    if slopes is not None and slopes_dtype is not None:
        slopes = slopes.to(slopes_dtype)
    for index, piece in enumerate(inputs.sequences()):
        yield piece, (piece.q_like(inputs.q), piece.kv_like(inputs.k), piece.kv_like(inputs.v),
                      piece.q_like(inputs.dout)), reference._piece_slopes(slopes, piece, index)


def _exact_dtype(inputs: Inputs) -> torch.dtype:
    """float64 on every device: the matrices are small (:data:`EXACT_MAX_ENTRIES`)."""
    return torch.float64


@reference.ieee_float32
def reference_probabilities(inputs: Inputs, dtype: torch.dtype | None = None
                            ) -> list[torch.Tensor]:
    """Per piece, the exact softmax probabilities ``(B, Hq, sq, sk)`` (default float64)."""
    dtype = dtype or _exact_dtype(inputs)
    p = Params.of(inputs.case)
    out = []
    for _, (q, k, _, _), slopes in _piece_tensors(inputs, dtype):
        out.append(reference.probabilities(q.to(dtype), k, p, slopes)[0])
    return out


@reference.ieee_float32
def baseline_dropped(inputs: Inputs, *, widened: bool = False) -> list[torch.Tensor]:
    """Per piece, the baseline's ``P / (1 - p)`` at the kernel's dtype (every entry kept);
    ``widened``: softmax in float32 (:func:`harness.exact.reference.baseline_probabilities`)."""
    p = Params.of(inputs.case)
    factor = torch.tensor(1.0 / (1.0 - inputs.case.dropout_p), dtype=inputs.q.dtype,
                          device=inputs.device)
    out = []
    with torch.no_grad():
        for _, (q, k, _, _), slopes in _piece_tensors(inputs):
            prob = reference.baseline_probabilities(q, k, p, slopes, widened=widened)
            out.append(prob * factor)
    return out


def _expand_heads(t: torch.Tensor, heads_q: int) -> torch.Tensor:
    """kv heads repeated for the query heads: ``(B, s, Hkv, d) -> (B, s, Hq, d)``."""
    b, s, hkv, d = t.shape
    return t[:, :, :, None].expand(b, s, hkv, heads_q // hkv, d).reshape(b, s, heads_q, d)


def _group_sum(t: torch.Tensor, heads_kv: int) -> torch.Tensor:
    b, s, hq, d = t.shape
    return t.reshape(b, s, heads_kv, hq // heads_kv, d).sum(3)


@reference.ieee_float32
def reference_gradients(inputs: Inputs, keep: list[torch.Tensor], *,
                        dtype: torch.dtype | None = None) -> Outputs:
    """Exact out, dq, dk, dv with the dropout mask fixed, in the layout of the entry point.

    With ``D = M * P / (1 - p)`` (``M`` = ``keep``, per piece ``(B, Hq, sq, sk)`` bool),
    ``O = D V``, ``dV = D^T dO``, ``dD = dO V^T``,
    ``dS = P * (dD * M / (1 - p) - delta)`` with ``delta = rowsum(dO * O)``, times
    ``1 - tanh^2`` under softcap; ``dQ = scale * dS K`` and ``dK = scale * dS^T Q``, summed over
    the query heads of each kv head. ALiBi and the mask enter through ``P`` only.
    """
    case = inputs.case
    dtype = dtype or _exact_dtype(inputs)
    p = Params.of(case)
    rate = 1.0 - case.dropout_p
    out_shape = (*inputs.q.shape[:-1], inputs.v.shape[-1])  # v's head dim (head_dim_v)
    result = Outputs(out=torch.zeros(out_shape, dtype=dtype, device=inputs.device),
                     dq=torch.zeros(inputs.q.shape, dtype=dtype, device=inputs.device),
                     dk=torch.zeros(inputs.k.shape, dtype=dtype, device=inputs.device),
                     dv=torch.zeros(inputs.v.shape, dtype=dtype, device=inputs.device))
    for (piece, tensors, slopes), mask in zip(_piece_tensors(inputs, dtype), keep, strict=True):
        q, k, v, do = (t.to(dtype) for t in tensors)
        if q.shape[1] == 0 or k.shape[1] == 0:
            continue
        hq, hkv = q.shape[2], k.shape[2]
        prob, t = reference.probabilities(q, k, p, slopes)
        kept = mask.to(dtype) / rate
        dropped = prob * kept
        ke, ve = _expand_heads(k, hq), _expand_heads(v, hq)
        out = torch.einsum("bhij,bjhd->bihd", dropped, ve)
        dv = torch.einsum("bhij,bihd->bjhd", dropped, do)
        d_dropped = torch.einsum("bihd,bjhd->bhij", do, ve)
        delta = (do * out).sum(-1).permute(0, 2, 1)[..., None]
        ds = prob * (d_dropped * kept - delta)
        if t is not None:
            ds = ds * (1 - t * t)
        dq = torch.einsum("bhij,bjhd->bihd", ds, ke) * p.scale
        dk = torch.einsum("bhij,bihd->bjhd", ds, q) * p.scale
        piece.put_q(result.out, out)
        piece.put_q(result.dq, dq)
        piece.put_kv(result.dk, _group_sum(dk, hkv))
        piece.put_kv(result.dv, _group_sum(dv, hkv))
    return result


@reference.ieee_float32
def baseline_gradients(inputs: Inputs, keep: list[torch.Tensor], *,
                       widened: bool = False) -> Outputs:
    """The same math at the kernel's dtype, by autograd, with the mask fixed: flash-attn's
    tests' ``attention_ref(..., dropout_mask, upcast=False)`` (dropped probabilities times
    ``v / (1 - p)``, kv heads repeated so the group sum happens at the low dtype too).
    ``widened``: scores and softmax in float32, ``P`` rounded to the dtype (where the plain
    math overflows)."""
    case = inputs.case
    p = Params.of(case)
    dt, dev = inputs.q.dtype, inputs.device
    out_shape = (*inputs.q.shape[:-1], inputs.v.shape[-1])  # v's head dim (head_dim_v)
    result = Outputs(out=torch.zeros(out_shape, dtype=dt, device=dev),
                     dq=torch.zeros(inputs.q.shape, dtype=dt, device=dev),
                     dk=torch.zeros(inputs.k.shape, dtype=dt, device=dev),
                     dv=torch.zeros(inputs.v.shape, dtype=dt, device=dev))
    for (piece, (q, k, v, do), slopes), mask in zip(_piece_tensors(inputs), keep, strict=True):
        if q.shape[1] == 0 or k.shape[1] == 0:
            continue
        hq = q.shape[2]
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        with torch.enable_grad():
            ke, ve = _expand_heads(kk, hq), _expand_heads(vv, hq)
            prob = reference.baseline_probabilities(qq, ke, p, slopes, widened=widened)
            dropped = prob.masked_fill(~mask, 0.0)
            out = torch.einsum("bhij,bjhd->bihd", dropped, ve * (1.0 / (1.0 - case.dropout_p)))
            dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do)
        piece.put_q(result.out, out.detach())
        piece.put_q(result.dq, dq)
        piece.put_kv(result.dk, dk)
        piece.put_kv(result.dv, dv)
    return result


# ------------------------------------------------------------------------------ judging


@dataclass(frozen=True)
class MaskReading:
    """What :func:`read_masks` made of a recovered ``D(P)``.

    Attributes:
        keep: per piece, bool ``(B, Hq, sq, sk)``: the entry is closer to ``P/(1-p)`` than to 0.
        decided: per piece, bool: ``P/(1-p)`` is more than twice the tolerance from 0, so the
            entry is kept or dropped unambiguously (a function of ``P`` only).
        bad: per piece, bool: NaN/Inf, or within the tolerance of neither 0 nor ``P/(1-p)``.
        comparison: the parity rule's numbers; ``err`` is the worst distance to the nearer of
            0 and ``P/(1-p)``.
        widened: the plain baseline overflowed, so the yardstick is the widened one (scores
            and softmax in float32, ``P`` rounded to the kernel's dtype).
    """

    keep: list[torch.Tensor]
    decided: list[torch.Tensor]
    bad: list[torch.Tensor]
    comparison: judge.Comparison
    widened: bool = False


def read_masks(recovery: Recovery, inputs: Inputs) -> MaskReading:
    """Classify every entry of ``D(P)`` as kept, dropped or wrong (see the module docstring)."""
    rate = 1.0 - inputs.case.dropout_p
    targets = [prob / rate for prob in reference_probabilities(inputs)]
    baselines = baseline_dropped(inputs)
    widened = not all(bool(torch.isfinite(b).all()) for b in baselines)
    if widened:  # the plain baseline overflows (scaled or large values): flash-attn's split
        baselines = baseline_dropped(inputs, widened=True)
    dtype = inputs.q.dtype
    if dtype == torch.float32:  # as the fwd check: the larger of the two float32 algorithms
        fp32 = [prob / rate for prob in reference_probabilities(inputs, torch.float32)]
        baselines = [max((a, b), key=lambda x, t=t: _max_abs(x.double() - t))
                     for a, b, t in zip(baselines, fp32, targets, strict=True)]
    baseline_err = max((_max_abs(b.double() - t) for b, t in zip(baselines, targets,
                                                                  strict=True)), default=0.0)
    largest = max((_max_abs(t) for t in targets), default=0.0)
    floor = judge.rounding_floor(largest, dtype)
    allowed = judge.K_OUT * max(baseline_err, floor) + judge.ATOL[dtype]
    keep, decided, bad = [], [], []
    err, worst = 0.0, None
    mismatched = nonfinite = total = 0
    for index, (dm, target) in enumerate(zip(recovery.d, targets, strict=True)):
        finite = torch.isfinite(dm)
        to_zero, to_kept = dm.abs(), (dm - target).abs()
        distance = torch.where(finite, torch.minimum(to_zero, to_kept),
                               torch.full_like(dm, math.inf))
        wrong = distance > allowed
        keep.append(finite & (to_kept < to_zero))
        decided.append(target > 2 * allowed)
        bad.append(wrong)
        mismatched += int(wrong.sum())
        nonfinite += int((~finite).sum())
        total += dm.numel()
        if dm.numel():
            flat = int(distance.flatten().argmax())
            if worst is None or float(distance.flatten()[flat]) > err:
                err = float(distance.flatten()[flat])
                position = [int(i) for i in torch.unravel_index(torch.tensor(flat),
                                                                 dm.shape)]
                worst = ((index, *position), float(dm.flatten()[flat]),
                         float(target.flatten()[flat]))
    where, value, ref = worst if worst is not None else ((), 0.0, 0.0)
    comparison = judge.Comparison("D(P)", err, baseline_err, allowed, mismatched, nonfinite,
                                  total, tuple(where), value, ref, floor)
    return MaskReading(keep, decided, bad, comparison, widened)


def _max_abs(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    return float(torch.nan_to_num(t.abs(), nan=0.0, posinf=0.0).max())


def keep_rate(reading: MaskReading, dropout_p: float) -> dict[str, Any]:
    """Binomial test of the kept fraction over the decided, well-formed entries."""
    n = kept = 0
    for keep, decided, bad in zip(reading.keep, reading.decided, reading.bad, strict=True):
        counted = decided & ~bad
        n += int(counted.sum())
        kept += int((keep & counted).sum())
    q = 1.0 - dropout_p
    variance = n * q * dropout_p
    result: dict[str, Any] = {"decided": n, "kept": kept, "kept_fraction": kept / n if n else None,
                              "expected_kept_fraction": q, "keep_sigmas": KEEP_SIGMAS}
    if variance < KEEP_MIN_VARIANCE:
        result.update({"keep_rate_tested": False, "keep_z": None})
        return result
    z = (kept - n * q) / math.sqrt(variance)
    result.update({"keep_rate_tested": True, "keep_z": z})
    return result


def _identical_needed(dropout_p: float) -> int:
    """Jointly decided entries two independent masks must share to call equality identity."""
    agree = dropout_p ** 2 + (1 - dropout_p) ** 2
    return math.ceil(math.log(IDENTICAL_FALSE_ALARM) / math.log(agree)) if agree < 1 else 0


#: Identical pairs listed in the metrics (all are counted).
EXAMPLES = 8
#: Most sequences of a varlen batch whose masks are compared pairwise.
BATCH_UNITS_MAX = 64


#: Most rows (heads of one batch entry, batch entries of one head) compared pairwise: a mask
#: shared between rows shows among the first ones, and 65,536 tiny problems would otherwise
#: cost 2 billion row comparisons.
ROWS_MAX = 256


def _identical_rows(keep: torch.Tensor, ok: torch.Tensor, need: int) -> tuple[int, list]:
    """``(pairs compared, [[i, j], ...] identical)`` over the rows of ``(U, N)`` masks: a pair
    is compared when at least ``need`` entries are decided in both rows. Only rows with that
    many decided entries of their own can be (the first :data:`ROWS_MAX` of them)."""
    rows = torch.nonzero(ok.sum(-1) >= max(need, 1)).flatten()[:ROWS_MAX]
    if rows.numel() < 2:
        return 0, []
    keep, ok = keep[rows], ok[rows]
    tested_pairs, same = 0, []
    for i in range(keep.shape[0] - 1):
        joint = ok[i] & ok[i + 1:]
        differ = ((keep[i] != keep[i + 1:]) & joint).sum(-1)
        tested = joint.sum(-1) >= max(need, 1)
        tested_pairs += int(tested.sum())
        same += [[int(rows[i]), int(rows[i + 1 + int(j)])]
                 for j in torch.nonzero(tested & (differ == 0)).flatten()]
    return tested_pairs, same


def identical_masks(reading: MaskReading, dropout_p: float, group: int) -> dict[str, Any]:
    """Pairs of heads (same batch entry) and of batch entries (same head) whose keep patterns
    are identical on enough jointly decided entries to rule out chance
    (:data:`IDENTICAL_FALSE_ALARM`).

    Varlen sequences (the first :data:`BATCH_UNITS_MAX`) are compared pairwise on their common
    leading ``(sq, sk)`` block.
    """
    need = _identical_needed(dropout_p)
    heads: list[list[int]] = []
    batch: list[list[int]] = []
    head_pairs = batch_pairs = 0
    oks = [decided & ~bad for decided, bad in zip(reading.decided, reading.bad, strict=True)]
    units = []  # (batch label, keep (Hq, sq, sk), ok (Hq, sq, sk))
    for index, (keep, ok) in enumerate(zip(reading.keep, oks, strict=True)):
        for b in range(keep.shape[0]):
            units.append((index + b, keep[b], ok[b]))
            n, same = _identical_rows(keep[b].flatten(1), ok[b].flatten(1), need)
            head_pairs += n
            heads += [[index + b, h1, h2] for h1, h2 in same]
    if len(reading.keep) == 1:  # one uniform piece: all batch entries at once, per head
        keep, ok = reading.keep[0], oks[0]
        for h in range(keep.shape[1]):
            n, same = _identical_rows(keep[:, h].flatten(1), ok[:, h].flatten(1), need)
            batch_pairs += n
            batch += [[b1, b2, h] for b1, b2 in same]
    else:
        units = units[:BATCH_UNITS_MAX]
        for i, (b1, keep1, ok1) in enumerate(units):
            for b2, keep2, ok2 in units[i + 1:]:
                sq, sk = min(keep1.shape[1], keep2.shape[1]), min(keep1.shape[2], keep2.shape[2])
                joint = ok1[:, :sq, :sk] & ok2[:, :sq, :sk]
                differ = (keep1[:, :sq, :sk] != keep2[:, :sq, :sk]) & joint
                tested = joint.sum((1, 2)) >= max(need, 1)
                batch_pairs += int(tested.sum())
                same = tested & (differ.sum((1, 2)) == 0)
                batch += [[b1, b2, int(h)] for h in torch.nonzero(same).flatten().tolist()]
    in_group = [pair for pair in heads if pair[1] // group == pair[2] // group]
    return {"identical_needed": need, "head_pairs": head_pairs, "batch_pairs": batch_pairs,
            "identical_head_pairs": len(heads), "identical_heads_in_group": len(in_group),
            "identical_batch_pairs": len(batch),
            # examples only: a record stays small however many pairs coincide
            "identical_heads": heads[:EXAMPLES], "identical_batch": batch[:EXAMPLES]}


def _seed_match_is_telling(rate: dict[str, Any], p: float) -> bool:
    """Whether two seeds agreeing bit for bit shows seed independence: two independent masks
    agree on ``n`` decided entries with probability ``(p**2 + (1 - p)**2) ** n``; a tiny case
    (one key) agrees by chance most of the time, so only a chance below 1e-9 counts."""
    n = int(rate.get("decided") or 0)
    agree = p * p + (1 - p) * (1 - p)
    return n > 0 and 0 < agree < 1 and n * math.log(agree) < math.log(1e-9)


def judge_forward(recovery: Recovery, inputs: Inputs, *, check: str = "fwd") -> judge.Verdict:
    """The exact dropout verdict of a recovered ``D(P)``.

    Fails when an entry is neither 0 nor ``P_ij / (1 - p)`` (rows without keys must be all 0),
    when the kept fraction is more than :data:`KEEP_SIGMAS` standard errors from ``1 - p``, when
    two heads or two batch entries share one keep pattern, or when another seed gives the same
    output. ``metrics["dropout"]["exact"]`` is True; ``metrics["ratio"]`` and ``["err"]`` are
    the worst entry's, as for parity verdicts.
    """
    if not recovery.seeded:
        raise ValueError("judge_forward needs a seeded recovery; use the statistical test")
    case = inputs.case
    reading = read_masks(recovery, inputs)
    c = reading.comparison
    rate = keep_rate(reading, case.dropout_p)
    same = identical_masks(reading, case.dropout_p, case.group_size)
    problems = []
    if not c.ok:
        problems.append(_entries_message(c))
    if rate["keep_rate_tested"] and abs(rate["keep_z"]) > KEEP_SIGMAS:
        problems.append(f"kept fraction {rate['kept_fraction']:.4f} of {rate['decided']} entries "
                        f"is {rate['keep_z']:+.1f} standard errors from 1 - p = "
                        f"{1 - case.dropout_p:.4f}: wrong drop probability")
    if same["identical_heads"]:
        b, h1, h2 = same["identical_heads"][0]
        where = " (one GQA group)" if h1 // case.group_size == h2 // case.group_size else ""
        problems.append(f"{same['identical_head_pairs']} pairs of heads share one dropout mask, "
                        f"e.g. heads {h1} and {h2}{where} of batch entry {b}")
    if same["identical_batch"]:
        b1, b2, h = same["identical_batch"][0]
        problems.append(f"{same['identical_batch_pairs']} pairs of batch entries share one "
                        f"dropout mask, e.g. entries {b1} and {b2} in head {h}")
    if recovery.seed_dependent is False and _seed_match_is_telling(rate, case.dropout_p):
        problems.append("another torch.manual_seed gives the same output bit for bit: the "
                        "dropout mask does not depend on the seed")
    untested = _untested(rate, same, case)
    metrics: dict[str, Any] = {
        "dropout": {"exact": True, "calls": recovery.calls, "untested": untested,
                    "seed_dependent": recovery.seed_dependent, **rate, **same,
                    "D": c.metrics(), "widened_yardstick": reading.widened},
        "dropout_p": case.dropout_p,
        "ratio": _finite(c.ratio), "err": _finite(c.err),
        "verdict_kind": "exact-dropout",
    }
    notes = problems + ([f"exact dropout judged, but too few unambiguous entries (P/(1-p) "
                         f"more than twice the tolerance from 0) to test {', '.join(untested)}"]
                        if untested else [])
    return judge.Verdict(check, "fail" if problems else "pass", metrics, "; ".join(notes))


def _untested(rate: dict[str, Any], same: dict[str, Any], case: Case) -> list[str]:
    """The sub-tests of :func:`judge_forward` that had too few entries to run."""
    out = []
    if not rate["keep_rate_tested"]:
        out.append(f"the keep rate ({rate['decided']} entries)")
    if case.heads_q > 1 and not same["head_pairs"]:
        out.append("distinct masks across heads")
    if case.batch > 1 and not same["batch_pairs"]:
        out.append("distinct masks across batch entries")
    return out


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _entries_message(c: judge.Comparison) -> str:
    """``assert_close``-style: how many entries, the worst, where, and what was allowed."""
    where = f"at {c.worst_index} (piece, batch, head, query, key)"
    if c.nonfinite:
        return f"D(P): {c.nonfinite} of {c.total} entries are NaN/Inf, first {where}"
    ratio = f"{c.ratio:.3g}x" if c.ratio is not None else "n/a"
    return (f"D(P): {c.mismatched} of {c.total} entries are neither 0 nor P/(1-p); worst "
            f"distance {c.err:.3g} {where} (kernel {c.kernel_value:.6g}, P/(1-p) "
            f"{c.reference_value:.6g}); allowed {c.allowed:.3g} = "
            f"k x max(baseline error {c.baseline_err:.3g}, rounding floor "
            f"{c.rounding_floor:.3g}) + atol; ratio {ratio}")


def keep_masks(recovery: Recovery, inputs: Inputs) -> list[torch.Tensor]:
    """The keep masks of a recovered ``D(P)`` (for :func:`judge_backward`)."""
    return read_masks(recovery, inputs).keep


def judge_backward(keep: list[torch.Tensor], inputs: Inputs, kernel: Outputs, *,
                   calls: int = 0, check: str = "bwd") -> judge.Verdict:
    """dq, dk, dv of one seeded forward+backward against the exact gradients with the mask the
    forward used (``keep``, from :func:`keep_masks`), under the parity rule with ``k = 3``."""
    ref = reference_gradients(inputs, keep)
    base = baseline_gradients(inputs, keep)
    widened = not all(bool(torch.isfinite(t).all()) for t in base.grads().values())
    if widened:
        base = baseline_gradients(inputs, keep, widened=True)
    dtype = inputs.q.dtype
    if dtype == torch.float32:
        fp32 = reference_gradients(inputs, keep, dtype=torch.float32)
        for name in ("dq", "dk", "dv"):
            r = getattr(ref, name)
            if _max_abs(getattr(fp32, name).double() - r) > _max_abs(getattr(base, name).double()
                                                                      - r):
                setattr(base, name, getattr(fp32, name))
    comparisons = [judge.compare(name, getattr(kernel, name), getattr(base, name),
                                 getattr(ref, name), k=judge.K_GRAD, atol=judge.ATOL[dtype])
                   for name in ("dq", "dk", "dv")]
    verdict = judge.parity_verdict(check, comparisons)
    reason = verdict.reason
    if verdict.status == "fail":
        reason = ("gradients disagree with the exact ones for the dropout mask the forward used "
                  "(a backward that regenerates another mask fails here): " + reason)
    metrics = dict(verdict.metrics)
    metrics["dropout"] = {"exact": True, "calls": calls, "widened_yardstick": widened}
    metrics["verdict_kind"] = "exact-dropout"
    return judge.Verdict(check, verdict.status, metrics, reason)


def mark_statistical(verdict: judge.Verdict, why: str) -> judge.Verdict:
    """A statistical dropout verdict recording why the exact judge was not used."""
    metrics = dict(verdict.metrics)
    metrics["dropout"] = {**metrics.get("dropout", {}), "exact": False, "exact_why": why}
    note = f"judged statistically: {why}"
    reason = "; ".join(x for x in (verdict.reason, note) if x)
    return judge.Verdict(verdict.check, verdict.status, metrics, reason)


# ------------------------------------------------------------------------------ one check


@dataclass(frozen=True)
class Exact:
    """The exact route's outcome for one check.

    Attributes:
        verdict: the exact verdict, or None when the statistical test must judge.
        why_not: why the exact judge was not used (empty when ``verdict`` is set).
        recovery: the recovered ``D(P)`` (reuse it for the other check), or None.
    """

    verdict: judge.Verdict | None
    why_not: str
    recovery: Recovery | None


def exact_dropout(check: str, inputs: Inputs, call: Callable[[Inputs, str], Outputs],
                  call_backward: Callable[[str], Outputs] | None = None, *,
                  recovery: Recovery | None = None) -> Exact:
    """Run the exact dropout judge for the ``fwd`` or ``bwd`` check of a dropout case.

    Args:
        check: ``fwd`` or ``bwd``.
        inputs: the case's inputs.
        call: ``call(inputs, salt) -> Outputs``: one forward with the global RNG seeded from
            ``salt`` (the check context's ``call(inputs, rng=salt)``).
        call_backward: ``call_backward(salt) -> Outputs`` with dq, dk, dv, the same seeding
            (needed for ``bwd``).
        recovery: a recovery from an earlier check of the same case, to save its calls.

    Returns:
        An :class:`Exact`; ``verdict`` None with ``why_not`` when the case is too large
        (:func:`exact_refusal`) or the kernel's dropout is not a function of the seed.
    """
    why = exact_refusal(inputs.case)
    if why:
        return Exact(None, why, recovery)
    start = time.perf_counter()
    if recovery is None:
        recovery = recover(lambda v: call(with_values(inputs, v), RNG_SALT).out, inputs,
                           lambda v: call(with_values(inputs, v), OTHER_SALT).out)
    if not recovery.seeded:
        return Exact(None, recovery.reason, recovery)
    recovered_s = time.perf_counter() - start
    if check == "fwd":
        verdict = judge_forward(recovery, inputs, check=check)
    elif call_backward is None:
        raise ValueError("the bwd check needs call_backward")
    else:
        kernel = call_backward(RNG_SALT)
        verdict = judge_backward(keep_masks(recovery, inputs), inputs, kernel,
                                 calls=recovery.calls + 1, check=check)
    verdict.metrics["dropout"].update({"recovery_s": recovered_s,
                                       "total_s": time.perf_counter() - start})
    return Exact(verdict, "", recovery)
