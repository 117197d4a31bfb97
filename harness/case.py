"""One attention problem: the frozen, hashable :class:`Case` and its stable ``case_id``.

A case is pure data. It never imports torch, so case files can be validated, hashed and counted
on any machine. The semantics follow flash-attn 2.x (see ``docs``/the design):

* layout ``(batch, seqlen, heads, head_dim)``; ``varlen`` packs sequences of the given lengths,
  ``kvcache`` attends a query block to a (possibly paged) cache of per-sequence lengths;
* causal and local masks are aligned to the bottom-right corner: query ``i`` sees key ``j`` when
  ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right`` (``-1`` = unbounded,
  causal fixes ``right = 0``);
* scale ``1/sqrt(head_dim)`` unless given; softcap ``s = softcap * tanh(s / softcap)`` after
  scaling; ALiBi adds ``-slope * |i + seqlen_k - seqlen_q - j|`` after softcap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.errors import InvalidCase

DTYPES = ("float16", "bfloat16", "float32")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
ENTRIES = ("dense", "varlen", "kvcache")
LAYOUTS = ("contiguous", "strided")
CHECKS = ("fwd", "bwd", "determinism", "throughput")

#: Fields that carry meaning for people but do not change the problem (not part of case_id).
METADATA_FIELDS = ("name", "source", "checks")


@dataclass(frozen=True)
class Case:
    """One attention problem. Construct with keywords; validation runs in ``__post_init__``.

    Attributes:
        batch: number of sequences.
        seqlen_q: query tokens per sequence (the maximum for ``varlen``).
        seqlen_k: key tokens per sequence (the maximum for ``varlen``; the cache capacity for
            ``kvcache``). Defaults to ``seqlen_q`` or ``max(seqlens_k)``.
        heads_q: query heads.
        heads_kv: key/value heads; query head ``h`` reads kv head ``h // (heads_q // heads_kv)``.
            Defaults to ``heads_q``.
        head_dim: per-head dimension of q, k and v.
        dtype: element type of q, k, v and the output: float16, bfloat16 or float32.
        causal: bottom-right causal mask (``window[1]`` is then 0).
        window: ``(left, right)`` local window, ``-1`` for unbounded.
        softcap: tanh soft-capping of scaled scores; 0 disables it.
        alibi: add ALiBi biases with the standard geometric slopes of ``heads_q`` heads.
        dropout_p: attention dropout probability (judged statistically; see ``judge``).
        scale: softmax scale; ``None`` means ``1/sqrt(head_dim)``.
        entry: API entry point: dense, varlen or kvcache.
        seqlens_q: per-sequence query lengths (``varlen`` only; zeros allowed).
        seqlens_k: per-sequence key lengths (``varlen``) or cache lengths (``kvcache``).
        paged_block_size: tokens per page of a paged kv-cache; 0 for a contiguous cache.
        layout: ``contiguous`` tensors, or ``strided`` views into larger buffers (non-standard
            batch, sequence and head strides; the last dimension stays contiguous).
        name: a human label (metadata).
        source: where the shape comes from, e.g. a model card (metadata).
        checks: the checks this case wants (metadata); ``None`` means whatever the run asks for.
    """

    batch: int = 1
    seqlen_q: int = 0
    seqlen_k: int = 0
    heads_q: int = 1
    heads_kv: int = 0
    head_dim: int = 64
    dtype: str = "float16"
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    dropout_p: float = 0.0
    scale: float | None = None
    entry: str = "dense"
    seqlens_q: tuple[int, ...] | None = None
    seqlens_k: tuple[int, ...] | None = None
    paged_block_size: int = 0
    layout: str = "contiguous"
    name: str = field(default="", compare=False)
    source: str = field(default="", compare=False)
    checks: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _normalize(self)
        problems = _problems(self)
        if problems:
            raise InvalidCase("; ".join(problems))

    # ----------------------------------------------------------------------------- identity

    def identity(self) -> dict[str, Any]:
        """The canonical form: every problem-defining field, normalised, JSON-ready."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in METADATA_FIELDS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @property
    def case_id(self) -> str:
        """12 hex digits of SHA-256 over the canonical JSON; identical on every machine."""
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        """All fields, metadata included, as JSON/TOML-ready values."""
        out = self.identity()
        if self.name:
            out["name"] = self.name
        if self.source:
            out["source"] = self.source
        if self.checks is not None:
            out["checks"] = list(self.checks)
        return out

    def replace(self, **changes: Any) -> Case:
        """A copy with fields changed (and validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------ derived

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 = MHA, heads_q = MQA)."""
        return self.heads_q // self.heads_kv

    @property
    def mask_window(self) -> tuple[int, int]:
        """The effective ``(left, right)`` window, with causal folded in (right = 0)."""
        left, right = self.window
        return (left, 0) if self.causal else (left, right)

    @property
    def has_mask(self) -> bool:
        return self.mask_window != (-1, -1)

    def sequence_lengths(self) -> list[tuple[int, int]]:
        """``(seqlen_q, seqlen_k)`` of every sequence in the batch."""
        if self.entry == "varlen":
            assert self.seqlens_q is not None and self.seqlens_k is not None
            return list(zip(self.seqlens_q, self.seqlens_k, strict=True))
        if self.seqlens_k is not None:
            return [(self.seqlen_q, sk) for sk in self.seqlens_k]
        return [(self.seqlen_q, self.seqlen_k)] * self.batch

    @property
    def rows_without_keys(self) -> bool:
        """Whether some query row sees no key (its output is zero by flash-attn's semantics):
        under a bottom-right right bound when ``seqlen_k - seqlen_q + right < 0`` (the leading
        rows), or in a sequence with no keys at all."""
        _, right = self.mask_window
        return any(sq > 0 and (sk == 0 or (right >= 0 and sk - sq + right < 0))
                   for sq, sk in self.sequence_lengths())

    @property
    def total_q(self) -> int:
        return sum(sq for sq, _ in self.sequence_lengths())

    @property
    def total_k(self) -> int:
        return sum(sk for _, sk in self.sequence_lengths())

    def attended_pairs(self) -> int:
        """Query-key pairs the mask leaves visible, summed over the batch (per head)."""
        left, right = self.mask_window
        return sum(attended_pairs(sq, sk, left, right) for sq, sk in self.sequence_lengths())

    def flops_fwd(self) -> int:
        """Forward FLOPs as flash-attn's benchmark counts them: 4 * heads * d * visible pairs."""
        return 4 * self.heads_q * self.head_dim * self.attended_pairs()

    def input_bytes(self) -> int:
        """Bytes of q, k, v and the output at the case's dtype (kv-cache at its capacity)."""
        es = DTYPE_BYTES[self.dtype]
        tokens_k = self.batch * self.seqlen_k if self.entry == "kvcache" else self.total_k
        q_bytes = self.total_q * self.heads_q * self.head_dim * es
        return 2 * q_bytes + 2 * tokens_k * self.heads_kv * self.head_dim * es

    @property
    def features(self) -> frozenset[str]:
        """Named features this case turns on; backends declare the ones they support."""
        on = set()
        if self.causal:
            on.add("causal")
        if self.mask_window != (-1, -1) and not (self.causal and self.window[0] == -1):
            on.add("window")
        if self.softcap > 0:
            on.add("softcap")
        if self.alibi:
            on.add("alibi")
        if self.dropout_p > 0:
            on.add("dropout")
        if self.heads_kv < self.heads_q:
            on.add("gqa")
        if self.scale is not None:
            on.add("scale")
        if self.layout == "strided":
            on.add("strided")
        if self.paged_block_size:
            on.add("paged")
        if any(sq > sk for sq, sk in self.sequence_lengths()):
            on.add("seqlen_q>seqlen_k")
        return frozenset(on)

    @property
    def label(self) -> str:
        """A short human description, e.g. ``b2 q113 k203 h8/2 d64 f16 causal``."""
        dt = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}[self.dtype]
        heads = f"h{self.heads_q}"
        if self.heads_kv != self.heads_q:
            heads += f"/{self.heads_kv}"
        parts = [f"b{self.batch}", f"q{self.seqlen_q}", f"k{self.seqlen_k}", heads,
                 f"d{self.head_dim}", dt]
        if self.entry != "dense":
            page = f"/page{self.paged_block_size}" if self.paged_block_size else ""
            parts.append(self.entry + page)
        if self.causal:
            parts.append("causal")
        if self.window != (-1, -1):
            parts.append(f"win{self.window[0]},{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.alibi:
            parts.append("alibi")
        if self.dropout_p:
            parts.append(f"drop{self.dropout_p:g}")
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        if self.layout != "contiguous":
            parts.append(self.layout)
        return " ".join(parts)

    def to_toml(self) -> str:
        """The case as one ``[[case]]`` table, with the non-default fields only."""
        default = _defaults()
        lines = ["[[case]]"]
        for key, value in self.to_dict().items():
            if key in ("seqlen_q", "seqlen_k", "heads_q", "heads_kv", "batch", "head_dim", "dtype"):
                pass  # always written: the shape is what a reader looks for first
            elif default.get(key, _MISSING) == value:
                continue
            lines.append(f"{key} = {toml_value(value)}")
        return "\n".join(lines) + "\n"

    def to_inline_toml(self) -> str:
        """The case as a TOML inline table, for ``attn-harness run --case '{...}'``."""
        body = self.to_toml().splitlines()[1:]
        return "{" + ", ".join(body) + "}"


_MISSING = object()


def _defaults() -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(Case):
        if f.default is not dataclasses.MISSING:
            value = f.default
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def toml_value(value: Any) -> str:
    """Render a scalar or list as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Case))


def case_from_dict(data: Mapping[str, Any]) -> Case:
    """Build a case from TOML/JSON values, rejecting unknown fields with a suggestion."""
    unknown = [key for key in data if key not in FIELD_NAMES]
    if unknown:
        raise InvalidCase(unknown_field_message(unknown[0]))
    try:
        return Case(**data)
    except TypeError as exc:  # pragma: no cover - guarded by the unknown-field check
        raise InvalidCase(str(exc)) from None


def unknown_field_message(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field {key!r} ({hint}fields are {', '.join(FIELD_NAMES)})"


# ------------------------------------------------------------------------------ validation


def _set(case: Case, name: str, value: Any) -> None:
    object.__setattr__(case, name, value)


def _normalize(case: Case) -> None:
    """Coerce TOML values to canonical types and fill the defaults that depend on other fields."""
    for name in ("window", "seqlens_q", "seqlens_k", "checks"):
        value = getattr(case, name)
        if isinstance(value, list):
            _set(case, name, tuple(value))
    for name in ("softcap", "dropout_p", "scale"):
        value = getattr(case, name)
        if isinstance(value, int) and not isinstance(value, bool):
            _set(case, name, float(value))
    if _is_int(case.heads_q) and case.heads_kv == 0:
        _set(case, "heads_kv", case.heads_q)
    if case.entry == "varlen":
        if case.seqlen_q == 0 and _int_tuple(case.seqlens_q):
            _set(case, "seqlen_q", max(case.seqlens_q, default=0))
        if case.seqlen_k == 0 and _int_tuple(case.seqlens_k):
            _set(case, "seqlen_k", max(case.seqlens_k, default=0))
    if case.seqlen_k == 0 and case.entry == "kvcache" and _int_tuple(case.seqlens_k):
        _set(case, "seqlen_k", max(case.seqlens_k, default=0))
    if case.seqlen_k == 0 and _is_int(case.seqlen_q):
        _set(case, "seqlen_k", case.seqlen_q)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(_is_int(v) for v in value)


def _problems(case: Case) -> list[str]:  # noqa: C901 - one flat list of rules reads best
    p: list[str] = []
    for name in ("batch", "heads_q", "heads_kv", "head_dim"):
        value = getattr(case, name)
        if not _is_int(value) or value < 1:
            p.append(f"{name}={value!r} must be an integer >= 1")
    for name in ("seqlen_q", "seqlen_k", "paged_block_size"):
        value = getattr(case, name)
        if not _is_int(value) or value < 0:
            p.append(f"{name}={value!r} must be an integer >= 0")
    if p:
        return p
    if case.heads_q % case.heads_kv:
        p.append(f"heads_q={case.heads_q} is not a multiple of heads_kv={case.heads_kv}")
    if case.dtype not in DTYPES:
        p.append(f"dtype={case.dtype!r} must be one of {', '.join(DTYPES)}")
    if case.entry not in ENTRIES:
        p.append(f"entry={case.entry!r} must be one of {', '.join(ENTRIES)}")
        return p
    if case.layout not in LAYOUTS:
        p.append(f"layout={case.layout!r} must be one of {', '.join(LAYOUTS)}")
    for name in ("causal", "alibi"):
        if not isinstance(getattr(case, name), bool):
            p.append(f"{name}={getattr(case, name)!r} must be true or false")
    w = case.window
    if not (isinstance(w, tuple) and len(w) == 2 and all(_is_int(x) and x >= -1 for x in w)):
        p.append(f"window={list(w) if isinstance(w, tuple) else w!r} must be [left, right], "
                 "integers >= -1 (-1 = unbounded)")
    elif case.causal and w[1] not in (-1, 0):
        p.append(f"causal=true fixes the right window edge to 0 but window={list(w)}: "
                 f"write window = [{w[0]}, 0] or causal = false")
    for name in ("softcap", "dropout_p"):
        value = getattr(case, name)
        if not isinstance(value, float) or not math.isfinite(value) or value < 0:
            p.append(f"{name}={value!r} must be a finite number >= 0")
    if isinstance(case.dropout_p, float) and case.dropout_p >= 1:
        p.append(f"dropout_p={case.dropout_p!r} must be < 1")
    if case.scale is not None and (
        not isinstance(case.scale, float) or not math.isfinite(case.scale) or case.scale <= 0
    ):
        p.append(f"scale={case.scale!r} must be a finite number > 0 "
                 "(or omitted for 1/sqrt(head_dim))")
    p.extend(_entry_problems(case))
    if case.checks is not None and (
            not isinstance(case.checks, tuple) or not all(c in CHECKS for c in case.checks)):
        p.append(f"checks={case.checks!r} must be a list drawn from {', '.join(CHECKS)}")
    for name in ("name", "source"):
        if not isinstance(getattr(case, name), str):
            p.append(f"{name}={getattr(case, name)!r} must be a string")
    return p


def _entry_problems(case: Case) -> list[str]:
    p: list[str] = []
    if case.entry == "varlen":
        for name in ("seqlens_q", "seqlens_k"):
            lens = getattr(case, name)
            if lens is None:
                p.append(f"entry='varlen' needs {name} (one length per sequence)")
            elif not _int_tuple(lens) or any(x < 0 for x in lens):
                p.append(f"{name}={list(lens)!r} must be a list of integers >= 0")
            elif len(lens) != case.batch:
                p.append(f"{name} has {len(lens)} lengths but batch={case.batch}")
        if p:
            return p
        if case.seqlen_q != max(case.seqlens_q) or case.seqlen_k != max(case.seqlens_k):
            p.append(f"for varlen, seqlen_q and seqlen_k are the maxima of seqlens_q and seqlens_k "
                     f"({max(case.seqlens_q)}, {max(case.seqlens_k)}): omit them or make them "
                     "equal")
        if sum(case.seqlens_q) == 0 or sum(case.seqlens_k) == 0:
            p.append("varlen needs at least one query and one key token in the batch")
    else:
        if case.seqlen_q < 1 or (case.seqlen_k < 1):
            p.append(f"seqlen_q={case.seqlen_q} and seqlen_k={case.seqlen_k} must both be >= 1")
        if case.seqlens_q is not None:
            p.append(f"seqlens_q is for entry='varlen' only (entry={case.entry!r})")
    if case.entry == "dense" and case.seqlens_k is not None:
        p.append("seqlens_k is for entry='varlen' or 'kvcache' only (entry='dense')")
    if case.entry == "kvcache":
        lens = case.seqlens_k
        if lens is not None:
            if not _int_tuple(lens) or any(x < 0 or x > case.seqlen_k for x in lens):
                p.append(f"seqlens_k={list(lens)!r} (cache lengths) must be integers in "
                         f"[0, seqlen_k={case.seqlen_k}]")
            elif len(lens) != case.batch:
                p.append(f"seqlens_k has {len(lens)} cache lengths but batch={case.batch}")
        if case.dropout_p:
            p.append("the kvcache entry point has no dropout: set dropout_p = 0")
    elif case.paged_block_size:
        p.append(f"paged_block_size={case.paged_block_size} needs entry='kvcache' "
                 f"(entry={case.entry!r})")
    return p


# --------------------------------------------------------------------------- mask counting


def attended_pairs(seqlen_q: int, seqlen_k: int, left: int, right: int) -> int:
    """Number of (i, j) pairs visible under the bottom-right aligned window, in O(1).

    Query ``i`` sees keys ``max(0, i + off - left) .. min(seqlen_k - 1, i + off + right)`` with
    ``off = seqlen_k - seqlen_q``; ``-1`` means unbounded on that side.
    """
    if seqlen_q <= 0 or seqlen_k <= 0:
        return 0
    off = seqlen_k - seqlen_q
    inf = 1 << 62
    hi_off = off + right if right >= 0 else inf  # hi(i) = min(sk - 1, i + hi_off)
    lo_off = off - left if left >= 0 else -inf  # lo(i) = max(0, i + lo_off)
    # Breakpoints where the min/max switch branch; between them the count is linear in i.
    switches = (seqlen_k - 1 - hi_off, 1 - lo_off)
    cuts = sorted({0, seqlen_q, *(x for x in switches if 0 < x < seqlen_q)})
    total = 0
    for a, b in zip(cuts, cuts[1:], strict=False):
        # In [a, b) each branch is fixed; evaluate its form at a representative point.
        hi_is_cap = a + hi_off >= seqlen_k - 1
        lo_is_zero = a + lo_off <= 0
        slope = (0 if hi_is_cap else 1) - (0 if lo_is_zero else 1)
        hi_const = seqlen_k - 1 if hi_is_cap else hi_off
        lo_const = 0 if lo_is_zero else lo_off
        # count(i) = max(0, slope * i + c) with c = hi_const - lo_const + 1
        total += _sum_positive_linear(slope, hi_const - lo_const + 1, a, b)
    return total


def _sum_positive_linear(slope: int, c: int, a: int, b: int) -> int:
    """Sum of max(0, slope * i + c) for integer i in [a, b); slope in {-1, 0, 1}."""
    if a >= b:
        return 0
    if slope == 0:
        return max(0, c) * (b - a)
    if slope == 1:  # positive for i > -c
        a = max(a, -c + 1)
    else:  # positive for i < c
        b = min(b, c)
    if a >= b:
        return 0
    n = b - a
    first = slope * a + c
    last = slope * (b - 1) + c
    return (first + last) * n // 2


def grid(**axes: Iterable[Any]) -> list[Case]:
    """Cartesian product of keyword axes as cases (a convenience for tests and notebooks)."""
    import itertools

    names = list(axes)
    combos = itertools.product(*axes.values())
    return [Case(**dict(zip(names, combo, strict=True))) for combo in combos]
