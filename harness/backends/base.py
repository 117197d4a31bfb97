"""What every backend is: a name, an availability, declared capabilities and a forward call.

Capabilities are data. :meth:`Capabilities.reasons` turns a case into the human-readable list of
reasons a backend does not support it (``head_dim=320 > 256``, ``softcap is ignored by
rocm-ck``); an empty list means supported. A backend may *claim* less than it accepts, which is
what ``--audit`` probes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from harness.case import DTYPES, ENTRIES, FP8_DTYPES, Case
from harness.errors import UsageError
from harness.vocab import CHECKS, FEATURES, OPT_IN_FEATURES, PADDING_REGIONS

if TYPE_CHECKING:
    from harness.exact.inputs import Inputs
    from harness.exact.outputs import Outputs
    from harness.target import Target

#: What a backend claims unless it says otherwise: everything but a last dimension with stride
#: != 1, which flash-attn's kernels cannot read (its Python API copies such tensors, see
#: ``maybe_contiguous`` in flash_attn/flash_attn_interface.py); SDPA takes it. The problems of
#: issue 26 (:data:`harness.vocab.OPT_IN_FEATURES`) are claimed only where a family poses them.
DEFAULT_FEATURES = frozenset(FEATURES) - {"lastdim-strided"} - frozenset(OPT_IN_FEATURES)


@dataclass(frozen=True)
class Capabilities:
    """What a backend claims to support.

    Attributes:
        dtypes: element types.
        head_dim_max: largest head_dim (0 = no limit).
        head_dim_multiple: head_dim must be a multiple of this.
        features: supported features from :data:`FEATURES`.
        entries: entry points it can be called through (dense, varlen, kvcache).
        backward: whether gradients can be taken.
        paged_block_multiple: paged kv-cache block sizes must be multiples of this.
        exclusive: pairs of features that cannot be combined.
        returns_lse: whether the forward returns the log-sum-exp.
        deterministic_backward: whether backward promises bitwise repeatability (when not, the
            determinism check still measures dq/dk/dv but requires only the forward to repeat;
            ``notes["deterministic_backward"]`` says why).
        notes: per feature, why it is unsupported (replaces the generic reason); ``dtype:X``
            says why dtype X is not taken (appended to the generic reason), ``A+B`` why the
            exclusive pair ``(A, B)`` is refused (the original's own words, replacing the
            generic reason).
        head_dims_v: with ``mla`` claimed, the ``(head_dim, head_dim_v)`` pairs taken when they
            differ, as inclusive ranges ``((qk_lo, qk_hi), (v_lo, v_hi))`` (FA3: q/k in (128,
            192] with v in (96, 128], or q/k <= 64 with v <= 512); empty = any pair within
            ``head_dim_max``. ``notes["head_dims_v"]`` cites the source.
        finite_padding: padding regions (:data:`harness.vocab.PADDING_REGIONS`) the family's
            contract wants finite (FA4's varlen loads whole 128-key tiles: rows past
            ``seqused_k`` in the last one must be finite): there the inputs hold large finite
            junk instead of NaN, which a kernel keeping its contract never lets into the result.
    """

    dtypes: frozenset[str] = frozenset(DTYPES)
    head_dim_max: int = 0
    head_dim_multiple: int = 1
    features: frozenset[str] = DEFAULT_FEATURES
    entries: frozenset[str] = frozenset({"dense"})
    backward: bool = True
    paged_block_multiple: int = 1
    exclusive: tuple[tuple[str, str], ...] = ()
    returns_lse: bool = False
    deterministic_backward: bool = True
    notes: Mapping[str, str] = field(default_factory=dict)
    head_dims_v: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = ()
    finite_padding: frozenset[str] = frozenset()

    def reasons(self, case: Case, who: str) -> list[str]:
        """Why ``who`` does not support ``case``; empty when supported."""
        out = []
        if case.entry not in self.entries:
            out.append(f"{who} has no {case.entry} entry point")
        if case.dtype not in self.dtypes:
            supported = ", ".join(sorted(self.dtypes))
            why = self.notes.get(f"dtype:{case.dtype}")
            out.append(f"dtype={case.dtype} is not supported by {who} ({supported})"
                       + (f": {why}" if why else ""))
        if self.head_dim_max and case.head_dim > self.head_dim_max:
            out.append(f"head_dim={case.head_dim} > {self.head_dim_max}")
        if case.head_dim % self.head_dim_multiple:
            out.append(f"head_dim={case.head_dim} is not a multiple of {self.head_dim_multiple}")
        for feature in sorted(case.features - self.features):
            out.append(self.notes.get(feature, f"{feature} is not supported by {who}"))
        out.extend(self._head_dim_v_reasons(case, who))
        if case.paged_block_size and case.paged_block_size % self.paged_block_multiple:
            out.append(f"paged_block_size={case.paged_block_size} is not a multiple of "
                       f"{self.paged_block_multiple} ({who})")
        for a, b in self.exclusive:
            if a in case.features and b in case.features:
                out.append(self.notes.get(f"{a}+{b}", f"{a} cannot be combined with {b} in {who}"))
        return out

    def _head_dim_v_reasons(self, case: Case, who: str) -> list[str]:
        """Why the ``(head_dim, head_dim_v)`` pair of an ``mla`` case is not taken."""
        d, dv = case.head_dim, getattr(case, "dv", case.head_dim)
        if dv == d or "mla" not in self.features:
            return []
        if self.head_dims_v:
            if any(lo <= d <= hi and vlo <= dv <= vhi
                   for (lo, hi), (vlo, vhi) in self.head_dims_v):
                return []
            ranges = ", ".join(f"q/k {lo}-{hi} with v {vlo}-{vhi}"
                               for (lo, hi), (vlo, vhi) in self.head_dims_v)
            source = self.notes.get("head_dims_v", "")
            return [f"(head_dim, head_dim_v)=({d}, {dv}) is not a pair {who} takes ({ranges})"
                    + (f": {source}" if source else "")]
        if self.head_dim_max and dv > self.head_dim_max:
            return [f"head_dim_v={dv} > {self.head_dim_max}"]
        return []

    def check_reasons(self, check: str, case: Case, who: str) -> list[str]:
        """Why a particular check cannot run for this case (beyond the case being unsupported):
        a check that takes gradients (``CheckSpec.gradients``) needs a backward."""
        spec = CHECKS.get(check)
        return self.backward_reasons(case, who) if spec is not None and spec.gradients else []

    def backward_reasons(self, case: Case, who: str) -> list[str]:
        """Why the case's backward cannot be taken on ``who``; empty when it can."""
        if case.dtype.startswith("float8"):
            return ["fp8 attention is forward only (no family claims an fp8 backward)"]
        if getattr(case, "kv_dtype", ""):
            return ["an fp8 KV cache is inference: forward only"]
        if case.entry == "kvcache":
            return ["the kvcache entry point is forward-only"]
        if case.layout in ("latent-kv", "padded"):
            return [f"layout={case.layout!r} is posed forward only (the shared latent of "
                    "absorbed MLA decode and padded varlen serve inference)"]
        if case.entry == "varlen" and case.paged_block_size:
            return ["a paged KV cache is forward-only (flash-attn's varlen backward takes no "
                    "block_table: csrc/flash_attn/flash_api.cpp, mha_varlen_bwd)"]
        if not self.backward:
            return [self.notes.get("backward", f"{who} has no backward")]
        return []

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> Capabilities:
        """Build from a user's ``capabilities`` dict, validating every key and value: a value
        of the wrong type is one UsageError naming the field and the type it takes."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise UsageError(f"{where}: unknown capability {key!r} "
                                 f"(known: {', '.join(sorted(known))})")
            if key in ("dtypes", "features", "entries"):
                allowed = {"dtypes": DTYPES + FP8_DTYPES, "features": FEATURES,
                           "entries": ENTRIES}[key]
                values = frozenset(_names(value, key, where))
                bad = sorted(values - set(allowed))
                if bad:
                    raise UsageError(f"{where}: capabilities[{key!r}] has unknown values {bad} "
                                     f"(allowed: {', '.join(allowed)})")
                kwargs[key] = values
            elif key == "exclusive":
                pairs = value if _is_list(value) else None
                if pairs is None or not all(_is_list(p) and len(p) == 2
                                            and all(isinstance(x, str) for x in p)
                                            for p in pairs):
                    raise _wrong_type(where, key, "a list of [feature, feature] pairs", value)
                kwargs[key] = tuple(tuple(pair) for pair in pairs)
            elif key == "finite_padding":
                values = frozenset(_names(value, key, where))
                bad = sorted(values - set(PADDING_REGIONS))
                if bad:
                    raise UsageError(f"{where}: capabilities['finite_padding'] has unknown "
                                     f"regions {bad} (allowed: {', '.join(PADDING_REGIONS)})")
                kwargs[key] = values
            elif key == "head_dims_v":
                try:
                    kwargs[key] = tuple((tuple(map(int, qk)), tuple(map(int, v)))
                                        for qk, v in value)
                except (TypeError, ValueError):
                    raise UsageError(f"{where}: capabilities['head_dims_v'] must be a list of "
                                     "[[qk_lo, qk_hi], [v_lo, v_hi]] ranges") from None
            elif key == "notes":
                if not isinstance(value, Mapping) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                    raise _wrong_type(where, key, "a table of feature = reason strings", value)
                kwargs[key] = dict(value)
            elif key in _FLAGS:
                if not isinstance(value, bool):
                    raise _wrong_type(where, key, "true or false", value)
                kwargs[key] = value
            else:  # the integer limits
                least = _LIMITS[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise _wrong_type(where, key, f"an integer >= {least}", value)
                kwargs[key] = value
        return replace(cls(), **kwargs)


#: Capability fields that are flags, and the integer limits with their least value.
_FLAGS = ("backward", "returns_lse", "deterministic_backward")
_LIMITS = {"head_dim_max": 0, "head_dim_multiple": 1, "paged_block_multiple": 1}


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, set, frozenset))


def _names(value: Any, key: str, where: str) -> list[str]:
    """A list of names (a lone string is not one: it would read as its letters)."""
    if not _is_list(value) or not all(isinstance(x, str) for x in value):
        raise _wrong_type(where, key, "a list of names", value)
    return list(value)


def _wrong_type(where: str, key: str, expected: str, value: Any) -> UsageError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return UsageError(f"{where}: capabilities[{key!r}] must be {expected}, got "
                      f"{type(value).__name__} {shown}")


class Backend:
    """A kernel under test.

    Subclasses set the class attributes and implement :meth:`forward`; they may refine
    :meth:`availability`, :meth:`unsupported_reasons` and :meth:`call_reasons`.
    """

    name: str = ""
    family: str = ""
    flavor: str = ""
    version: str = ""
    capabilities: Capabilities = Capabilities()
    #: torch device types it can run on ("cpu", "cuda"; ROCm reports "cuda").
    device_types: tuple[str, ...] = ("cpu", "cuda")
    #: The log-sum-exp the kernel returns (harness.exact.kvcache.LSE_CONVENTIONS): ``harness``, or
    #: ``flash-attn`` for the original's causal-ALiBi form (csrc/flash_attn/src/alibi.h: +slope *
    #: col, lse larger by slope * (row + seqlen_k - seqlen_q)), which its ports must match.
    lse_convention: str = "harness"
    #: Whether its first call on each structure (heads, head dims, dtype, masks) compiles
    #: code that later runs reuse from an on-disk cache (torch.compile): a run may then
    #: compile the cases' graphs ahead in a second process (:mod:`harness.run.warmup`).
    compiles_per_structure: bool = False

    def availability(self) -> str | None:
        """None when the backend can run here, else why not."""
        return None

    def describe(self) -> dict[str, str]:
        """The identity written into every record."""
        return {"name": self.name, "family": self.family, "flavor": self.flavor,
                "version": self.version}

    def unsupported_reasons(self, case: Case, target: Target) -> list[str]:
        """Every reason the backend does not claim to support ``case`` on ``target``."""
        reasons = self.call_reasons(case, target) + self.capabilities.reasons(case, self.name)
        return list(dict.fromkeys(reasons))

    def call_reasons(self, case: Case, target: Target) -> list[str]:
        """Reasons the harness cannot even call the kernel (never overridden by ``--audit``)."""
        if target.device_type not in self.device_types:
            return [f"{self.name} does not run on {target.device_type} "
                    f"(runs on {', '.join(self.device_types)})"]
        if case.entry not in self.capabilities.entries:
            return [f"{self.name} has no {case.entry} entry point"]
        return []

    def returns_lse_for(self, case: Case) -> bool:
        """Whether the forward returns the log-sum-exp for ``case``: the capabilities'
        ``returns_lse``, unless a family's path for the case returns none (AITER's fp8 entry)."""
        return self.capabilities.returns_lse

    def forward(self, inputs: Inputs, *, deterministic: bool = True) -> Outputs:
        """Run the kernel on ``inputs``; differentiable when the backend has a backward."""
        raise NotImplementedError


class BadReturn(Exception):
    """Raised by an adapter when what the kernel returned is not its family's return convention
    (a tuple where the family returns a bare tensor, a list, a tuple of another length, a None
    where the lse belongs). The message names what was returned and what was expected; the
    check fails on the forward contract."""


class Unsupported(Exception):
    """Raised by a forward that finds at run time that it cannot take the case (e.g. torch has
    no SDPA kernel for it). The message is the reason; the check becomes a skip."""
