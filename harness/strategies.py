"""Hypothesis strategies that draw attention cases where ports break.

:func:`cases` draws :class:`~harness.case.Case` values that a backend claims to support
(its :class:`~harness.backends.base.Capabilities`) and that fit a cost budget, biased towards the
corners: ``seqlen_q`` smaller and larger than ``seqlen_k`` under causal and local masks, lengths at
and around block multiples (64, 128, 256 and +-1), length 1 on either side, head dims that are not
multiples of 32, GQA/MQA with several kv heads, windows shorter than the sequence, softcap and
ALiBi strong enough to change the output, long key sequences with few queries, and every entry
point (dense, varlen with uneven and empty sequences, kv-cache, paged).

Shrinking moves every choice towards the simplest case (short sequences, one head, features off,
the first dtype the backend supports), so the minimal failing case names the feature at fault.
Cost is estimated before anything is allocated: the drawn lengths are scaled down until the
forward FLOPs and the input bytes fit the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from harness.backends.base import Capabilities
from harness.case import DTYPES, Case

#: Lengths where tiled kernels change code paths: tile edges and their neighbours.
EDGE_LENGTHS = (1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513)
#: flash-attn's own head-dim grid plus small and odd ones.
HEAD_DIMS = (64, 32, 128, 8, 16, 40, 59, 80, 96, 111, 160, 192, 224, 256, 1, 3)


@dataclass(frozen=True)
class Budget:
    """The largest case a profile draws: forward FLOPs and input bytes."""

    max_flops: float = 2e8
    max_bytes: int = 64 << 20
    max_seqlen: int = 4096


BUDGETS = {
    "quick": Budget(max_flops=5e7, max_bytes=32 << 20, max_seqlen=4096),
    "nightly": Budget(max_flops=5e9, max_bytes=1 << 30, max_seqlen=32768),
    "exhaustive": Budget(max_flops=5e10, max_bytes=4 << 30, max_seqlen=131072),
}


def _length(draw, max_len: int) -> int:
    """A sequence length: small, at a tile edge, or anything up to 1024. Every alternative is
    drawn every time, so the choice sequence keeps its shape while hypothesis shrinks."""
    kind = draw(st.sampled_from(("small", "edge", "any")))
    small = draw(st.integers(1, 16))
    edge = draw(st.sampled_from([n for n in EDGE_LENGTHS if n <= max_len]))
    anything = draw(st.integers(1, min(max_len, 1024)))
    return {"small": small, "edge": edge, "any": anything}[kind]


def _fit(case: Case, budget: Budget) -> Case | None:
    """Scale sequence lengths down until the case fits the budget (None if it never does)."""
    for _ in range(40):
        if case.flops_fwd() <= budget.max_flops and case.input_bytes() <= budget.max_bytes:
            return case
        if case.entry == "varlen":
            seqlens_q = tuple(max(0, n // 2) for n in case.seqlens_q)
            seqlens_k = tuple(max(0, n // 2) for n in case.seqlens_k)
            if sum(seqlens_q) == 0 or sum(seqlens_k) == 0:
                return None
            case = case.replace(seqlens_q=seqlens_q, seqlens_k=seqlens_k,
                                seqlen_q=max(seqlens_q), seqlen_k=max(seqlens_k))
        elif case.seqlen_k >= case.seqlen_q and case.seqlen_k > 1:
            seqlen_k = case.seqlen_k // 2
            lens = case.seqlens_k and tuple(min(n, seqlen_k) for n in case.seqlens_k)
            case = case.replace(seqlen_k=seqlen_k, seqlens_k=lens)
        elif case.seqlen_q > 1:
            case = case.replace(seqlen_q=case.seqlen_q // 2)
        else:
            return None
    return None


@st.composite
def cases(draw, capabilities: Capabilities | None = None, budget: Budget | None = None,
          backward: bool = False) -> Case:
    """Draw a case the capabilities allow, within the budget.

    Args:
        capabilities: what the backend claims; None means everything.
        budget: cost limits (default: the quick profile's).
        backward: only cases whose backward the backend can take (no kv-cache).
    """
    caps = capabilities or Capabilities()
    budget = budget or BUDGETS["quick"]
    feats = caps.features
    entries = [e for e in ("dense", "varlen", "kvcache") if e in caps.entries]
    if backward:
        entries = [e for e in entries if e != "kvcache"] or entries
    entry = draw(st.sampled_from(entries))
    dtype = draw(st.sampled_from([d for d in DTYPES if d in caps.dtypes]))
    dims = [d for d in HEAD_DIMS if (not caps.head_dim_max or d <= caps.head_dim_max)
            and d % caps.head_dim_multiple == 0]
    head_dim = draw(st.sampled_from(dims))
    heads_kv = draw(st.integers(1, 4))
    group = draw(st.sampled_from((1, 2, 4, 3, 8))) if "gqa" in feats else 1
    batch = draw(st.integers(1, 3))

    shape = draw(st.sampled_from(("pair", "square", "long-keys")))
    len_q, len_k = _length(draw, budget.max_seqlen), _length(draw, budget.max_seqlen)
    few_q = draw(st.integers(1, 8))
    many_k = draw(st.integers(1024, max(1024, budget.max_seqlen)))
    if shape == "long-keys":
        seqlen_q, seqlen_k = few_q, many_k
    else:
        seqlen_q, seqlen_k = len_q, (len_q if shape == "square" else len_k)
    if "seqlen_q>seqlen_k" not in feats and seqlen_q > seqlen_k:
        seqlen_q, seqlen_k = seqlen_k, seqlen_q

    fields: dict = dict(batch=batch, heads_kv=heads_kv, heads_q=heads_kv * group,
                        head_dim=head_dim, dtype=dtype, entry=entry)
    fields.update(_feature_fields(draw, feats, fields))
    fields.update(_entry_fields(draw, entry, batch, seqlen_q, seqlen_k, caps))
    case = _fit(Case(**fields), budget)
    _assume_not(case is None)
    _assume_not(bool(caps.reasons(case, "backend")))  # exclusive pairs and the like: rare
    return case


def _assume_not(condition: bool) -> None:
    from hypothesis import assume

    assume(not condition)


def _entry_fields(draw, entry, batch, seqlen_q, seqlen_k, caps) -> dict:
    if entry == "varlen":
        lens_q = draw(st.lists(st.integers(0, max(1, seqlen_q)), min_size=batch, max_size=batch))
        lens_k = draw(st.lists(st.integers(0, max(1, seqlen_k)), min_size=batch, max_size=batch))
        if sum(lens_q) == 0:
            lens_q[0] = max(1, seqlen_q)
        if sum(lens_k) == 0:
            lens_k[0] = max(1, seqlen_k)
        return dict(seqlens_q=tuple(lens_q), seqlens_k=tuple(lens_k), seqlen_q=max(lens_q),
                    seqlen_k=max(lens_k))
    out: dict = dict(seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    if entry == "kvcache":
        if draw(st.booleans()):
            out["seqlens_k"] = tuple(draw(st.lists(st.integers(0, seqlen_k), min_size=batch,
                                                   max_size=batch)))
        if "paged" in caps.features and draw(st.booleans()):
            multiple = max(1, caps.paged_block_multiple)
            out["paged_block_size"] = multiple * draw(st.sampled_from((1, 2)))
            if multiple == 1:
                out["paged_block_size"] = draw(st.sampled_from((16, 64, 256)))
    return out


def _feature_fields(draw, feats, fields) -> dict:
    """Features, each drawn every time (off first, so shrinking turns them off) and kept only
    when the backend claims it."""
    out: dict = {}
    causal = draw(st.booleans())
    left = draw(st.sampled_from((-1, 0, 1, 3, 16, 64)))
    right = draw(st.sampled_from((-1, 0, 1, 7, 32)))
    softcap = draw(st.sampled_from((0.0, 0.5, 1.0, 2.5, 5.0)))
    alibi = draw(st.booleans())
    scale = draw(st.sampled_from((None, 0.05, 0.3, 1.0)))
    layout = draw(st.sampled_from(("contiguous", "strided")))
    dropout_p = draw(st.sampled_from((0.0,) * 8 + (0.17, 0.3)))
    if "causal" in feats and causal:
        out["causal"] = True
    if "window" in feats:
        if causal and "causal" in feats:
            right = 0
        if (left, right) != (-1, -1) and not (causal and left == -1):
            out["window"] = (left, right)
    if "softcap" in feats and softcap:
        out["softcap"] = softcap
    if "alibi" in feats and alibi:
        out["alibi"] = True
    if "scale" in feats and scale is not None:
        out["scale"] = scale
    if "strided" in feats:
        out["layout"] = layout
    if "dropout" in feats and dropout_p and fields["entry"] != "kvcache":
        out["dropout_p"] = dropout_p
    return out
