"""Hypothesis strategies that draw attention cases where ports break.

:func:`cases` draws :class:`~harness.case.Case` values that a backend claims to support
(its :class:`~harness.backends.base.Capabilities`) and that fit a cost budget, biased towards the
corners: ``seqlen_q`` smaller and larger than ``seqlen_k`` under causal and local masks, lengths at
and around block multiples (64, 128, 256 and +-1), length 1 on either side, head dims that are not
multiples of 32, GQA/MQA with several kv heads, windows shorter than the sequence, softcap and
ALiBi strong enough to change the output, long key sequences with few queries, and every entry
point (dense, varlen with uneven and empty sequences, kv-cache, paged).

It also draws the input space of issue 12: value distributions (``Case.values``: scaled,
key-bias, sink, flat, large; scaled and key-bias in 16-bit dtypes most often), per-tensor
layouts the backend claims (packed qkv/kv, v with strides unlike k's, a non-contiguous dout, a
last dimension with stride 2), many tiny problems (batch x heads past 65,535 with one or two
tokens) and decode against long keys (up to 16 queries, 16k to 128k+ keys).

Shrinking moves every choice towards the simplest case (short sequences, one head, features off,
normal values, contiguous tensors, the first dtype the backend supports), so the minimal failing
case names the feature at fault. Cost is estimated before anything is allocated: the drawn
lengths are scaled down until the forward FLOPs and the input bytes fit the budget.

No vacuous draws: a generated case in which an enabled feature cannot change the output (a mask
or window that hides no key, a scale or ALiBi with at most one visible key per row, a softcap
far above the scores, strides that coincide with contiguous ones) is redrawn
(:func:`vacuous_features`, a cheap static rule per feature). Shrinking may still reach them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from harness.backends.base import Capabilities
from harness.case import (
    DTYPE_MAX,
    DTYPES,
    FP8_DTYPES,
    LAYOUT_ENTRIES,
    LAYOUT_FEATURES,
    VALUE_SCALE_DEFAULTS,
    Case,
    attended_pairs,
)
from harness.case.model import sink_pairs
from harness.errors import InvalidCase

#: Lengths where tiled kernels change code paths: tile edges and their neighbours.
EDGE_LENGTHS = (1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513)
#: flash-attn's own head-dim grid plus small and odd ones.
HEAD_DIMS = (64, 32, 128, 8, 16, 40, 59, 80, 96, 111, 160, 192, 224, 256, 1, 3)


#: Values distributions and their parameters (None = the distribution's default); normal first
#: so shrinking moves there. Drawn with a 16-bit dtype: scaled and key-bias twice as often.
VALUES_16BIT = ("normal", "normal", "scaled", "key-bias", "scaled", "key-bias", "scaled", "sink",
                "flat", "large", "large")
VALUES_32BIT = ("normal", "normal", "normal", "scaled", "key-bias", "sink", "flat", "large")
VALUE_SCALES = {"scaled": (None, 100.0, 3.0, 1000.0), "key-bias": (None, 100.0, 1000.0),
                "sink": (None, 10.0, 100.0), "flat": (None, 1e-5), "large": (None, 20.0)}
#: float16 only: its 65,504 is where an unscaled ``q . k`` overflows (flash-attn #334/#443, FA3
#: #1052), which takes scaled x100 or large inputs: drawn in about two float16 cases of five.
VALUES_FP16 = ("normal", "scaled", "key-bias", "scaled", "large", "scaled", "sink", "large",
               "flat", "scaled")
SCALED_FP16 = (None, 100.0, 1000.0, 100.0)
#: Layouts, the default first.
LAYOUT_CHOICES = ("contiguous", "strided", "packed-qkv", "packed-kv", "v-transposed",
                  "dout-strided", "lastdim-strided", "latent-kv", "padded")
#: Key lengths of the long-key decode shape: just past and at 16k, past 32k, 64k and 128k (the
#: first is where shrinking and a corner's first case land: one key past 16,384).
DECODE_KEYS = (16385, 16384, 32769, 65536, 131072, 135168)
#: Programs (batch x heads) just past and at CUDA's 65,535 grid-dimension limit, and beyond.
GRID_PROGRAMS = (65536, 65535, 65537, 70000)

#: Corners of the input space where reported bugs live, each a narrow region that free draws
#: reach in only a few cases of a hundred: many tiny problems past the grid limit, decode past
#: 16k keys, 16-bit scores past the format's range (scaled x100/x1000 or large inputs),
#: log-sum-exps far outside float32's exp range (key-bias), q, k, v packed in one buffer, v with
#: strides unlike k's, a non-contiguous dout, and dropout. :func:`cases` with ``corner=`` draws
#: only cases inside one (everything else drawn as usual, dropout off outside its own corner,
#: which would otherwise blunt the judge); exploration gives each corner a share of its cases
#: (:func:`harness.run.explore.plan`), so a quick run of 20 cases visits every corner.
CORNERS = ("grid", "decode", "overflow", "key-bias", "packed", "v-transposed", "dout-strided",
           "dropout", "mla", "sinks", "fp8", "padding", "serving")
#: Corner -> the layout it forces.
CORNER_LAYOUTS = {"packed": "packed-qkv", "v-transposed": "v-transposed",
                  "dout-strided": "dout-strided"}
#: Issue 26's corners: a value head dim of its own (mla: DeepSeek's 192/128 first, then a
#: smaller or larger v, and v as a view of k), sinks (a learnable sink and sink tokens under a
#: window, whichever the backend claims), fp8 with soft rows at long keys (normal values, no
#: window, 1024+ keys, few queries: multi-block softmax and accumulation; an fp8 dtype or an
#: fp8 KV cache), poisoned padding (cache tails, the last page's tail, padded varlen gaps) and
#: serving shapes (varlen or kv-cache decode of many ragged sequences, about a tenth empty, or
#: chunked prefill; GQA 8 or 16 with heads per rank that do not divide 16).
PROBLEM_CORNERS = ("mla", "sinks", "fp8", "padding", "serving")
#: head_dim_v choices of the mla draws: same, DeepSeek's 192/128, a smaller v, a larger v.
MLA_KINDS = ("same", "same", "same", "same", "deepseek", "smaller", "larger")
#: Sink token counts (StreamingLLM keeps 4).
SINK_TOKENS = (0, 4, 1, 16)
#: v and dout distributions (normal most often).
TENSOR_VALUE_CHOICES = ("normal", "normal", "normal", "offset", "rows", "large")
#: Serving shapes: sequences per batch and GQA ratios (8 and 16: vLLM's ROCm paged attention
#: takes ratios up to 16), kv heads per rank (3 first: 24 and 48 query heads do not divide 16).
SERVING_BATCH = (16, 8, 24, 32)
SERVING_GROUPS = (8, 16)
SERVING_KV_HEADS = (3, 1, 2)


@dataclass(frozen=True)
class Budget:
    """The largest case a profile draws: forward FLOPs and input bytes.

    Attributes:
        max_flops: forward FLOPs (``Case.flops_fwd``).
        max_bytes: bytes of q, k, v and out (``Case.input_bytes``).
        max_seqlen: longest sequence of the ordinary shapes.
        max_decode_keys: longest key sequence of the long-key decode shape (0 = none).
        grid: whether to draw many tiny problems (batch x heads past 65,535).
    """

    max_flops: float = 2e8
    max_bytes: int = 64 << 20
    max_seqlen: int = 4096
    max_decode_keys: int = 135168
    grid: bool = True


BUDGETS = {
    # The quick budget fits an 8-query decode of 128k keys at head_dim 16 (1.4e8 FLOPs, 17 MB)
    # and 70,000 tiny problems of 2 tokens at head_dim 16 in float32 (36 MB).
    "quick": Budget(max_flops=1.5e8, max_bytes=48 << 20, max_seqlen=4096),
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
    """Scale sequence lengths down until the case fits the budget (None if it never does).
    Decode shapes (keys past 16 x the queries) lose queries first; packed-qkv halves both."""
    for _ in range(40):
        if case.flops_fwd() <= budget.max_flops and case.input_bytes() <= budget.max_bytes:
            return case
        if case.layout == "packed-qkv" and case.entry == "dense":
            if case.seqlen_q <= 1:
                return None
            n = case.seqlen_q // 2
            case = case.replace(seqlen_q=n, seqlen_k=n)
        elif case.entry != "varlen" and case.seqlen_q > 1 and 16 * case.seqlen_q < case.seqlen_k:
            case = case.replace(seqlen_q=case.seqlen_q // 2)
        elif case.entry == "varlen":
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
          backward: bool = False, corner: str | None = None) -> Case:
    """Draw a case the capabilities allow, within the budget.

    Args:
        capabilities: what the backend claims; None means everything.
        budget: cost limits (default: the quick profile's).
        backward: only cases whose backward the backend can take (no kv-cache).
        corner: draw only cases inside this one of :data:`CORNERS` (see
            :func:`corners_for`); every choice is drawn as without it, and the corner overrides
            the choices it fixes, so shrinking works as usual on the rest.
    """
    caps = capabilities or Capabilities()
    budget = budget or BUDGETS["quick"]
    nothing = undrawable(caps)
    if nothing:  # sampled_from([]) would fail inside hypothesis with no word of the cause
        raise InvalidArgument(f"no case can be drawn: {nothing}")
    feats = caps.features
    entries = [e for e in ("dense", "varlen", "kvcache") if e in caps.entries]
    if backward:
        entries = [e for e in entries if e != "kvcache"] or entries
    entry = draw(st.sampled_from(entries))
    # fp8 dtypes after the others (shrinking moves to 16-bit); forward only (issue 14): with
    # backward, only where the backend claims nothing else (its cases are then forward-only).
    fp8 = () if backward else FP8_DTYPES
    claimed = [d for d in DTYPES + fp8 if d in caps.dtypes]
    dtype = draw(st.sampled_from(claimed or [d for d in DTYPES + FP8_DTYPES
                                             if d in caps.dtypes]))
    if corner is not None:
        entry, dtype = _corner_entry_dtype(corner, entry, dtype, entries, caps)
    dims = [d for d in HEAD_DIMS if (not caps.head_dim_max or d <= caps.head_dim_max)
            and d % caps.head_dim_multiple == 0]
    head_dim = draw(st.sampled_from(dims))
    heads_kv = draw(st.integers(1, 4))
    group = draw(st.sampled_from((1, 2, 4, 3, 8))) if "gqa" in feats else 1
    batch = draw(st.integers(1, 3))

    shapes = ["pair", "square", "long-keys"]
    if budget.max_decode_keys:
        shapes.append("decode")
    if budget.grid and "dense" in entries:
        shapes.append("grid")
    shape = draw(st.sampled_from(shapes))
    if corner in ("grid", "decode"):
        shape = corner
    elif corner == "dropout" and shape in ("grid", "decode"):
        shape = "pair"
    len_q, len_k = _length(draw, budget.max_seqlen), _length(draw, budget.max_seqlen)
    few_q = draw(st.integers(1, 8))
    many_k = draw(st.integers(1024, max(1024, budget.max_seqlen)))
    decode_q = draw(st.integers(1, 16))
    decode_k = draw(st.sampled_from([n for n in DECODE_KEYS if n <= budget.max_decode_keys]
                                    or [1024]))
    programs = draw(st.sampled_from(GRID_PROGRAMS))
    grid_heads = draw(st.sampled_from((1, 8, 5)))
    grid_len = draw(st.integers(1, 2))
    if shape == "long-keys":
        seqlen_q, seqlen_k = few_q, many_k
    elif shape == "decode":
        seqlen_q, seqlen_k = decode_q, decode_k
        head_dim = min(head_dim, 32)
        heads_kv, group = 1, min(group, 2)
    elif shape == "grid":
        # Many tiny problems: batch x heads at and past 65,535 programs, one or two tokens.
        seqlen_q = seqlen_k = grid_len
        heads_kv, group = grid_heads, 1
        batch = -(-programs // grid_heads)
        head_dim = min(head_dim, 16)
        entry = "dense"
    else:
        seqlen_q, seqlen_k = len_q, (len_q if shape == "square" else len_k)
    if "seqlen_q>seqlen_k" not in feats and seqlen_q > seqlen_k:
        seqlen_q, seqlen_k = seqlen_k, seqlen_q
    if corner == "dropout":
        # Power for every sub-test of the exact dropout judge: masks distinct across batch
        # entries and across the heads of one GQA group need two of each and rows of enough
        # decided entries (tens: harness.exact.dropout.identical_masks); the keep-rate test
        # (harness.exact.dropout.keep_rate, 8 standard errors) needs thousands of entries to
        # see a drop rate off by half (at p = 0.17, 2,000 decided entries put it 10 standard
        # errors out; 512, the old minimum here, 5).
        batch, seqlen_q, seqlen_k = max(batch, 2), max(seqlen_q, 32), max(seqlen_k, 64)
        if "gqa" in feats:
            group = max(group, 2)
        else:
            heads_kv = max(heads_kv, 2)
    dims_ok = [d for d in dims if d <= head_dim] or dims
    if head_dim not in dims:
        head_dim = max(dims_ok)

    serving = _serving_draws(draw, budget)
    if corner == "serving":
        entry = "varlen" if "varlen" in entries else "kvcache"
        batch, heads_kv, group = serving["batch"], serving["heads_kv"], serving["group"]
        seqlen_q, seqlen_k = 1, serving["keys"]
    elif corner == "fp8":  # soft rows at long keys: 16 to 64 queries, 16k+ keys (the budget
        # trims the queries): many key blocks for the softmax's rescaling and the accumulator
        batch = min(batch, 2)
        seqlen_q = max(16, min(len_q, 64))
        seqlen_k = decode_k if budget.max_decode_keys else many_k
    elif corner in ("mla", "sinks", "padding") and shape not in ("grid", "decode"):
        # A corner's first (simplest) case is all the quick profile draws there: enough
        # queries and keys that a wrong scale, a sink or a read past a length shows.
        seqlen_q, seqlen_k = max(seqlen_q, 16), max(seqlen_k, 96)
    fields: dict = dict(batch=batch, heads_kv=heads_kv, heads_q=heads_kv * group,
                        head_dim=head_dim, dtype=dtype, entry=entry)
    fields.update(_feature_fields(draw, feats, fields, corner))
    fields.update(_entry_fields(draw, entry, batch, seqlen_q, seqlen_k, caps, corner))
    if corner == "serving":
        fields.update(_serving_lengths(serving, entry, caps))
    fields.update(_problem_fields(draw, feats, fields, corner, dims))
    fields.update(_value_layout_fields(draw, feats, fields, corner))
    fields.update(_fp8_fields(draw, fields, corner))
    try:
        drawn = Case(**fields)
    except InvalidCase:  # a combination of draws the case model refuses: draw again
        _assume_not(True)
        raise
    case = _fit(drawn, budget)
    _assume_not(case is None)
    case = _cache_fields(draw, case, caps)
    if shape == "grid":  # one or two tokens: most masks are vacuous; drop them, keep the shape
        case = without_vacuous(case)
    _assume_not(bool(caps.reasons(case, "backend")))  # exclusive pairs and the like: rare
    if case.values != "normal" and vacuous_features(case) \
            and not vacuous_features(case.replace(values="normal", value_scale=None)):
        # The values made the features vacuous (one-hot rows under scaled x100 inputs): keep
        # the values, which are rarer and where overflow lives, and drop the features.
        case = without_vacuous(case)
    _assume_not(bool(vacuous_features(case)))  # redraw: every enabled feature must matter
    _assume_not(corner is not None and not in_corner(case, corner))
    return case


def undrawable(capabilities: Capabilities | None) -> str:
    """Why :func:`cases` can draw nothing for these capabilities ('' when it can): no entry
    point, no dtype or no head dim of :data:`HEAD_DIMS` left (a module that narrows its
    family's claims to formats the family does not take, say ``dtypes = ["float8_e5m2"]`` for
    ``aiter@FILE``). Exploration skips such a backend with this reason."""
    caps = capabilities or Capabilities()
    out = []
    if not {"dense", "varlen", "kvcache"} & set(caps.entries):
        out.append("it claims no entry point (dense, varlen, kvcache)")
    if not [d for d in DTYPES + FP8_DTYPES if d in caps.dtypes]:
        out.append(f"it claims no dtype the harness draws (claimed: "
                   f"{', '.join(sorted(caps.dtypes)) or 'none'}; drawn: "
                   f"{', '.join(DTYPES + FP8_DTYPES)})")
    if not [d for d in HEAD_DIMS if (not caps.head_dim_max or d <= caps.head_dim_max)
            and d % max(1, caps.head_dim_multiple) == 0]:
        out.append(f"no head dim of {list(HEAD_DIMS)} is <= head_dim_max={caps.head_dim_max} "
                   f"and a multiple of {caps.head_dim_multiple}")
    return "; ".join(out)


def corners_for(capabilities: Capabilities | None, budget: Budget | None = None,
                backward: bool = True) -> list[str]:
    """The :data:`CORNERS` a backend with these capabilities can be explored in: the shapes the
    budget draws, the layouts and dropout it claims, ``dout-strided`` only when the backward is
    judged; every corner needs a 16-bit or float32 dtype (fp8 cases are plain forward calls)."""
    caps = capabilities or Capabilities()
    budget = budget or BUDGETS["quick"]
    feats = caps.features
    fp8 = any(d in caps.dtypes for d in FP8_DTYPES) or "fp8-kv" in feats
    if not any(d in caps.dtypes for d in DTYPES):
        return ["fp8"] if fp8 else []  # an fp8-only backend: its one corner
    cache = bool({"varlen", "kvcache"} & set(caps.entries))
    usable = {
        "grid": budget.grid and "dense" in caps.entries,
        "decode": bool(budget.max_decode_keys),
        "overflow": any(d in caps.dtypes for d in ("float16", "bfloat16")),
        "key-bias": True,
        "packed": "packed" in feats and bool({"dense", "varlen"} & set(caps.entries)),
        "v-transposed": "v-transposed" in feats,
        "dout-strided": backward and "dout-strided" in feats
        and bool({"dense", "varlen"} & set(caps.entries)),
        "dropout": "dropout" in feats and bool({"dense", "varlen"} & set(caps.entries)),
        "mla": "mla" in feats,
        "sinks": "sink" in feats or ("sink-tokens" in feats and "window" in feats),
        "fp8": fp8,
        "padding": "kvcache" in caps.entries or ("varlen" in caps.entries
                                                 and bool({"paged", "padded"} & feats)),
        "serving": cache and "gqa" in feats,
    }
    return [c for c in CORNERS if usable[c]]


def has_padding(case: Case) -> bool:
    """Whether the case's inputs hold padding a kernel must not read (a static rule for
    :func:`in_corner`; ``harness.exact.padding`` computes the regions themselves): a kv-cache
    sequence shorter than the cache, a page only partly used, a padded varlen layout."""
    if case.layout == "padded":
        return True
    lengths = [sk for (_, sk), _ in case.length_counts()]
    if case.entry == "kvcache":
        return any(n < case.seqlen_k for n in case.cache_lengths())
    if case.entry == "varlen" and case.paged_block_size:
        return any(n % case.paged_block_size for n in lengths) or len(lengths) > 1
    return False


def is_serving(case: Case) -> bool:
    """A serving shape: many sequences (8+) through varlen or a kv-cache, GQA 8 or 16, each
    decoding one token, or chunks of queries against longer cached prefixes."""
    if case.entry not in ("varlen", "kvcache") or case.batch < 8 \
            or case.group_size not in SERVING_GROUPS:
        return False
    pairs = [pair for pair, _ in case.length_counts()]
    return all(sq <= 1 for sq, _ in pairs) or all(sk >= sq for sq, sk in pairs)


def in_corner(case: Case, corner: str) -> bool:
    """Whether ``case`` lies inside ``corner`` (one of :data:`CORNERS`)."""
    if corner == "grid":
        return case.entry == "dense" and case.batch * case.heads_q >= min(GRID_PROGRAMS)
    if corner == "decode":
        return case.seqlen_k >= min(DECODE_KEYS) and case.seqlen_q <= 16
    if corner == "overflow":
        return case.dtype in ("float16", "bfloat16") and (
            case.values == "large" or (case.values == "scaled" and case.value_scale_used >= 100))
    if corner == "key-bias":
        return case.values == "key-bias"
    if corner == "packed":
        return case.layout in ("packed-qkv", "packed-kv")
    if corner == "dropout":
        return case.dropout_p > 0
    if corner == "mla":
        return case.dv != case.head_dim
    if corner == "sinks":
        return case.learnable_sink or case.sink_tokens > 0
    if corner == "fp8":
        return (case.fp8 and case.values == "normal" and "window" not in case.features
                and case.seqlen_k >= 1024)
    if corner == "padding":
        return has_padding(case)
    if corner == "serving":
        return is_serving(case)
    return case.layout == CORNER_LAYOUTS[corner]


def outside_corner(case: Case, corner: str) -> Case | None:
    """``case`` with what puts it in ``corner`` undone (normal values, contiguous tensors, no
    dropout), or None where the corner is the shape itself (grid, decode) or undoing it leaves
    an invalid case: whether a failure found in a corner needs the corner at all."""
    changes = {"overflow": {"values": "normal", "value_scale": None},
               "key-bias": {"values": "normal", "value_scale": None},
               "dropout": {"dropout_p": 0.0},
               "mla": {"head_dim_v": 0, "layout": "contiguous"},
               "sinks": {"learnable_sink": False, "sink_tokens": 0}}.get(corner)
    if corner == "fp8" and case.kv_dtype:  # the same case with a 16-bit cache
        changes = {"kv_dtype": "", "fp8_recipe": "per-tensor", "fp8_scales": None}
    if corner in CORNER_LAYOUTS:
        changes = {"layout": "contiguous"}
    if changes is None:
        return None
    try:
        return case.replace(**changes)
    except InvalidCase:
        return None


def _corner_entry_dtype(corner, entry, dtype, entries, caps) -> tuple[str, str]:
    """The entry and dtype a corner needs: no kv-cache for packed tensors, a strided dout or
    dropout; a 16-bit dtype (float16 first) for overflow; no fp8 in any corner."""
    if corner in ("packed", "dout-strided", "dropout") and entry == "kvcache":
        entry = next(e for e in ("dense", "varlen") if e in entries)
    if corner == "overflow":
        return entry, "float16" if "float16" in caps.dtypes else "bfloat16"
    if corner == "fp8":  # an fp8 dtype, or 16-bit queries for an fp8 KV cache
        claimed = [d for d in FP8_DTYPES if d in caps.dtypes]
        if dtype in claimed or (claimed and "fp8-kv" not in caps.features):
            return entry, dtype if dtype in claimed else claimed[0]
        return entry, next(d for d in ("bfloat16", "float16", *claimed) if d in caps.dtypes)
    if corner in ("padding", "serving") and entry == "dense":
        entry = next(e for e in ("kvcache", "varlen") if e in entries)
    if dtype in FP8_DTYPES:
        dtype = next(d for d in DTYPES if d in caps.dtypes)
    return entry, dtype


def _value_layout_fields(draw, feats, fields, corner=None) -> dict:
    """Values and layout, both drawn every time (defaults first, so shrinking reaches normal
    values and contiguous tensors); a layout the backend does not claim, or that does not
    apply to the drawn case, falls back to the nearest one that does (packed-qkv -> packed-kv
    -> contiguous). A corner fixes the values (overflow: scaled x100/x1000 or large inputs in
    float16, large in bfloat16; key-bias) or the layout (packed: q, k and v in one buffer)."""
    out: dict = {}
    sixteen = fields["dtype"] in ("float16", "bfloat16", *FP8_DTYPES)
    fp16 = fields["dtype"] == "float16"
    values = draw(st.sampled_from(VALUES_FP16 if fp16 else VALUES_16BIT if sixteen
                                  else VALUES_32BIT))
    scales = {name: draw(st.sampled_from(SCALED_FP16 if fp16 and name == "scaled" else choices))
              for name, choices in VALUE_SCALES.items()}
    layout = draw(st.sampled_from(LAYOUT_CHOICES))
    if corner == "overflow":
        # x1000 first: q . k passes 65,504 for certain, even with one key (x100 reaches it in
        # about half the rows of head_dim 64; drawn too).
        values = "scaled" if fp16 and values != "large" else "large"
        scales["scaled"] = 100.0 if scales["scaled"] == 100.0 else 1000.0
    elif corner == "key-bias":
        values = "key-bias"
    elif corner in CORNER_LAYOUTS:
        layout = CORNER_LAYOUTS[corner]
    elif corner == "fp8":  # soft rows: normal values
        values = "normal"
    elif corner == "padding" and fields["entry"] == "varlen" and "padded" in feats:
        layout = "padded"
    if values != "normal":
        chosen = scales[values]
        if chosen is not None and _value_scale_fits(values, chosen, fields["dtype"]):
            out.update(values=values, value_scale=chosen)
        elif _value_scale_fits(values, VALUE_SCALE_DEFAULTS[values], fields["dtype"]):
            out["values"] = values  # the distribution's default parameter
    entry = fields["entry"]
    if layout == "packed-qkv" and entry in LAYOUT_ENTRIES[layout] and "packed" in feats:
        # q, k and v of one buffer: the keys take the queries' lengths and heads.
        out.update(heads_q=fields["heads_kv"], seqlen_k=fields["seqlen_q"])
        if entry == "varlen":
            out["seqlens_k"] = fields["seqlens_q"]
    if layout != "contiguous":
        feature = LAYOUT_FEATURES[layout]
        if feature not in feats or (layout in LAYOUT_ENTRIES
                                    and entry not in LAYOUT_ENTRIES[layout]) \
                or (fields.get("paged_block_size")
                    and layout not in ("strided", "latent-kv", "padded")) \
                or (layout in ("packed-qkv", "packed-kv") and fields.get("head_dim_v")) \
                or (layout == "latent-kv"
                    and fields.get("head_dim_v", 0) > fields["head_dim"]) \
                or (layout == "padded" and fields.get("dropout_p")):
            layout = "contiguous"
    if layout != "contiguous":
        out["layout"] = layout
    return out


def _serving_draws(draw, budget: Budget) -> dict:
    """Every choice of a serving shape, drawn every time (the choice sequence keeps its
    shape): batch, kv heads, GQA ratio, ragged key lengths with about a tenth empty, and a
    chunk length (0 = decode)."""
    most = SERVING_BATCH[-1]
    keys = draw(st.integers(48, max(48, min(budget.max_seqlen, 1024))))
    # shortfalls from the longest, so the simplest draw is a full cache, not one key
    short = draw(st.lists(st.integers(0, keys - 1), min_size=most, max_size=most))
    return dict(batch=draw(st.sampled_from(SERVING_BATCH)),
                heads_kv=draw(st.sampled_from(SERVING_KV_HEADS)),
                group=draw(st.sampled_from(SERVING_GROUPS)), keys=keys,
                lengths=[keys - x for x in short],
                empty=draw(st.lists(st.sampled_from((False,) * 9 + (True,)), min_size=most,
                                    max_size=most)),
                chunk=draw(st.sampled_from((0, 0, 16, 7, 64))))


def _serving_lengths(serving: dict, entry: str, caps: Capabilities) -> dict:
    """The serving corner's lengths: one query per sequence (or a chunk of them against a
    longer cached prefix), ragged keys with about a tenth of the sequences empty (as
    cudnn-frontend's ragged sweeps draw them), paged where the backend claims it."""
    batch = serving["batch"]
    # about a tenth empty: where drawn, and the second of every ten sequences
    keys = [0 if empty or b % 10 == 1 else n for b, (n, empty) in
            enumerate(zip(serving["lengths"][:batch], serving["empty"][:batch], strict=True))]
    if not any(keys):
        keys[0] = serving["keys"]
    chunk = serving["chunk"]
    out: dict = {}
    if entry == "varlen":
        queries = [min(chunk, n) if chunk else 1 for n in keys]
        if chunk:  # chunked prefill: each chunk against its prefix (keys >= queries)
            keys = [max(n, q) for n, q in zip(keys, queries, strict=True)]
        if not any(queries):
            queries[0] = 1
        out.update(seqlens_q=tuple(queries), seqlens_k=tuple(keys), seqlen_q=max(queries),
                   seqlen_k=max(keys))
    else:
        out.update(seqlen_q=chunk or 1, seqlen_k=max(keys), seqlens_k=tuple(keys))
    if "paged" in caps.features:
        multiple = max(1, caps.paged_block_multiple)
        out["paged_block_size"] = 16 if multiple == 1 else multiple
    return out


def _problem_fields(draw, feats, fields, corner, dims) -> dict:
    """Issue 26's problems, each drawn every time (off first) and kept where the backend
    claims it: a value head dim of its own (DeepSeek's 192/128, a smaller or a larger v), a
    learnable sink, sink tokens beside a window, an fp8 KV cache for 16-bit queries, and the
    distributions of v and dout. A corner turns its problem on."""
    kind = draw(st.sampled_from(MLA_KINDS))
    sink = draw(st.booleans())
    tokens = draw(st.sampled_from(SINK_TOKENS))
    kv_format = draw(st.sampled_from(("",) + FP8_DTYPES))
    v_values = draw(st.sampled_from(TENSOR_VALUE_CHOICES))
    dout_values = draw(st.sampled_from(TENSOR_VALUE_CHOICES))
    out: dict = {}
    d = fields["head_dim"]
    if corner == "mla" and kind == "same":
        kind = "deepseek"
    if "mla" in feats and kind != "same":
        if kind == "deepseek" and 192 in dims:
            out.update(head_dim=192, head_dim_v=128)
        elif kind == "larger" or (kind == "deepseek" and d <= 64):
            out["head_dim_v"] = min(512, 2 * d) if d <= 64 else max(8, d // 2)
        else:
            out["head_dim_v"] = max(8, (d // 2) // 8 * 8) if d > 8 else 16
    if corner == "sinks":
        sink = sink or "sink-tokens" not in feats or not tokens
        tokens = tokens or 4
    if "sink" in feats and sink and not fields.get("dropout_p"):
        out["learnable_sink"] = True
    window = fields.get("window", (-1, -1))
    if "sink-tokens" in feats and tokens and window[0] > 0:
        out["sink_tokens"] = tokens
    sixteen = fields["dtype"] in ("float16", "bfloat16")
    if corner == "fp8":  # v with a non-zero mean: accumulation errors grow with the output
        v_values = v_values if v_values != "normal" else "offset"
        if sixteen:
            kv_format = kv_format or FP8_DTYPES[0]
    if "fp8-kv" in feats and sixteen and kv_format and not fields.get("dropout_p"):
        out["kv_dtype"] = kv_format
    if v_values != "normal":
        out["v_values"] = v_values
    if dout_values != "normal":
        out["dout_values"] = dout_values
    return out


#: fp8 fixed scales as headroom factors: the scale is ``4 / (max * headroom)``, so 4 (about the
#: largest |N(0, 1)| draw of a tensor) lands on ``max * headroom`` of the format. 1 fills the
#: range; above 1 saturates (16: every value beyond 0.25 clamps to +-max, most of the tensor);
#: below 1 leaves the top of the range unused and pushes small values into subnormals (1/64:
#: the largest draw at a 64th of the range).
FP8_HEADROOM = (1.0, 0.25, 4.0, 1.0 / 64, 16.0)
#: Largest finite value of each fp8 format (torch.finfo).
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e4m3fnuz": 240.0, "float8_e5m2": 57344.0}


def _fp8_fields(draw, fields, corner=None) -> dict:
    """fp8 scaling (issue 14), drawn every time and kept for fp8 dtypes and fp8 KV caches only:
    amax scaling per tensor first (shrinking moves there), per head, or fixed scales near the
    format's limits (saturating, filling the range, reaching subnormals), one headroom per
    tensor (k and v only for a KV cache; v shares k's under latent-kv). fp8 cases are
    forward-only attention without dropout, on contiguous, strided or latent-kv tensors, with no
    kv-cache appends. The fp8 corner scales per head unless fixed scales were drawn: one scale
    per (batch, kv head) is where a kernel can read the wrong one."""
    recipe = draw(st.sampled_from(("per-tensor", "per-head", "fixed")))
    if corner == "fp8" and recipe == "per-tensor":
        recipe = "per-head"
    headroom = [draw(st.sampled_from(FP8_HEADROOM)) for _ in "qkv"]
    fmt = fields.get("kv_dtype") or fields["dtype"]
    if fmt not in FP8_DTYPES:
        return {}
    out: dict = {"dropout_p": 0.0}
    if fields.get("layout", "contiguous") not in ("contiguous", "strided", "latent-kv"):
        out["layout"] = "contiguous"
    if recipe == "per-head":
        out["fp8_recipe"] = "per-head"
    elif recipe == "fixed":
        fmax = FP8_MAX[fmt]
        scales = [float(f"{4.0 / (fmax * h):.3g}") for h in headroom]
        if fields.get("kv_dtype"):
            scales = scales[1:]
        if out.get("layout", fields.get("layout")) == "latent-kv":
            scales[-1] = scales[-2]
        out["fp8_scales"] = tuple(scales)
    return out


#: feature -> the field values that turn it off (see :func:`without_vacuous`).
FEATURE_OFF = {"causal": {"causal": False}, "window": {"window": (-1, -1), "sink_tokens": 0},
               "sink-tokens": {"sink_tokens": 0},
               "scale": {"scale": None}, "softcap": {"softcap": 0.0},
               "alibi": {"alibi": False, "alibi_slopes": "standard"},
               "strided": {"layout": "contiguous"}, "v-transposed": {"layout": "contiguous"},
               "dout-strided": {"layout": "contiguous"}, "packed": {"layout": "contiguous"}}


def without_vacuous(case: Case) -> Case:
    """``case`` with the features :func:`vacuous_features` finds turned off (twice: turning
    causal off can leave a window that is vacuous in turn)."""
    for _ in range(2):
        changes: dict = {}
        for feature in vacuous_features(case):
            changes.update(FEATURE_OFF.get(feature, {}))
        if not changes:
            break
        if changes.get("causal") is False and case.window[1] == 0 and "window" not in changes:
            changes["window"] = (case.window[0], -1) if case.window[0] >= 0 else (-1, -1)
        case = case.replace(**changes)
    return case


def _value_scale_fits(values: str, scale: float, dtype: str) -> bool:
    return values not in ("scaled", "large") or 8 * scale <= DTYPE_MAX.get(dtype, math.inf)


# ------------------------------------------------------------------------- vacuous features


def typical_score(case: Case) -> float:
    """A static estimate of the largest |score| (after the softmax scale) of the case's values:
    about 4 standard deviations of ``scale * q . k`` for N(0, 1) q and k, moved by the values
    distribution (scaled/large multiply it by the factor squared, flat by the factor, key-bias
    and sink add their score shift)."""
    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(case.head_dim)
    base = 4.0 * scale * math.sqrt(case.head_dim)
    t = case.value_scale_used
    if case.values in ("scaled", "large"):
        return base * t * t
    if case.values == "flat":
        return base * t
    if case.values in ("key-bias", "sink"):
        return base + t
    return base


def score_spread(case: Case) -> float:
    """A static estimate of the standard deviation of one row's scores: ``scale * sqrt(d)``
    for N(0, 1) q and k, times the factor squared for scaled and large values (key-bias and
    sink shift scores more than they spread them, flat shrinks them)."""
    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(case.head_dim)
    base = scale * math.sqrt(case.head_dim)
    t = case.value_scale_used
    if case.values in ("scaled", "large"):
        return base * t * t
    if case.values == "flat":
        return base * t
    return base


def max_visible_keys(seqlen_q: int, seqlen_k: int, left: int, right: int) -> int:
    """The most keys any query row sees under the bottom-right aligned window, in O(1): the
    count is concave piecewise linear in the row, so its maximum is at an end or a corner."""
    if seqlen_q <= 0 or seqlen_k <= 0:
        return 0
    off = seqlen_k - seqlen_q
    candidates = {0, seqlen_q - 1}
    if right >= 0:
        candidates.add(seqlen_k - 1 - off - right)
    if left >= 0:
        candidates.add(left - off)
    best = 0
    for i in candidates:
        i = min(max(i, 0), seqlen_q - 1)
        hi = seqlen_k - 1 if right < 0 else min(seqlen_k - 1, i + off + right)
        lo = 0 if left < 0 else max(0, i + off - left)
        best = max(best, hi - lo + 1)
    return best


def vacuous_features(case: Case) -> list[str]:
    """The features ``case`` turns on that cannot change its output, by a cheap static rule
    each (no tensors): causal or a window that hides no key; scale or ALiBi where no row sees
    two keys (softcap too); scale where the score spread (:func:`score_spread`) exceeds 100
    (one-hot rows stay one-hot), ALiBi there when its largest bias is under a tenth of the
    spread; softcap more than 4x the largest score (``typical_score``; tanh then moves the
    scores by under 1/48 of their size, at most about 2% of a logit); ``strided``/
    ``v-transposed``/``dout-strided`` whose strides coincide with the contiguous ones (one
    sequence and one head); ``packed`` with one packed token."""
    out: list[str] = []
    lengths = [pair for pair, _ in case.length_counts()]
    left, right = case.mask_window
    feats = case.features

    def hides_keys(lo: int, hi: int, lo0: int, hi0: int) -> bool:
        return any(attended_pairs(sq, sk, lo, hi) != attended_pairs(sq, sk, lo0, hi0)
                   for sq, sk in lengths)

    if "causal" in feats and not hides_keys(left, right, left, -1):
        out.append("causal")
    if "window" in feats:
        right0 = 0 if case.causal else -1
        if not hides_keys(left, right, -1, right0):
            out.append("window")
    visible = max((max_visible_keys(sq, sk, left, right) for sq, sk in lengths), default=0)
    # Rows a score spread of over 100 makes one-hot stay one-hot under another scale, and
    # under ALiBi biases a tenth of the spread (1 bounds every slope drawn).
    spread = score_spread(case)
    distance = max(sq + sk for sq, sk in lengths) if left < 0 else left + 1
    if "scale" in feats and (visible <= 1 or spread > 100):
        out.append("scale")
    if "alibi" in feats and (visible <= 1 or (spread > 100 and distance < spread / 10)):
        out.append("alibi")
    if "softcap" in feats and (visible <= 1 or case.softcap > 4 * typical_score(case)):
        out.append("softcap")
    one_sequence = case.batch == 1 or case.entry == "varlen"
    if "strided" in feats and one_sequence and case.heads_q == 1 and case.heads_kv == 1:
        out.append("strided")
    if "v-transposed" in feats and one_sequence and case.heads_kv == 1:
        out.append("v-transposed")
    if "dout-strided" in feats and one_sequence and case.heads_q == 1:
        out.append("dout-strided")
    # One packed token: its strides and the packed gradient coincide with separate tensors.
    tokens = case.total_q if case.layout == "packed-qkv" else case.total_k
    if "packed" in feats and tokens <= 1:
        out.append("packed")
    # Sink tokens every row sees through its window anyway.
    if "sink-tokens" in feats and not any(sink_pairs(sq, sk, left, right, case.sink_tokens)
                                          for sq, sk in lengths):
        out.append("sink-tokens")
    return out


def _assume_not(condition: bool) -> None:
    assume(not condition)


def _entry_fields(draw, entry, batch, seqlen_q, seqlen_k, caps, corner=None) -> dict:
    padding = corner == "padding"
    if entry == "varlen":
        lens_q = draw(st.lists(st.integers(0, max(1, seqlen_q)), min_size=batch, max_size=batch))
        lens_k = draw(st.lists(st.integers(0, max(1, seqlen_k)), min_size=batch, max_size=batch))
        if sum(lens_q) == 0:
            lens_q[0] = max(1, seqlen_q)
        if sum(lens_k) == 0:
            lens_k[0] = max(1, seqlen_k)
        out = dict(seqlens_q=tuple(lens_q), seqlens_k=tuple(lens_k), seqlen_q=max(lens_q),
                   seqlen_k=max(lens_k))
        if padding and "padded" not in caps.features and "paged" in caps.features:
            multiple = max(1, caps.paged_block_multiple)
            out["paged_block_size"] = 16 if multiple == 1 else multiple
        return out
    out: dict = dict(seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    if entry == "kvcache":
        ragged = draw(st.booleans())
        lens = draw(st.lists(st.integers(0, seqlen_k), min_size=batch, max_size=batch))
        if padding:  # a tail past each length: the first sequence's ends mid-page
            lens[0] = max(1, seqlen_k - 1 - seqlen_k // 3 - lens[0] % 16)
        if ragged or padding:
            out["seqlens_k"] = tuple(lens)
        if "paged" in caps.features and (draw(st.booleans()) or padding):
            multiple = max(1, caps.paged_block_multiple)
            out["paged_block_size"] = multiple * draw(st.sampled_from((1, 2)))
            if multiple == 1:
                out["paged_block_size"] = draw(st.sampled_from((16, 64, 256)))
    return out


#: Split counts drawn for ``num_splits`` (0 = the kernel's heuristic first, so shrinking
#: reaches it; 1 forces the non-split path, the others split the keys).
SPLITS = (0, 1, 3, 8)


def _cache_fields(draw, case: Case, caps: Capabilities) -> Case:
    """The kv-cache call's extras (issue 13), drawn every time after the case is fitted, each
    kept only when the backend claims its feature and it applies: appends (1-16 new tokens),
    rotary (half or all of head_dim, multiples of 16 as flash-attn's test draws them, both
    styles), leftpad, batch-idx, forced splits, random or per-batch ALiBi slopes, and paged
    KV through the varlen entry point; half the appends are a decode step (one query, one new
    token; with GQA the decode the issue names). Off is drawn first, so shrinking turns each
    off."""
    feats = caps.features
    if case.fp8 or case.layout == "latent-kv":  # appended keys are not quantised or shared
        feats = feats - {"append", "rotary", "leftpad", "batch-idx"}
    append, new = draw(st.booleans()), draw(st.integers(1, 16))
    decode_step = draw(st.booleans())  # one query appending one token: the serving decode step
    rotary = draw(st.booleans())
    rotary_fraction = draw(st.sampled_from((1.0, 0.5)))
    interleaved = draw(st.booleans())
    leftpad = draw(st.booleans())
    pads = draw(st.lists(st.integers(0, 1 << 16), min_size=3, max_size=3))  # kvcache batch <= 3
    batch_idx = draw(st.booleans())
    splits = draw(st.sampled_from(SPLITS))
    slopes = draw(st.sampled_from(("standard", "random", "random-per-batch")))
    varlen_paged = draw(st.booleans())
    block = draw(st.sampled_from((16, 64, 256)))
    changes: dict = {}
    if case.alibi and slopes != "standard":
        per_batch = slopes == "random-per-batch" and "alibi-per-batch" in feats
        changes["alibi_slopes"] = "random-per-batch" if per_batch else "random"
    if case.entry == "varlen" and varlen_paged and "paged" in feats:
        multiple = max(1, caps.paged_block_multiple)
        changes["paged_block_size"] = block if multiple == 1 else multiple
    if case.entry == "kvcache":
        if append and decode_step and "append" in feats:
            case, new = case.replace(seqlen_q=1), 1
        changes.update(_kvcache_changes(case, feats, append and min(new, case.seqlen_k),
                                        rotary, rotary_fraction, interleaved,
                                        pads if leftpad else None, batch_idx))
        if splits and "splits" in feats:
            changes["num_splits"] = splits
    if not changes:
        return case
    try:
        return case.replace(**changes)
    except InvalidCase:  # pragma: no cover - the rules above keep every change valid
        return case


def _kvcache_changes(case: Case, feats, new: int, rotary: bool, fraction: float,
                     interleaved: bool, pads, batch_idx: bool) -> dict:
    out: dict = {}
    cap = case.seqlen_k
    lengths = list(case.seqlens_k) if case.seqlens_k is not None else None
    if new and "append" in feats:
        out["seqlen_new"] = new
        rotary_dim = int(fraction * case.head_dim) // 16 * 16
        use_rotary = rotary and "rotary" in feats and rotary_dim > 0
        # Causal/local rotary reads cos/sin rows up to cache_seqlens + seqlen_q - 1.
        masked = case.has_mask and use_rotary
        room = cap - (max(new, case.seqlen_q) if masked else new)
        if room < 0:
            use_rotary, room = False, cap - new
        if lengths is not None:
            lengths = [min(n, room) for n in lengths]
        elif room < cap - new:
            lengths = [room] * case.batch
        if use_rotary:
            out.update(rotary_dim=rotary_dim, rotary_interleaved=interleaved)
    if lengths is not None:
        out["seqlens_k"] = tuple(lengths)
    if pads is not None and "leftpad" in feats:
        current = case.replace(**out).cache_lengths() if out else case.cache_lengths()
        out["cache_leftpad"] = tuple(pads[b % len(pads)] % (n + 1)
                                     for b, n in enumerate(current))
    if batch_idx and "batch-idx" in feats:
        out["cache_batch_idx"] = True
    return out


def _feature_fields(draw, feats, fields, corner=None) -> dict:
    """Features, each drawn every time (off first, so shrinking turns them off) and kept only
    when the backend claims it; dropout always on in its corner and off in the others."""
    out: dict = {}
    causal = draw(st.booleans())
    left = draw(st.sampled_from((-1, 0, 1, 3, 16, 64)))
    right = draw(st.sampled_from((-1, 0, 1, 7, 32)))
    softcap = draw(st.sampled_from((0.0, 0.5, 1.0, 2.5, 5.0)))
    alibi = draw(st.booleans())
    scale = draw(st.sampled_from((None, 0.05, 0.3, 1.0)))
    dropout_p = draw(st.sampled_from((0.0,) * 8 + (0.17, 0.3)))
    if corner is not None:
        dropout_p = (dropout_p or 0.17) if corner == "dropout" else 0.0
    if corner == "sinks" and "sink-tokens" in feats and "window" in feats:
        left = left if left > 0 else 16  # sink tokens live beside a sliding window
    if corner == "fp8":  # soft rows: no narrow window
        left = right = -1
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
    if "dropout" in feats and dropout_p and fields["entry"] != "kvcache":
        out["dropout_p"] = dropout_p
    return out
