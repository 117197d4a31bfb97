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
import difflib
import functools
import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from harness.errors import InvalidCase
from harness.vocab import CHECK_NAMES as CHECKS

DTYPES = ("float16", "bfloat16", "float32")
#: fp8 element types (issue 14), forward only: OCP e4m3fn (NVIDIA sm_89+, gfx950), e4m3fnuz
#: (gfx942) and OCP e5m2. Kept out of DTYPES so that no backend claims them by default; the
#: formats each target takes, the scaling and the rule are in :mod:`harness.exact.fp8`.
FP8_DTYPES = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2")
#: How the quantisation scales are chosen: one per tensor (q, k, v), or one per (batch, kv head)
#: of each tensor (the shape of FA3's q_descale/k_descale/v_descale).
FP8_RECIPES = ("per-tensor", "per-head")
#: What an fp8 kernel returns: bf16 (FA3 on NVIDIA), fp32 (AITER's Triton path), fp16.
FP8_OUT_DTYPES = ("bfloat16", "float16", "float32")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1,
               "float8_e4m3fnuz": 1, "float8_e5m2": 1}
ENTRIES = ("dense", "varlen", "kvcache")
LAYOUTS = ("contiguous", "strided", "packed-qkv", "packed-kv", "v-transposed", "dout-strided",
           "lastdim-strided", "latent-kv", "padded")
#: Value distributions (issue 12), each with the default of its ``value_scale`` parameter:
#: scaled: q and k times the factor (flash-attn's test_flash_attn_bwd_overflow uses 3 and 5);
#: key-bias: the score shift, +- t, of the offset all keys share with queries aligned with or
#: opposed to it (log-sum-exp near +-t); sink: how far, in score units, the sink keys stand
#: above the rest; flat: the factor that shrinks q (tiny logits); large: q and k times the
#: factor (scores near 1e4 and beyond).
VALUES = ("normal", "scaled", "key-bias", "sink", "flat", "large")
VALUE_SCALE_DEFAULTS = {"scaled": 5.0, "key-bias": 200.0, "sink": 30.0, "flat": 1e-3,
                        "large": 60.0}
#: Largest finite value per dtype (inputs must stay representable).
DTYPE_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38,
             "float32": 3.4028234663852886e38, "float8_e4m3fn": 448.0,
             "float8_e4m3fnuz": 240.0, "float8_e5m2": 57344.0}
#: Layouts and where they apply; packed-qkv also needs seqlen_q == seqlen_k, heads_q == heads_kv.
LAYOUT_ENTRIES = {"packed-qkv": ("dense", "varlen"), "packed-kv": ("dense", "varlen"),
                  "v-transposed": ("dense", "varlen", "kvcache"),
                  "dout-strided": ("dense", "varlen"),
                  "lastdim-strided": ("dense", "varlen", "kvcache"),
                  "padded": ("varlen",)}
#: layout -> the feature it turns on (Case.features, Capabilities.features).
LAYOUT_FEATURES = {"strided": "strided", "packed-qkv": "packed", "packed-kv": "packed",
                   "v-transposed": "v-transposed", "dout-strided": "dout-strided",
                   "lastdim-strided": "lastdim-strided", "latent-kv": "latent-kv",
                   "padded": "padded"}
#: Value distributions of v and of dout (issue 26; ``Case.v_values``, ``Case.dout_values``),
#: each applied to N(0, 1) draws: ``offset`` adds :data:`TENSOR_VALUE_OFFSET` (a non-zero mean:
#: an output far from 0 whose accumulation error grows with the key count), ``large`` multiplies
#: by :data:`TENSOR_VALUE_LARGE`, ``rows`` multiplies a few tokens of each sequence (its first
#: and its middle one) by :data:`TENSOR_VALUE_LARGE` (a few large rows).
TENSOR_VALUES = ("normal", "offset", "large", "rows")
TENSOR_VALUE_OFFSET = 8.0
TENSOR_VALUE_LARGE = 100.0
#: fp8 formats a KV cache may be stored in with 16-bit queries (issue 26, ``Case.kv_dtype``):
#: vLLM's ``--kv-cache-dtype fp8`` is e4m3fn, or e4m3fnuz on gfx942; fp8_e5m2 is its other
#: choice (vllm/platforms/rocm.py, docs features/quantization/quantized_kvcache).
KV_DTYPES = FP8_DTYPES
#: padded varlen (``layout = "padded"``): each sequence's slot is its length rounded up past
#: the next multiple of this (at least one padding token), so ``cu_seqlens`` give slot offsets
#: and ``seqused_q``/``seqused_k`` the lengths, as FA3/FA4's and vLLM's varlen calls take them.
PADDED_SLOT_MULTIPLE = 64

#: Fields that carry meaning for people but do not change the problem (not part of case_id).
METADATA_FIELDS = ("name", "source", "checks")
#: With ``cache_batch_idx`` the cache has this many times ``batch`` rows, as in flash-attn's
#: test_flash_attn_kvcache (``batch_size_cache = batch_size * 2``).
CACHE_BATCH_FACTOR = 2
#: ALiBi slope sets (``alibi_slopes``).
ALIBI_SLOPES = ("standard", "random", "random-per-batch")
#: The fields of the first case schema. Every later field is left out of ``identity()`` (and so
#: of ``case_id``) while it holds its default, so existing case ids never change.
ORIGINAL_FIELDS = frozenset((
    "batch", "seqlen_q", "seqlen_k", "heads_q", "heads_kv", "head_dim", "dtype", "causal",
    "window", "softcap", "alibi", "dropout_p", "scale", "entry", "seqlens_q", "seqlens_k",
    "paged_block_size", "layout"))


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
            batch, sequence and head strides; the last dimension stays contiguous);
            ``packed-qkv`` (q, k, v views of one ``(b, s, 3, h, d)`` buffer, ``(t, 3, h, d)`` for
            varlen, the gradient leaf, as ``flash_attn_qkvpacked_func`` takes them),
            ``packed-kv`` (k, v views of one ``(b, s, 2, hkv, d)`` buffer), ``v-transposed``
            (v a view of a heads-major ``(b, hkv, s, d)`` buffer, so its strides differ from
            k's), ``dout-strided`` (a non-contiguous output gradient) or ``lastdim-strided``
            (q, k, v with last-dimension stride 2; SDPA takes it, flash-attn kernels do not),
            ``latent-kv`` (v a view of k's first ``head_dim_v`` dimensions: the shared latent
            of DeepSeek's absorbed MLA decode, k = [kv_c ; k_pe], v = kv_c) or ``padded``
            (varlen only: every sequence's tokens start at a padded slot offset, the slot's
            tail holds padding; see :data:`PADDED_SLOT_MULTIPLE`).
        values: the value distribution of q and k: normal (N(0, 1)), scaled, key-bias, sink,
            flat or large (see :data:`VALUE_SCALE_DEFAULTS` and ``harness.exact.inputs``).
        value_scale: the distribution's parameter (scaled/large: the factor; key-bias: the
            offset's size; sink: the sink's score lead; flat: q's factor); None = its default.
        seqlen_new: kvcache only: new keys and values per sequence, appended through ``k=``/``v=``
            at ``cache_seqlens`` (the cache is updated in place); ``seqlens_k`` are then the
            lengths before the append (default ``seqlen_k - seqlen_new``).
        rotary_dim: kvcache with appends only: rotary embedding of q and the new keys over the
            first ``rotary_dim`` dimensions (even, <= head_dim; flash-attn's CUDA build needs a
            multiple of 16); 0 = none.
        rotary_interleaved: rotary pairs dimensions (0, 1), (2, 3), ... (GPT-J) instead of
            (0, rotary_dim/2), ... (GPT-NeoX, the default here).
        cache_leftpad: kvcache only: per sequence, the cache position its keys start at
            (``cache_leftpad``); None = 0.
        cache_batch_idx: kvcache only: the cache has ``CACHE_BATCH_FACTOR * batch`` rows and
            sequence ``b`` uses row ``cache_batch_idx[b]`` (a random permutation's first rows).
        num_splits: split-KV count passed to the kernel (1 = no split); 0 = its heuristic.
        alibi_slopes: with ``alibi``: ``standard`` (geometric slopes of heads_q), ``random``
            (``torch.rand(heads_q) * 0.3``) or ``random-per-batch`` (``(batch, heads_q)``, as
            flash-attn's tests draw them: ``torch.rand(batch_size, nheads) * 0.3``).
        fp8_recipe: fp8 dtypes only: ``per-tensor`` (one scale per q, k, v) or ``per-head``
            (one per batch row and kv head, FA3's descale shape).
        fp8_scales: fp8 dtypes only: fixed ``[q, k, v]`` scales (inputs are divided by them
            before the cast, the kernel gets them as descales); None = amax scaling, each scale
            ``amax / max of the format`` over its tensor (or head).
        fp8_out: fp8 dtypes only: the dtype the kernel returns (bfloat16, float16, float32).
        head_dim_v: the head dim of v and of the output (MLA: DeepSeek-V3 prefill 192/128,
            absorbed decode 576/512); 0 = ``head_dim``. With ``layout = "latent-kv"`` v is the
            first ``head_dim_v`` dimensions of k (the shared latent of absorbed MLA decode).
        learnable_sink: a learnable sink logit per query head (gpt-oss ``sinks``, FA4
            ``learnable_sink``, AITER ``sink_ptr``): one more logit in every row's softmax, in
            natural-log units of the scaled score (not scaled, not soft-capped), that joins the
            denominator and the lse but not the output's numerator (``harness.exact.scores``).
        sink_tokens: the first ``sink_tokens`` keys of each sequence stay visible under a local
            window (StreamingLLM's sink tokens, AITER's ``window_size[2]``): exempt from the
            window's left bound, never from its right bound (so a causal row does not see a
            sink token after its own position); needs a bounded left side (``window[0] >= 0``).
        kv_dtype: the fp8 format of the key/value cache with 16-bit queries (``""`` = the case's
            dtype): k and v are quantised with ``fp8_recipe``/``fp8_scales`` (``[k, v]``) and
            the kernel gets their descales (vLLM's ``k_scale``/``v_scale``).
        v_values: the value distribution of v (:data:`TENSOR_VALUES`).
        dout_values: the value distribution of the output gradient (:data:`TENSOR_VALUES`).
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
    values: str = "normal"
    value_scale: float | None = None
    seqlen_new: int = 0
    rotary_dim: int = 0
    rotary_interleaved: bool = False
    cache_leftpad: tuple[int, ...] | None = None
    cache_batch_idx: bool = False
    num_splits: int = 0
    alibi_slopes: str = "standard"
    fp8_recipe: str = "per-tensor"
    fp8_scales: tuple[float, float, float] | None = None
    fp8_out: str = "bfloat16"
    head_dim_v: int = 0
    learnable_sink: bool = False
    sink_tokens: int = 0
    kv_dtype: str = ""
    v_values: str = "normal"
    dout_values: str = "normal"
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
        for name, default, original in _identity_fields():
            value = getattr(self, name)
            if not original and value == default:
                continue
            if isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    @functools.cached_property
    def case_id(self) -> str:
        """12 hex digits of SHA-256 over the canonical JSON; identical on every machine
        (computed once per case: a case is frozen)."""
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
    def dv(self) -> int:
        """The head dim of v and of the output: ``head_dim_v``, or ``head_dim`` when 0."""
        return self.head_dim_v or self.head_dim

    @property
    def kv_fp8(self) -> bool:
        """Whether k and v are an fp8 cache read by 16-bit queries (``kv_dtype``)."""
        return self.kv_dtype in FP8_DTYPES

    @property
    def fp8(self) -> bool:
        """Whether any input is fp8: an fp8 dtype, or an fp8 KV cache."""
        return self.dtype in FP8_DTYPES or self.kv_fp8

    @property
    def kv_storage_dtype(self) -> str:
        """The dtype k and v are stored in: ``kv_dtype``, or the case's dtype."""
        return self.kv_dtype or self.dtype

    def slots(self, lengths: tuple[int, ...]) -> tuple[int, ...]:
        """varlen: the tokens each sequence occupies in its packed tensor: its length, or with
        ``layout = "padded"`` the length rounded up past the next multiple of
        :data:`PADDED_SLOT_MULTIPLE` (at least one padding token)."""
        if self.layout != "padded":
            return tuple(lengths)
        m = PADDED_SLOT_MULTIPLE
        return tuple((n // m + 1) * m for n in lengths)

    @property
    def rows_q(self) -> int:
        """varlen: rows of the packed q (and out, lse): ``total_q``, plus the padding of a
        padded layout."""
        if self.entry != "varlen":
            return self.total_q
        assert self.seqlens_q is not None
        return sum(self.slots(self.seqlens_q))

    @property
    def rows_k(self) -> int:
        """varlen: rows of the packed k and v, padding included."""
        if self.entry != "varlen":
            return self.total_k
        assert self.seqlens_k is not None
        return sum(self.slots(self.seqlens_k))

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 = MHA, heads_q = MQA)."""
        return self.heads_q // self.heads_kv

    @property
    def docstring_window(self) -> tuple[int, int]:
        """The window as flash-attn's docstrings define it: ``window`` with causal folded in
        (right = 0), taken literally."""
        left, right = self.window
        return (left, 0) if self.causal else (left, right)

    @property
    def window_seqlen_k(self) -> int:
        """The ``seqlen_k`` flash-attn's C++ layer normalises the window against: ``k.size(1)``
        in ``mha_fwd``, ``max_seqlen_k`` in ``mha_varlen_fwd`` and the cache capacity in
        ``mha_fwd_kvcache`` (``max_num_blocks_per_seq * page_block_size`` when paged)
        (csrc/flash_attn/flash_api.cpp)."""
        if self.entry == "kvcache" and self.paged_block_size:
            return -(-self.seqlen_k // self.paged_block_size) * self.paged_block_size
        return self.seqlen_k

    @property
    def kernel_window(self) -> tuple[int, int]:
        """The window flash-attn's CUDA kernels run with (csrc/flash_attn/flash_api.cpp):
        ``mha_fwd``, ``mha_varlen_fwd`` and ``mha_fwd_kvcache`` set ``window_size_right = 0``
        when causal and turn a side ``>= seqlen_k`` into -1 (``if (window_size_left >= seqlen_k)
        { window_size_left = -1; }``, the same for the right); ``set_params_fprop`` then gives a
        -1 side whose partner is bounded the value ``seqlen_k`` (``if (window_size_left < 0 &&
        window_size_right >= 0) { window_size_left = seqlen_k; }`` and the mirror). CK's
        csrc/flash_attn_ck/mha_fwd.cpp does the same. ``seqlen_k`` is
        :attr:`window_seqlen_k`."""
        left, right = self.docstring_window
        sk = self.window_seqlen_k
        left = -1 if left >= sk else left
        right = -1 if right >= sk else right
        if left < 0 <= right:
            left = sk
        elif right < 0 <= left:
            right = sk
        return left, right

    @property
    def mask_window(self) -> tuple[int, int]:
        """The ``(left, right)`` window the reference masks with: the original's meaning
        (:attr:`kernel_window`), written with -1 wherever a side bounds nothing, so that
        ``causal`` stays ``(-1, 0)``. A left side of ``seqlen_k`` never hides a key (its bound
        ``i + sk_b - sq_b - seqlen_k`` is negative for every row); a right side of ``seqlen_k``
        hides keys only when ``seqlen_q > seqlen_k + 1``. :attr:`docstring_differs` says when
        this differs from the docstring's rule."""
        left, right = self.kernel_window
        sk = self.window_seqlen_k
        if left == sk:
            left = -1
        if right == sk and self.seqlen_q <= sk + 1:
            right = -1
        return left, right

    @property
    def docstring_differs(self) -> bool:
        """Whether flash-attn's docstring rule (:attr:`docstring_window` taken literally) masks
        differently from the original (:attr:`mask_window`) on this case's sequences. The
        normalisation only widens or only narrows the right side, so the masks are equal
        exactly when they leave the same number of pairs visible."""
        if self.docstring_window == self.mask_window:
            return False
        old, new = self.docstring_window, self.mask_window
        return any(attended_pairs(sq, sk, *old) != attended_pairs(sq, sk, *new)
                   for (sq, sk), _ in self.length_counts())

    @property
    def alibi_causal_mode(self) -> bool:
        """Whether flash-attn's kernel runs this case in its causal mode
        (``params.is_causal = window_size_left < 0 && window_size_right == 0`` in
        ``set_params_fprop``, after the ``>= seqlen_k`` normalisation): causal, window
        ``(-1, 0)``, or causal with a left side ``>= seqlen_k``. There ALiBi adds
        ``+slope * col`` (csrc/flash_attn/src/alibi.h), so the returned lse is larger by
        ``slope * (row + seqlen_k - seqlen_q)`` than with the docstring's bias."""
        left, right = self.docstring_window
        sk = self.window_seqlen_k
        return (left < 0 or left >= sk) and right == 0

    def cache_lengths(self) -> tuple[int, ...]:
        """kvcache: ``cache_seqlens`` before the call (cache positions in use, leftpad
        included): ``seqlens_k``, or ``seqlen_k - seqlen_new`` for every sequence."""
        if self.seqlens_k is not None:
            return self.seqlens_k
        return (self.seqlen_k - self.seqlen_new,) * self.batch

    def leftpads(self) -> tuple[int, ...]:
        """kvcache: per sequence, the cache position its keys start at (0 without leftpad)."""
        return self.cache_leftpad if self.cache_leftpad is not None else (0,) * self.batch

    def key_lengths(self) -> tuple[int, ...]:
        """kvcache: keys each sequence attends after the call: ``cache_seqlens + seqlen_new -
        cache_leftpad``."""
        return tuple(n + self.seqlen_new - lp
                     for n, lp in zip(self.cache_lengths(), self.leftpads(), strict=True))

    @property
    def cache_rows(self) -> int:
        """kvcache: rows of the (logical) cache: ``batch``, or ``CACHE_BATCH_FACTOR * batch``
        with ``cache_batch_idx``."""
        return self.batch * (CACHE_BATCH_FACTOR if self.cache_batch_idx else 1)

    @property
    def per_sequence_keys(self) -> bool:
        """kvcache: whether sequences attend different numbers of keys (per-sequence pieces)."""
        return self.entry == "kvcache" and (self.seqlens_k is not None
                                            or self.cache_leftpad is not None)

    @property
    def value_scale_used(self) -> float:
        """``value_scale``, or its distribution's default (0 for normal values)."""
        if self.value_scale is not None:
            return self.value_scale
        return VALUE_SCALE_DEFAULTS.get(self.values, 0.0)

    @property
    def has_mask(self) -> bool:
        return self.mask_window != (-1, -1)

    def sequence_lengths(self) -> list[tuple[int, int]]:
        """``(seqlen_q, seqlen_k)`` of every sequence in the batch (``batch`` items: prefer
        :meth:`length_counts`, which is O(1) for dense cases whatever the batch)."""
        return [pair for pair, n in self.length_counts() for _ in range(n)]

    def length_counts(self) -> list[tuple[tuple[int, int], int]]:
        """``((seqlen_q, seqlen_k), sequences)`` pairs covering the batch: one pair for a dense
        case (O(1) in ``batch``), one per sequence for varlen and kvcache (per-sequence lengths)."""
        if self.entry == "varlen":
            assert self.seqlens_q is not None and self.seqlens_k is not None
            return [(pair, 1) for pair in zip(self.seqlens_q, self.seqlens_k, strict=True)]
        if self.per_sequence_keys:
            return [((self.seqlen_q, sk), 1) for sk in self.key_lengths()]
        if self.seqlens_k is not None:
            return [((self.seqlen_q, sk), 1) for sk in self.seqlens_k]
        return [((self.seqlen_q, self.seqlen_k), self.batch)]

    @property
    def rows_without_keys(self) -> bool:
        """Whether some query row sees no key (its output is zero by flash-attn's semantics):
        under a bottom-right right bound when ``seqlen_k - seqlen_q + right < 0`` (the leading
        rows), or in a sequence with no keys at all."""
        _, right = self.mask_window
        return any(sq > 0 and (sk == 0 or (right >= 0 and sk - sq + right < 0))
                   for (sq, sk), _ in self.length_counts())

    @property
    def total_q(self) -> int:
        return sum(sq * n for (sq, _), n in self.length_counts())

    @property
    def total_k(self) -> int:
        return sum(sk * n for (_, sk), n in self.length_counts())

    def attended_pairs(self) -> int:
        """Query-key pairs the mask leaves visible, summed over the batch (per head); sink
        tokens add the pairs the left bound alone would hide."""
        left, right = self.mask_window
        return sum(n * (attended_pairs(sq, sk, left, right)
                        + sink_pairs(sq, sk, left, right, self.sink_tokens))
                   for (sq, sk), n in self.length_counts())

    def flops_fwd(self) -> int:
        """Forward FLOPs as flash-attn's benchmark counts them: ``2 * (head_dim + head_dim_v)``
        per head and visible pair (``q k^T`` and ``P V``; hopper/benchmark_attn.py ``flops``,
        ``batch * nheads * 2 * seqlen_q * avg_seqlen * (headdim + headdim_v)``), which is
        ``4 * head_dim`` when the head dims are equal."""
        return 2 * self.heads_q * (self.head_dim + self.dv) * self.attended_pairs()

    def input_bytes(self) -> int:
        """Bytes of q, k, v and the output (q and out at the case's dtype, k and v at
        :attr:`kv_storage_dtype`; kv-cache at its capacity, padded varlen with its padding)."""
        es = DTYPE_BYTES[self.dtype]
        kv_es = DTYPE_BYTES[self.kv_storage_dtype]
        tokens_k = self.cache_rows * self.seqlen_k if self.entry == "kvcache" else self.rows_k
        rows_q = self.rows_q
        q_bytes = rows_q * self.heads_q * (self.head_dim + self.dv) * es  # q and the output
        v_dims = 0 if self.layout == "latent-kv" else self.dv  # v is a view of k
        return q_bytes + tokens_k * self.heads_kv * (self.head_dim + v_dims) * kv_es

    @property
    def features(self) -> frozenset[str]:
        """Named features this case turns on; backends declare the ones they support."""
        on = set()
        if self.causal:
            on.add("causal")
        # The window the API is called with, not what the kernel makes of it (mask_window).
        if self.docstring_window != (-1, -1) and not (self.causal and self.window[0] == -1):
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
        if self.layout in LAYOUT_FEATURES:
            on.add(LAYOUT_FEATURES[self.layout])
        if self.paged_block_size:
            on.add("paged")
        if any(sq > sk for (sq, sk), _ in self.length_counts()):
            on.add("seqlen_q>seqlen_k")
        on.update(name for name, test in _CACHE_FEATURES if test(self))
        on.update(name for name, test in _PROBLEM_FEATURES if test(self))
        return frozenset(on)

    @property
    def fp8_label(self) -> str:
        """The scaling of an fp8 case, e.g. ``desc=amax/head``, ``desc=q0.5,k0.25,v2 out=f32``
        (an fp8 KV cache: ``kv=e4m3fn desc=k0.25,v2``)."""
        if self.kv_fp8:
            text = "kv=" + _DTYPE_LABELS[self.kv_dtype] + " "
            if self.fp8_scales is not None:
                k, v = self.fp8_scales
                return text + f"desc=k{k:g},v{v:g}"
            return text + "desc=amax/" + ("head" if self.fp8_recipe == "per-head" else "tensor")
        if self.fp8_scales is not None:
            q, k, v = self.fp8_scales
            text = f"desc=q{q:g},k{k:g},v{v:g}"
        else:
            text = "desc=amax/" + ("head" if self.fp8_recipe == "per-head" else "tensor")
        if self.fp8_out != "bfloat16":
            text += " out=" + {"float16": "f16", "float32": "f32"}.get(self.fp8_out, self.fp8_out)
        return text

    @property
    def label(self) -> str:
        """A short human description, e.g. ``b2 q113 k203 h8/2 d64 f16 causal``."""
        dt = _DTYPE_LABELS[self.dtype]
        heads = f"h{self.heads_q}"
        if self.heads_kv != self.heads_q:
            heads += f"/{self.heads_kv}"
        dims = f"d{self.head_dim}" + (f"/{self.dv}" if self.dv != self.head_dim else "")
        parts = [f"b{self.batch}", f"q{self.seqlen_q}", f"k{self.seqlen_k}", heads, dims, dt]
        if self.fp8:
            parts.append(self.fp8_label)
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
        if self.values != "normal":
            parts.append(f"vals={self.values}{self.value_scale_used:g}")
        parts.extend(self._cache_label_parts())
        return " ".join(parts)

    def _cache_label_parts(self) -> list[str]:
        parts = []
        if self.seqlen_new:
            parts.append(f"new{self.seqlen_new}")
        if self.rotary_dim:
            parts.append(f"rope{self.rotary_dim}{'i' if self.rotary_interleaved else 'n'}")
        if self.cache_leftpad is not None:
            parts.append(f"leftpad{max(self.cache_leftpad, default=0)}")
        if self.cache_batch_idx:
            parts.append("batch-idx")
        if self.num_splits:
            parts.append(f"splits{self.num_splits}")
        if self.alibi and self.alibi_slopes != "standard":
            parts.append(f"slopes={self.alibi_slopes}")
        if self.learnable_sink:
            parts.append("sink")
        if self.sink_tokens:
            parts.append(f"sinktok{self.sink_tokens}")
        if self.v_values != "normal":
            parts.append(f"v={self.v_values}")
        if self.dout_values != "normal":
            parts.append(f"dout={self.dout_values}")
        return parts

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
_DTYPE_LABELS = {"float16": "f16", "bfloat16": "bf16", "float32": "f32",
                 "float8_e4m3fn": "e4m3fn", "float8_e4m3fnuz": "e4m3fnuz", "float8_e5m2": "e5m2"}


@functools.lru_cache(maxsize=1)
def _identity_fields() -> tuple[tuple[str, Any, bool], ...]:
    """``(name, default, in the first schema)`` of every problem-defining field, in order."""
    return tuple((f.name, f.default, f.name in ORIGINAL_FIELDS) for f in dataclasses.fields(Case)
                 if f.name not in METADATA_FIELDS)

#: Defaults of the kvcache-only fields (the "off" value each must hold for other entries).
_FIELD_DEFAULTS = {"seqlen_new": 0, "rotary_dim": 0, "cache_leftpad": None,
                   "cache_batch_idx": False}
#: kv-cache features: (name, whether the case turns it on).
_CACHE_FEATURES = (
    ("append", lambda c: c.seqlen_new > 0),
    ("rotary", lambda c: c.rotary_dim > 0),
    ("leftpad", lambda c: c.cache_leftpad is not None),
    ("batch-idx", lambda c: c.cache_batch_idx),
    ("splits", lambda c: c.num_splits != 0),
    ("alibi-per-batch", lambda c: c.alibi and c.alibi_slopes == "random-per-batch"),
)
#: The problems of issue 26: (name, whether the case poses it); layouts add theirs through
#: :data:`LAYOUT_FEATURES`.
_PROBLEM_FEATURES = (
    ("mla", lambda c: c.dv != c.head_dim),
    ("sink", lambda c: c.learnable_sink),
    ("sink-tokens", lambda c: c.sink_tokens > 0),
    ("fp8-kv", lambda c: c.kv_fp8),
)


def _defaults() -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(Case):
        if f.default is not dataclasses.MISSING:
            value = f.default
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def toml_value(value: Any) -> str:
    """Render a scalar or list as TOML on one line: every scalar as tomli-w writes it (a TOML
    writer, so no text can end its string or its line), lists as ``[a, b]``."""
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, (bool, int, float)):
        return _written(value)
    raise TypeError(f"cannot write {value!r} as TOML")


def _written(value: bool | int | float | str) -> str:
    """One scalar as tomli-w writes it in ``key = value``."""
    return tomli_w.dumps({"v": value})[len("v = "):].rstrip("\n")


def toml_string(text: str) -> str:
    """A TOML basic string in pure ASCII: tomli-w writes it (quotes, backslashes and control
    characters escaped), then non-ASCII characters become ``\\uXXXX`` (BMP) or ``\\UXXXXXXXX``
    (beyond it, e.g. emoji), never JSON's surrogate pairs, which TOML refuses. ASCII keeps the
    text safe in shell commands (``shlex.quote``) and any terminal."""
    out = []
    for ch in _written(text):
        code = ord(ch)
        if code < 0x80:
            out.append(ch)
        elif code <= 0xFFFF:
            if 0xD800 <= code <= 0xDFFF:
                raise InvalidCase(f"text {text!r} holds a lone surrogate (U+{code:04X}), which "
                                  "no TOML or UTF-8 file can hold; remove it")
            out.append(f"\\u{code:04X}")
        else:
            out.append(f"\\U{code:08X}")
    return "".join(out)


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
    close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field {key!r} ({hint}fields are {', '.join(FIELD_NAMES)})"


# ------------------------------------------------------------------------------ validation


def _set(case: Case, name: str, value: Any) -> None:
    object.__setattr__(case, name, value)


def _normalize(case: Case) -> None:
    """Coerce TOML values to canonical types and fill the defaults that depend on other fields."""
    for name in ("window", "seqlens_q", "seqlens_k", "checks", "cache_leftpad"):
        value = getattr(case, name)
        if isinstance(value, list):
            _set(case, name, tuple(value))
    for name in ("softcap", "dropout_p", "scale", "value_scale"):
        value = getattr(case, name)
        if isinstance(value, int) and not isinstance(value, bool):
            _set(case, name, float(value))
    if isinstance(case.fp8_scales, (list, tuple)):
        _set(case, "fp8_scales", tuple(float(x) if _is_int(x) else x for x in case.fp8_scales))
    if _is_int(case.heads_q) and case.heads_kv == 0:
        _set(case, "heads_kv", case.heads_q)
    if _is_int(case.head_dim_v) and case.head_dim_v == case.head_dim:
        _set(case, "head_dim_v", 0)  # one spelling per problem: equal dims are the default
    if case.kv_dtype and case.kv_dtype == case.dtype:
        _set(case, "kv_dtype", "")
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
    if case.dtype not in DTYPES + FP8_DTYPES:
        p.append(f"dtype={case.dtype!r} must be one of {', '.join(DTYPES + FP8_DTYPES)}")
    p.extend(_fp8_problems(case))
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
    if not p:
        p.extend(_cache_problems(case))
    p.extend(_value_layout_problems(case))
    p.extend(_problem_problems(case))
    if case.checks is not None and (
            not isinstance(case.checks, tuple) or not all(c in CHECKS for c in case.checks)):
        p.append(f"checks={case.checks!r} must be a list drawn from {', '.join(CHECKS)}")
    for name in ("name", "source"):
        if not isinstance(getattr(case, name), str):
            p.append(f"{name}={getattr(case, name)!r} must be a string")
    return p


def _fp8_problems(case: Case) -> list[str]:  # noqa: C901 - one flat list of rules reads best
    """The rules of the ``fp8_*`` fields (issue 14) and of ``kv_dtype`` (issue 26)."""
    p: list[str] = []
    fp8_dtype = case.dtype in FP8_DTYPES
    if not isinstance(case.kv_dtype, str) or case.kv_dtype not in ("",) + KV_DTYPES:
        p.append(f"kv_dtype={case.kv_dtype!r} must be one of {', '.join(KV_DTYPES)} (or omitted "
                 "for the case's dtype)")
        return p
    if case.kv_dtype and case.dtype not in ("float16", "bfloat16"):
        p.append(f"kv_dtype={case.kv_dtype!r} is an fp8 KV cache read by 16-bit queries, but "
                 f"dtype={case.dtype!r}: use dtype float16 or bfloat16 (an fp8 dtype makes q, k "
                 "and v fp8)")
        return p
    if not fp8_dtype and not case.kv_dtype:
        for name, default in (("fp8_recipe", "per-tensor"), ("fp8_scales", None),
                              ("fp8_out", "bfloat16")):
            if getattr(case, name) != default:
                p.append(f"{name}={getattr(case, name)!r} is for fp8 dtypes only "
                         f"(dtype={case.dtype!r}): remove it, use one of {', '.join(FP8_DTYPES)} "
                         "or set kv_dtype")
        return p
    if case.fp8_recipe not in FP8_RECIPES:
        p.append(f"fp8_recipe={case.fp8_recipe!r} must be one of {', '.join(FP8_RECIPES)}")
    if fp8_dtype and case.fp8_out not in FP8_OUT_DTYPES:
        p.append(f"fp8_out={case.fp8_out!r} must be one of {', '.join(FP8_OUT_DTYPES)}")
    if not fp8_dtype and case.fp8_out != "bfloat16":
        p.append(f"fp8_out={case.fp8_out!r} is for fp8 dtypes: with kv_dtype the kernel returns "
                 f"the queries' dtype ({case.dtype}); remove it")
    scales = case.fp8_scales
    names = "[q, k, v]" if fp8_dtype else "[k, v]"
    count = 3 if fp8_dtype else 2
    if scales is not None:
        if not (isinstance(scales, tuple) and len(scales) == count and all(
                isinstance(x, float) and math.isfinite(x) and x > 0 for x in scales)):
            p.append(f"fp8_scales={list(scales) if isinstance(scales, tuple) else scales!r} must "
                     f"be {names}, {count} finite numbers > 0 (or omitted for amax scaling)")
        elif case.fp8_recipe != "per-tensor":
            p.append(f"fp8_scales fixes one scale per tensor but fp8_recipe="
                     f"{case.fp8_recipe!r}: omit fp8_scales or use fp8_recipe = 'per-tensor'")
        elif case.layout == "latent-kv" and scales[-1] != scales[-2]:
            p.append(f"fp8_scales={list(scales)}: with layout='latent-kv' v is a view of k's "
                     "bytes, so its scale is k's: make the k and v scales equal")
    what = "fp8 KV caches (kv_dtype)" if not fp8_dtype else f"dtype={case.dtype!r}"
    if case.dropout_p:
        p.append(f"{what} is forward-only attention without dropout: set dropout_p = 0")
    if case.layout not in ("contiguous", "strided", "latent-kv"):
        p.append(f"layout={case.layout!r} is not posed for {what} (q, k, v are quantised one "
                 "tensor at a time): use contiguous, strided or latent-kv")
    for name, default in (("seqlen_new", 0), ("rotary_dim", 0), ("cache_leftpad", None),
                          ("cache_batch_idx", False)):
        if getattr(case, name, default) != default:
            p.append(f"{name}={getattr(case, name)!r} is not posed for {what} yet (appended "
                     f"keys and cache rows are not quantised): remove it or use a 16-bit dtype")
    return p


def _problem_problems(case: Case) -> list[str]:  # noqa: C901 - one flat list of rules reads best
    """The rules of issue 26's fields: ``head_dim_v``, the sinks, the v/dout values and the
    latent-kv and padded layouts."""
    p: list[str] = []
    if not _is_int(case.head_dim_v) or case.head_dim_v < 0:
        p.append(f"head_dim_v={case.head_dim_v!r} must be an integer >= 0 (0 = head_dim)")
        return p
    layout = case.layout
    if case.dv != case.head_dim and layout in ("packed-qkv", "packed-kv"):
        p.append(f"layout={layout!r} holds k and v in one buffer, so it needs head_dim_v == "
                 f"head_dim (got {case.head_dim} and {case.dv}): use contiguous")
    if layout == "latent-kv":
        if case.dv > case.head_dim:
            p.append(f"layout='latent-kv' makes v the first head_dim_v dimensions of k, so "
                     f"head_dim_v={case.dv} must be <= head_dim={case.head_dim}")
        if case.seqlen_new or case.rotary_dim:
            p.append("layout='latent-kv' is not posed with kv-cache appends (seqlen_new, "
                     "rotary_dim): remove them")
    if layout == "padded" and case.dropout_p:
        p.append("layout='padded' is forward-only attention without dropout: set dropout_p = 0")
    if not isinstance(case.learnable_sink, bool):
        p.append(f"learnable_sink={case.learnable_sink!r} must be true or false")
    elif case.learnable_sink and case.dropout_p:
        p.append("learnable_sink = true is not posed with dropout (the exact dropout judge's "
                 "probabilities have no sink): set dropout_p = 0")
    if not _is_int(case.sink_tokens) or case.sink_tokens < 0:
        p.append(f"sink_tokens={case.sink_tokens!r} must be an integer >= 0")
    elif case.sink_tokens and not (isinstance(case.window, tuple) and len(case.window) == 2
                                   and _is_int(case.window[0]) and case.window[0] >= 0):
        p.append(f"sink_tokens={case.sink_tokens} keeps the first keys visible besides a local "
                 "window, so it needs one: set window = [left, right] with left >= 0")
    for name in ("v_values", "dout_values"):
        value = getattr(case, name)
        if value not in TENSOR_VALUES:
            p.append(f"{name}={value!r} must be one of {', '.join(TENSOR_VALUES)}")
    return p


def _value_layout_problems(case: Case) -> list[str]:
    """The rules of ``values``, ``value_scale`` and the per-tensor layouts."""
    p: list[str] = []
    if case.values not in VALUES:
        p.append(f"values={case.values!r} must be one of {', '.join(VALUES)}")
        return p
    scale = case.value_scale
    if scale is not None:
        if not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0:
            p.append(f"value_scale={scale!r} must be a finite number > 0 "
                     "(or omitted for the distribution's default)")
            return p
        if case.values == "normal":
            p.append(f"value_scale={scale!r} needs a values distribution other than 'normal' "
                     f"(one of {', '.join(VALUES[1:])})")
    # fp8 inputs are drawn in float32 and divided by their scale before the cast
    # (harness.exact.fp8): any magnitude is representable, and fixed scales saturate by design.
    limit = None if case.dtype in FP8_DTYPES else DTYPE_MAX.get(case.dtype)
    if limit and case.values in ("scaled", "large") and 8 * case.value_scale_used > limit:
        p.append(f"value_scale={case.value_scale_used:g} makes {case.values} inputs overflow "
                 f"{case.dtype} (8 sigma must stay below {limit:g}): use at most {limit / 8:g}")
    layout = case.layout
    if layout in LAYOUT_ENTRIES and case.entry not in LAYOUT_ENTRIES[layout]:
        p.append(f"layout={layout!r} needs entry {' or '.join(LAYOUT_ENTRIES[layout])} "
                 f"(entry={case.entry!r})")
    if layout == "packed-qkv":
        if case.heads_q != case.heads_kv:
            p.append(f"layout='packed-qkv' needs heads_q == heads_kv (got {case.heads_q} and "
                     f"{case.heads_kv}): use layout='packed-kv' for GQA")
        same = (case.seqlens_q == case.seqlens_k if case.entry == "varlen"
                else case.seqlen_q == case.seqlen_k)
        if not same:
            p.append("layout='packed-qkv' needs seqlen_q == seqlen_k (seqlens_q == seqlens_k "
                     "for varlen): use layout='packed-kv'")
    if layout in ("packed-qkv", "packed-kv", "v-transposed", "lastdim-strided") \
            and case.paged_block_size:
        p.append(f"layout={layout!r} cannot be combined with a paged cache "
                 f"(paged_block_size={case.paged_block_size})")
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
    elif case.paged_block_size and case.entry != "varlen":
        p.append(f"paged_block_size={case.paged_block_size} needs entry='kvcache' or 'varlen' "
                 f"(entry={case.entry!r})")
    return p


def _cache_problems(case: Case) -> list[str]:  # noqa: C901 - one flat list of rules reads best
    """The rules of the kv-cache fields (appends, rotary, leftpad, batch-idx, splits) and of
    ``alibi_slopes``. Runs after the shape and entry rules passed."""
    p: list[str] = []
    for name in ("seqlen_new", "rotary_dim", "num_splits"):
        value = getattr(case, name)
        if not _is_int(value) or value < 0:
            p.append(f"{name}={value!r} must be an integer >= 0")
    for name in ("rotary_interleaved", "cache_batch_idx"):
        if not isinstance(getattr(case, name), bool):
            p.append(f"{name}={getattr(case, name)!r} must be true or false")
    if case.alibi_slopes not in ALIBI_SLOPES:
        p.append(f"alibi_slopes={case.alibi_slopes!r} must be one of {', '.join(ALIBI_SLOPES)}")
    elif case.alibi_slopes != "standard" and not case.alibi:
        p.append(f"alibi_slopes={case.alibi_slopes!r} needs alibi = true")
    lp = case.cache_leftpad
    if lp is not None and (not _int_tuple(lp) or len(lp) != case.batch):
        p.append(f"cache_leftpad={lp!r} must be a list of {case.batch} integers (one per "
                 "sequence)")
    if p:
        return p
    if case.entry != "kvcache":
        for name in ("seqlen_new", "rotary_dim", "cache_leftpad", "cache_batch_idx"):
            if getattr(case, name) != _FIELD_DEFAULTS[name]:
                p.append(f"{name}={toml_value(getattr(case, name))} needs entry='kvcache' "
                         f"(entry={case.entry!r}): remove it or use the kvcache entry point")
        return p
    if case.rotary_interleaved and not case.rotary_dim:
        p.append("rotary_interleaved = true needs rotary_dim > 0")
    if case.rotary_dim:
        if not case.seqlen_new:
            p.append(f"rotary_dim={case.rotary_dim} needs seqlen_new > 0: flash_attn_with_kvcache "
                     "rotates only when new keys are appended (k=, v=)")
        if case.rotary_dim % 2 or case.rotary_dim > case.head_dim:
            p.append(f"rotary_dim={case.rotary_dim} must be even and <= head_dim="
                     f"{case.head_dim}")
    lengths = case.cache_lengths()
    if case.seqlen_new:
        worst = max(lengths, default=0) + case.seqlen_new
        if worst > case.seqlen_k:
            p.append(f"seqlen_new={case.seqlen_new} does not fit: cache_seqlens + seqlen_new = "
                     f"{worst} > seqlen_k={case.seqlen_k} (the cache capacity): shorten "
                     "seqlens_k or seqlen_new")
    if case.rotary_dim and case.has_mask and not p:
        # Causal/local: q row i is rotated at position cache_seqlens + i (flash_attn_interface
        # docstring); the cos/sin table has window_seqlen_k rows.
        worst = max(lengths, default=0) + case.seqlen_q
        if worst > case.window_seqlen_k:
            p.append(f"rotary positions reach cache_seqlens + seqlen_q = {worst} > the "
                     f"{case.window_seqlen_k} rows of the cos/sin table (seqlen_k): shorten "
                     "seqlens_k or seqlen_q")
    if lp is not None:
        bad = [(b, x, n) for b, (x, n) in enumerate(zip(lp, lengths, strict=True))
               if x < 0 or x > n]
        if bad:
            b, x, n = bad[0]
            p.append(f"cache_leftpad[{b}]={x} must be in [0, cache length {n}] (keys start at "
                     "cache_leftpad and end at cache_seqlens + seqlen_new)")
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


def sink_pairs(seqlen_q: int, seqlen_k: int, left: int, right: int, sink_tokens: int) -> int:
    """Pairs that sink tokens add to the window's, in O(1): row ``i`` also sees keys ``j <
    min(sink_tokens, seqlen_k)`` left of its left bound ``i + off - left`` and within its right
    bound ``i + off + right`` (``harness.exact.scores``: sinks are exempt from the left bound
    only), ``min(S, i + c)`` of them, ``c = min(off - left, off + right + 1)``."""
    if seqlen_q <= 0 or seqlen_k <= 0 or left < 0 or sink_tokens <= 0:
        return 0
    off = seqlen_k - seqlen_q
    sinks = min(sink_tokens, seqlen_k)
    c = off - left if right < 0 else min(off - left, off + right + 1)
    n = seqlen_q
    a = min(n, max(0, 1 - c))  # first row with i + c > 0
    b = min(n, max(a, sinks - c))  # first row with i + c >= sinks
    ramp = (b - a) * (a + b - 1) // 2 + (b - a) * c
    return ramp + (n - b) * sinks


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
    names = list(axes)
    combos = itertools.product(*axes.values())
    return [Case(**dict(zip(names, combo, strict=True))) for combo in combos]
