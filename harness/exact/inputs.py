"""Seeded input tensors for a case, identical on every machine.

Values are drawn on the CPU in float32 with a generator seeded from ``(seed, case_id)``, rounded
to the case's dtype and only then moved to the device, so an MI300X and an H100 judge the very same
numbers. ``strided`` cases get views into larger buffers whose gaps hold NaN: a kernel that
ignores strides reads the gaps and its output shows it.

Value distributions (``Case.values``, parameter ``Case.value_scale`` = ``t`` below, ``s`` the
softmax scale, ``d`` the head dim) change q and k only; v and dout have their own
(``Case.v_values``, ``Case.dout_values``: N(0, 1), or shifted by 8, or times 100, or a few
large rows, :data:`harness.case.TENSOR_VALUES`):

* ``scaled``: q and k times ``t`` (flash-attn's test_flash_attn_bwd_overflow: 3 and 5).
* ``key-bias``: every key of a kv head carries the same offset ``a * u`` (``u`` a random sign
  vector, ``a = sqrt(t / (s * d))``) and each query row carries ``+a * u`` or ``-a * u`` (a seeded
  sign per row and head): its scores, and its log-sum-exp, sit near ``+t`` or ``-t`` (default
  200, far outside float32's exp range of about +-88.7).
* ``sink``: every query carries ``+a * u`` and so do two keys per sequence (its first key and
  its middle one): those keys' scores lead the rest by about ``t`` (default 30): near one-hot.
* ``flat``: q times ``t`` (default 1e-3): tiny logits, near-uniform rows.
* ``large``: q and k times ``t`` (default 60): scores of 1e3-1e4 and beyond.

Layouts beyond ``strided``: ``packed-qkv``/``packed-kv`` make q, k, v (or k, v) views of one
buffer (``Inputs.packed``, the gradient leaf of :meth:`Inputs.with_grad`); ``v-transposed``
makes v a view of a heads-major ``(b, hkv, s + 1, d)`` buffer (an extra NaN token per head) so
its strides differ from k's; ``dout-strided`` gives dout the NaN-gapped strided layout;
``lastdim-strided`` gives q, k, v a last-dimension stride of 2 with NaN in between;
``latent-kv`` makes v the view ``k[..., :head_dim_v]``; ``padded`` (varlen) places each
sequence at a padded slot offset (``cu_seqlens_*`` are slot offsets, ``seqused_*`` lengths).

Every element a kernel must not read is NaN (:mod:`harness.exact.padding`): cache slots past
each length, before a leftpad, cache rows no sequence uses, pages no sequence's keys live in,
the tail of a sequence's last page, the gaps of a padded varlen layout.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from harness.case import FP8_DTYPES, TENSOR_VALUE_LARGE, TENSOR_VALUE_OFFSET, Case
from harness.exact.padding import poison

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: Rows drawn per randn call: bounds the float32 staging memory for million-token inputs.
_DRAW_ROWS = 1 << 16


def derive_seed(seed: int, case_id: str, salt: str = "") -> int:
    """A 63-bit seed for one case, stable across machines and Python versions."""
    digest = hashlib.sha256(f"{seed}:{case_id}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def alibi_slopes(heads: int) -> list[float]:
    """The standard ALiBi slopes (Press et al. 2022): a geometric sequence from 2**(-8/n).

    For a head count that is not a power of two, the slopes of the next lower power of two are
    followed by every other slope of the next higher one, as in the reference implementation.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if heads & (heads - 1) == 0:
        return power_of_two(heads)
    lower = 1 << (heads.bit_length() - 1)
    return power_of_two(lower) + power_of_two(2 * lower)[0::2][: heads - lower]


@dataclass
class Inputs:
    """Tensors for one case on one device.

    Shapes by entry point (``hq``/``hkv`` heads, ``d`` head_dim):

    * dense: ``q`` (batch, seqlen_q, hq, d); ``k``, ``v`` (batch, seqlen_k, hkv, d).
    * varlen: ``q`` (total_q, hq, d); ``k``, ``v`` (total_k, hkv, d); ``cu_seqlens_q/k`` int32;
      ``seqused_q/k`` int32 ``(batch,)`` the lengths (with ``layout = "padded"`` the totals
      include each slot's padding and ``cu_seqlens_*`` are the slot offsets).
    * v, the output and dout have ``head_dim_v`` (``Case.dv``) as their last dimension.
    * kvcache: ``q`` (batch, seqlen_q, hq, d); ``k``, ``v`` the logical cache
      (batch, seqlen_k, hkv, d) with ``cache_seqlens`` int32; when paged, ``k_pages``/``v_pages``
      (num_blocks, block, hkv, d) and ``block_table`` (batch, blocks_per_seq) int32 hold the same
      values in a shuffled page order. Cache slots past a sequence's length hold decoy values.

    ``dout`` is the output gradient (shaped like ``q``); ``alibi_slopes`` is float32 ``(hq,)``,
    or ``(batch, hq)`` for ``alibi_slopes = "random-per-batch"``.

    kv-cache calls (issue 13): the cache ``k``, ``v`` has ``Case.cache_rows`` rows (twice the
    batch with ``cache_batch_idx``, int32 ``(batch,)``: sequence ``b`` uses row
    ``cache_batch_idx[b]``); ``cache_seqlens`` are the lengths before the call; ``k_new``,
    ``v_new`` ``(batch, seqlen_new, hkv, d)`` are appended there; ``rotary_cos``/``rotary_sin``
    ``(seqlen_k, rotary_dim / 2)`` at the case dtype; ``cache_leftpad`` int32 ``(batch,)``.
    Decoys fill every cache slot a kernel must not read: past the length, before the leftpad,
    rows no sequence uses, spare pages. varlen with ``paged_block_size`` has ``k_pages``,
    ``v_pages`` and ``block_table`` ``(batch, ceil(seqlen_k / block))`` besides the packed k, v.
    The number of splits is ``case.num_splits``. ``harness.exact.kvcache`` says what a call does
    with them; :meth:`clone` copies them for a call that writes into the cache.
    """

    case: Case
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    alibi_slopes: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    cache_seqlens: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    k_pages: torch.Tensor | None = None
    v_pages: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    k_new: torch.Tensor | None = None
    v_new: torch.Tensor | None = None
    rotary_cos: torch.Tensor | None = None
    rotary_sin: torch.Tensor | None = None
    cache_batch_idx: torch.Tensor | None = None
    cache_leftpad: torch.Tensor | None = None

    def clone(self) -> Inputs:
        """A deep copy with identical geometry: every tensor's storage is copied once, so
        strides, gaps, packing and views into one buffer (``packed``, strided layouts) stay as
        they are. kv-cache calls with appends write into the cache: run each on a clone."""
        copies: dict[tuple, torch.Tensor] = {}
        out = Inputs(**self.__dict__)
        for name, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                out.__dict__[name] = _clone_view(value, copies)
        return out
    #: fp8 cases (``harness.exact.fp8``): float32 descales, ``(batch, heads_kv)`` as FA3 takes them.
    q_descale: torch.Tensor | None = None
    k_descale: torch.Tensor | None = None
    v_descale: torch.Tensor | None = None
    #: ``Case.learnable_sink``: float32 ``(heads_q,)`` sink logits (``harness.exact.scores``).
    learnable_sink: torch.Tensor | None = None
    #: varlen: int32 ``(batch,)`` query and key lengths (FA3/FA4's and vLLM's ``seqused_*``).
    seqused_q: torch.Tensor | None = None
    seqused_k: torch.Tensor | None = None
    #: What a kernel must not read (``harness.exact.padding``): region -> ``[(tensor name,
    #: bool mask over its token dimensions)]``; NaN there unless a backend's contract wants it
    #: finite.
    padding: dict | None = None

    @property
    def device(self) -> torch.device:
        return self.q.device

    def sequences(self) -> Iterator[Piece]:
        """The batch as uniform pieces (the whole batch at once when lengths are uniform)."""
        case = self.case
        if case.entry == "varlen":
            assert self.cu_seqlens_q is not None and self.cu_seqlens_k is not None
            assert case.seqlens_q is not None and case.seqlens_k is not None
            cq = self.cu_seqlens_q.tolist()
            ck = self.cu_seqlens_k.tolist()
            for b in range(case.batch):  # a padded slot's tail is not the sequence's
                yield Piece(self, slice(cq[b], cq[b] + case.seqlens_q[b]),
                            slice(ck[b], ck[b] + case.seqlens_k[b]), packed=True)
        elif case.per_sequence_keys:
            # Keys as the reference sees them after resolve_cache: row b, positions
            # [0, cache_seqlens + seqlen_new - cache_leftpad).
            for b, length in enumerate(case.key_lengths()):
                yield Piece(self, slice(b, b + 1), slice(0, length), packed=False)
        else:
            yield Piece(self, slice(None), slice(None), packed=False)

    def with_grad(self) -> Inputs:
        """A shallow copy whose q, k, v are fresh tensors (same strides and gaps) requiring grad.

        With a packed layout the leaf is a fresh copy of the packed buffer (``packed``) and the
        tensors packed in it are views of that copy, as ``flash_attn_qkvpacked_func`` sees them.
        """
        copy = Inputs(**self.__dict__)
        if self.packed is not None:
            leaf = self.packed.detach().clone().requires_grad_(True)
            copy.__dict__["packed"] = leaf
        for name in ("q", "k", "v"):
            t = getattr(self, name)
            if self.packed is not None and _same_storage(t, self.packed):
                offset = t.storage_offset() - self.packed.storage_offset()
                copy.__dict__[name] = leaf.as_strided(t.shape, t.stride(), offset)
            else:
                copy.__dict__[name] = _fresh_view(t)
        return copy


@dataclass
class Piece:
    """One uniform part of a batch: a varlen sequence, one kv-cache row, or the whole batch.

    ``rows`` selects the piece's queries (packed tokens for varlen, batch rows otherwise) and
    ``keys`` its keys (packed tokens for varlen, cache positions of that row for kvcache).
    """

    inputs: Inputs
    rows: slice
    keys: slice
    packed: bool

    def q_like(self, full: torch.Tensor) -> torch.Tensor:
        """This piece of a q-shaped tensor, as ``(B, n, h, d)``."""
        return full[self.rows][None] if self.packed else full[self.rows]

    def kv_like(self, full: torch.Tensor) -> torch.Tensor:
        """This piece of a k-shaped tensor, as ``(B, s, h, d)``."""
        if self.packed:
            return full[self.keys][None]
        return full[self.rows, self.keys]

    def lse_like(self, full: torch.Tensor) -> torch.Tensor:
        """This piece of an lse tensor, as ``(B, h, n)``."""
        return full[:, self.rows][None] if self.packed else full[self.rows]

    def put_q(self, full: torch.Tensor, value: torch.Tensor) -> None:
        full[self.rows] = value[0] if self.packed else value

    @property
    def n_rows(self) -> int:
        """Queries per sequence of this piece."""
        if self.packed:
            return self.rows.stop - self.rows.start
        return self.inputs.q.shape[1]

    def put_q_rows(self, full: torch.Tensor, rows: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``value`` ``(B, len(rows), h, d)`` at query positions ``rows`` of the piece."""
        if self.packed:
            full[self.rows.start + rows] = value[0]
        else:
            full[self.rows][:, rows] = value

    def put_lse_rows(self, full: torch.Tensor, rows: torch.Tensor, value: torch.Tensor) -> None:
        if self.packed:
            full[:, self.rows.start + rows] = value[0]
        else:
            full[self.rows][:, :, rows] = value

    def mark_rows(self, mask: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Set ``mask`` (the row dims of q: ``(batch, seqlen_q)`` or ``(total_q,)``) at rows."""
        if rows is None:
            mask[self.rows] = True
        elif self.packed:
            mask[self.rows.start + rows] = True
        else:
            mask[self.rows][:, rows] = True

    def put_kv(self, full: torch.Tensor, value: torch.Tensor) -> None:
        if self.packed:
            full[self.keys] = value[0]
        else:
            full[self.rows, self.keys] = value

    def put_lse(self, full: torch.Tensor, value: torch.Tensor) -> None:
        if self.packed:
            full[:, self.rows] = value[0]
        else:
            full[self.rows] = value


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _clone_view(t: torch.Tensor, copies: dict[tuple, torch.Tensor]) -> torch.Tensor:
    """``t`` re-made over a copy of its storage (one copy per storage, shared by its views)."""
    storage = t.untyped_storage()
    key = (storage.data_ptr(), t.device, t.dtype)
    if key not in copies:
        n = storage.nbytes() // t.element_size()
        flat = torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, 0, (n,), (1,))
        copies[key] = flat.detach().clone()
    return copies[key].as_strided(t.shape, t.stride(), t.storage_offset())


def _fresh_view(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the same geometry, differentiable with respect to the copy: its
    buffer as large as ``t``'s, gaps included (a strided tensor whose size-1 dimensions make it
    "contiguous" to torch still has them)."""
    size = t.untyped_storage().nbytes() // t.element_size()
    if t.is_contiguous() and t.storage_offset() == 0 and size == t.numel():
        return t.detach().clone().requires_grad_(True)
    buf = torch.full((size,), math.nan, dtype=t.dtype, device=t.device)
    buf.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t.detach())
    buf.requires_grad_(True)
    return buf.as_strided(t.shape, t.stride(), t.storage_offset())


def make_inputs(case: Case, device: str | torch.device = "cpu", seed: int = 0) -> Inputs:
    """Draw the inputs of ``case`` on ``device`` from ``seed`` (fp8 cases, an fp8 KV cache
    included: :func:`harness.exact.fp8.make_fp8_inputs`, which builds on this)."""
    if case.dtype in FP8_DTYPES or case.kv_fp8:
        raise ValueError(f"{case.kv_dtype or case.dtype} inputs are drawn by "
                         "harness.exact.fp8.make_fp8_inputs")
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, case.case_id))
    dtype = TORCH_DTYPES[case.dtype]
    hq, hkv, d = case.heads_q, case.heads_kv, case.head_dim
    # kv-cache extras and random ALiBi slopes come from generators of their own, so adding them
    # leaves every other draw (and so every existing case's inputs) as it was.
    extra = torch.Generator(device="cpu").manual_seed(derive_seed(seed, case.case_id, "kvcache"))
    slopes = case_alibi_slopes(case, device, seed) if case.alibi else None
    if case.entry == "varlen":
        inputs = _varlen(case, gen, dtype, device, slopes)
        if case.paged_block_size:
            _page(inputs, gen)
    else:
        q_shape = (case.batch, case.seqlen_q, hq, d)
        kv_rows = case.cache_rows if case.entry == "kvcache" else case.batch
        kv_shape = (kv_rows, case.seqlen_k, hkv, d)
        segments = ([(b, 0, n) for b, n in enumerate(case.seqlens_k)] if case.seqlens_k
                    else [(slice(None), 0, case.seqlen_k)])
        q, k, v, dout, packed = _draw_qkv(case, q_shape, kv_shape, gen, dtype, device,
                                          key_segments=segments,
                                          query_segments=[(slice(None), 0, case.seqlen_q)])
        inputs = Inputs(case=case, q=q, k=k, v=v, dout=dout, alibi_slopes=slopes,
                        packed=packed)
        if case.entry == "kvcache":
            lengths = case.cache_lengths()
            rows = _cache_rows(inputs, extra)
            _decoy_cache_tail(k, v, lengths, gen, rows)
            inputs.cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
            _cache_extras(inputs, rows, extra)
            if case.paged_block_size:
                _page(inputs, gen)
    if case.learnable_sink:
        inputs.learnable_sink = case_sinks(case, device, seed)
    poison(inputs)
    return inputs


def _varlen(case, gen, dtype, device, slopes) -> Inputs:
    assert case.seqlens_q is not None and case.seqlens_k is not None
    slots_q, slots_k = case.slots(case.seqlens_q), case.slots(case.seqlens_k)
    starts_q = cumulative(slots_q, "cpu").tolist()
    starts = cumulative(slots_k, "cpu").tolist()
    segments = [(None, start, n) for start, n in zip(starts, case.seqlens_k, strict=False)]
    q_segments = [(None, start, n) for start, n in zip(starts_q, case.seqlens_q, strict=False)]
    q, k, v, dout, packed = _draw_qkv(case, (sum(slots_q), case.heads_q, case.head_dim),
                                      (sum(slots_k), case.heads_kv, case.head_dim), gen, dtype,
                                      device, key_segments=segments, query_segments=q_segments)
    return Inputs(case=case, q=q, k=k, v=v, dout=dout, alibi_slopes=slopes, packed=packed,
                  cu_seqlens_q=cumulative(slots_q, device),
                  cu_seqlens_k=cumulative(slots_k, device),
                  seqused_q=torch.tensor(case.seqlens_q, dtype=torch.int32, device=device),
                  seqused_k=torch.tensor(case.seqlens_k, dtype=torch.int32, device=device))


#: Learnable sinks sit this far (natural-log units), up or down, around a typical row's
#: log-sum-exp (:func:`case_sinks`): the sink then holds between 12% and 88% of a row's
#: softmax mass, so removing it moves the output by far more than any tolerance.
SINK_SPREAD = 2.0


def case_sinks(case: Case, device, seed: int = 0) -> torch.Tensor:
    """The learnable sink logits of ``case``, float32 ``(heads_q,)``, from a generator of their
    own: uniform within :data:`SINK_SPREAD` of a typical row's log-sum-exp, ``log(visible
    keys per row) + (scale^2 d) / 2`` (the lse of N(0, 1) q and k), so each head's sink is
    comparable to its rows' normalisers and matters (gpt-oss's learned sinks play that role)."""
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, case.case_id, "sink"))
    scale = effective_scale(case)
    rows = max(1, case.total_q)
    typical = math.log(max(1.0, case.attended_pairs() / rows)) + 0.5 * scale * scale \
        * case.head_dim
    offsets = (torch.rand(case.heads_q, generator=gen) * 2 - 1) * SINK_SPREAD
    return (typical + offsets).to(torch.float32).to(device)


def cumulative(lengths, device) -> torch.Tensor:
    """``cu_seqlens``: int32 prefix sums starting at 0."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def _draw_qkv(case: Case, q_shape, kv_shape, gen, dtype, device, key_segments,
              query_segments=()):
    """q, k, v, dout and the packed buffer (or None) of a case, in its values and layout.

    Normal values in the contiguous and strided layouts are drawn exactly as before issue 12
    (so existing inputs are unchanged); everything else is staged in float32 on the CPU: q, k,
    v, dout drawn in that order, then the distribution's extra draws, then rounding. v and dout
    have ``head_dim_v`` as their last dimension (``kv_shape``/``q_shape`` are q's and k's).
    """
    layout = case.layout
    v_shape = (*kv_shape[:-1], case.dv)
    out_shape = (*q_shape[:-1], case.dv)
    plain = (case.values == "normal" and case.v_values == "normal"
             and case.dout_values == "normal" and case.dv == case.head_dim)
    if plain and layout in ("contiguous", "strided"):
        strided = layout == "strided"
        q = _draw(q_shape, gen, dtype, device, strided)
        k = _draw(kv_shape, gen, dtype, device, strided)
        v = _draw(kv_shape, gen, dtype, device, strided)
        dout = _draw(q_shape, gen, dtype, device, False)
        return q, k, v, dout, None
    q32, k32, v32, dout32 = (_randn(shape, gen) for shape in (q_shape, kv_shape, v_shape,
                                                                  out_shape))
    shape_values(case, q32, k32, gen, key_segments)
    tensor_values(case.v_values, v32, key_segments)
    tensor_values(case.dout_values, dout32, query_segments)
    packed = None
    if layout in ("packed-qkv", "packed-kv"):
        tensors = (q32, k32, v32) if layout == "packed-qkv" else (k32, v32)
        lead = tensors[0].shape[:-2]  # (b, s) or (t,)
        buf = torch.stack([t.to(dtype) for t in tensors], dim=len(lead)).to(device)
        views = [buf.select(len(lead), i) for i in range(len(tensors))]
        packed = buf
        if layout == "packed-qkv":
            q, k, v = views
        else:
            q = q32.to(dtype).to(device)
            k, v = views
        return q, k, v, dout32.to(dtype).to(device), packed
    mode = {"strided": "strided", "lastdim-strided": "lastdim"}.get(layout, "contiguous")
    q = _place(q32, dtype, device, mode)
    k = _place(k32, dtype, device, mode)
    if layout == "latent-kv":  # the shared latent: v is k's first head_dim_v dimensions
        v = k[..., : case.dv]
    else:
        v = _place(v32, dtype, device, "heads-major" if layout == "v-transposed" else mode)
    dout = _place(dout32, dtype, device, "strided" if layout == "dout-strided" else "contiguous")
    return q, k, v, dout, packed


def tensor_values(kind: str, x: torch.Tensor, segments) -> None:
    """Turn N(0, 1) float32 ``x`` (v or dout) into the distribution ``kind`` of
    :data:`harness.case.TENSOR_VALUES`, in place: ``offset`` adds
    :data:`~harness.case.TENSOR_VALUE_OFFSET`, ``large`` multiplies by
    :data:`~harness.case.TENSOR_VALUE_LARGE`, ``rows`` multiplies the first and the middle token
    of each sequence (``segments`` as in :func:`shape_values`) by it. No draws: the generator's
    stream is the same whatever the distribution."""
    if kind == "normal":
        return
    if kind == "offset":
        x.add_(TENSOR_VALUE_OFFSET)
        return
    if kind == "large":
        x.mul_(TENSOR_VALUE_LARGE)
        return
    for row, start, length in segments:
        if length <= 0:
            continue
        for pos in sorted({start, start + length // 2}):
            if row is None:
                x[pos].mul_(TENSOR_VALUE_LARGE)
            else:
                x[row, pos].mul_(TENSOR_VALUE_LARGE)


def effective_scale(case: Case) -> float:
    """The softmax scale the case uses (its ``scale`` or ``1/sqrt(head_dim)``)."""
    return case.scale if case.scale is not None else 1.0 / math.sqrt(case.head_dim)


def shape_values(case: Case, q: torch.Tensor, k: torch.Tensor, gen: torch.Generator,
                 key_segments) -> None:
    """Turn N(0, 1) float32 ``q`` and ``k`` into the case's value distribution, in place.

    Args:
        case: its ``values`` and ``value_scale`` choose the distribution (module docstring).
        q, k: ``(b, s, h, d)`` or ``(t, h, d)`` float32 CPU tensors.
        gen: the case's generator (drawn from after q, k, v and dout).
        key_segments: ``(batch rows or None, start, length)`` per sequence along k's token
            dimension (sink keys are placed at each sequence's first and middle key).
    """
    t = case.value_scale_used
    if case.values in ("scaled", "large"):
        q.mul_(t)
        k.mul_(t)
        return
    if case.values == "flat":
        q.mul_(t)
        return
    if case.values not in ("key-bias", "sink"):
        return
    hkv, d = case.heads_kv, case.head_dim
    group = case.heads_q // hkv
    # a^2 * d * scale = t: the offset moves every affected score by t.
    a = math.sqrt(t / (effective_scale(case) * d))
    signs = torch.randint(0, 2, (hkv, d), generator=gen).float() * 2 - 1
    offset = a * signs  # (hkv, d)
    q_offset = offset.repeat_interleave(group, dim=0)  # (hq, d)
    if case.values == "key-bias":
        row_sign = torch.randint(0, 2, (*q.shape[:-1], 1), generator=gen).float() * 2 - 1
        q.add_(row_sign * q_offset)
        k.add_(offset)
        return
    q.add_(q_offset)
    for row, start, length in key_segments:
        if length <= 0:
            continue
        for pos in sorted({start, start + length // 2}):
            if row is None:
                k[pos].add_(offset)
            else:
                k[row, pos].add_(offset)


def _randn(shape, gen) -> torch.Tensor:
    """Standard normal float32 values of ``shape`` on the CPU, drawn as :func:`_draw` does."""
    values = torch.empty(shape, dtype=torch.float32)
    flat = values.view(shape[0], -1)
    for start in range(0, shape[0], _DRAW_ROWS):
        rows = flat[start : start + _DRAW_ROWS]
        rows.copy_(torch.randn(rows.shape, generator=gen, dtype=torch.float32))
    return values


def _place(values: torch.Tensor, dtype, device, mode: str) -> torch.Tensor:
    """``values`` rounded to ``dtype`` on ``device`` in a layout; gaps hold NaN.

    Modes: ``contiguous``; ``strided`` (as :func:`_draw`); ``lastdim`` (last-dimension stride
    2); ``heads-major`` (a ``(b, h, s + 1, d)`` or ``(h, t + 1, d)`` buffer seen as
    ``(b, s, h, d)``/``(t, h, d)``: token stride d, head stride (s + 1) * d).
    """
    rounded = values.to(dtype)
    if mode == "contiguous":
        return rounded.to(device)
    if mode == "strided":
        return _strided_copy(rounded, device)
    if mode == "lastdim":
        buf = torch.full((*values.shape, 2), math.nan, dtype=dtype)
        buf[..., 0] = rounded
        return buf.to(device)[..., 0]
    if mode == "heads-major":
        if values.dim() == 4:
            b, s, h, d = values.shape
            buf = torch.full((b, h, s + 1, d), math.nan, dtype=dtype)
            buf[:, :, :s] = rounded.permute(0, 2, 1, 3)
            return buf.to(device).permute(0, 2, 1, 3)[:, :s]
        t, h, d = values.shape
        buf = torch.full((h, t + 1, d), math.nan, dtype=dtype)
        buf[:, :t] = rounded.permute(1, 0, 2)
        return buf.to(device).permute(1, 0, 2)[:t]
    raise ValueError(f"unknown placement {mode!r}")


def _draw(shape, gen, dtype, device, strided: bool) -> torch.Tensor:
    """Standard normal values of ``shape``; strided: a view into a NaN-filled larger buffer."""
    values = torch.empty(shape, dtype=dtype)
    flat = values.view(shape[0], -1)
    for start in range(0, shape[0], _DRAW_ROWS):
        rows = flat[start : start + _DRAW_ROWS]
        rows.copy_(torch.randn(rows.shape, generator=gen, dtype=torch.float32))
    if not strided:
        return values.to(device)
    return _strided_copy(values, device)


def _strided_copy(values: torch.Tensor, device) -> torch.Tensor:
    """``values`` as a view into a larger NaN-filled buffer on ``device``."""
    shape, dtype = values.shape, values.dtype
    # Heads-major buffer with extra heads and tokens: every stride but the last is unusual.
    if len(shape) == 4:
        b, s, h, d = shape
        buf = torch.full((b, h + 1, s + 3, d), math.nan, dtype=dtype)
        view = buf.permute(0, 2, 1, 3)[:, :s, :h, :]
    else:
        t, h, d = shape
        buf = torch.full((h + 1, t + 5, d), math.nan, dtype=dtype)
        view = buf.permute(1, 0, 2)[:t, :h, :]
    view.copy_(values)
    buf = buf.to(device)
    if len(shape) == 4:
        return buf.permute(0, 2, 1, 3)[:, :s, :h, :]
    return buf.permute(1, 0, 2)[:t, :h, :]


def _decoy_cache_tail(k, v, lengths, gen, rows=None) -> None:
    """Fill cache slots past each length with shifted values that would dominate if read
    (sequence ``b`` lives in cache row ``rows[b]``, default ``b``)."""
    for b, length in enumerate(lengths):
        row = b if rows is None else rows[b]
        _decoy(k, v, row, slice(length, None), gen)


def _decoy(k, v, row: int, positions: slice, gen) -> None:
    """Decoys (N(4, 1) keys, N(8, 1) values) in cache row ``row`` at ``positions``."""
    n = len(range(*positions.indices(k.shape[1])))
    if n > 0:
        shape = (n, *k.shape[2:])
        k[row, positions] = (torch.randn(shape, generator=gen) + 4.0).to(k.dtype).to(k.device)
        v_shape = (n, *v.shape[2:])
        v[row, positions] = (torch.randn(v_shape, generator=gen) + 8.0).to(v.dtype).to(v.device)


#: flash-attn's tests draw random ALiBi slopes as ``torch.rand(...) * 0.3``
#: (tests/test_flash_attn.py, test_flash_attn_output and test_flash_attn_kvcache).
RANDOM_SLOPE_SCALE = 0.3


def case_alibi_slopes(case: Case, device, seed: int = 0) -> torch.Tensor:
    """The case's ALiBi slopes, float32: ``(heads_q,)`` standard or random, or
    ``(batch, heads_q)`` for ``random-per-batch``; random ones as flash-attn's tests draw them
    (``torch.rand(...) * 0.3``) from a generator of their own."""
    hq = case.heads_q
    if case.alibi_slopes == "standard":
        return torch.tensor(alibi_slopes(hq), dtype=torch.float32, device=device)
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, case.case_id, "alibi"))
    shape = (hq,) if case.alibi_slopes == "random" else (case.batch, hq)
    return (torch.rand(shape, generator=gen) * RANDOM_SLOPE_SCALE).to(device)


def _cache_rows(inputs: Inputs, gen) -> list[int]:
    """The cache row of each sequence: ``b``, or with ``cache_batch_idx`` the first ``batch``
    entries of a random permutation of the cache's rows (as flash-attn's test draws them)."""
    case = inputs.case
    if not case.cache_batch_idx:
        return list(range(case.batch))
    rows = torch.randperm(case.cache_rows, generator=gen)[: case.batch]
    inputs.cache_batch_idx = rows.to(torch.int32).to(inputs.device)
    return rows.tolist()


def _cache_extras(inputs: Inputs, rows: list[int], gen) -> None:
    """Decoys in unused cache rows and before each leftpad; ``cache_leftpad``; the appended
    ``k_new``/``v_new``; the rotary tables (angles ``rand * 2 pi`` as flash-attn's test draws
    them, ``seqlen_ro`` = the cache capacity, :attr:`Case.window_seqlen_k`)."""
    case, k, v, device = inputs.case, inputs.k, inputs.v, inputs.device
    for row in sorted(set(range(case.cache_rows)) - set(rows)):
        _decoy(k, v, row, slice(0, None), gen)
    if case.cache_leftpad is not None:
        for b, pad in enumerate(case.cache_leftpad):
            _decoy(k, v, rows[b], slice(0, pad), gen)
        inputs.cache_leftpad = torch.tensor(case.cache_leftpad, dtype=torch.int32, device=device)
    dtype = k.dtype
    if case.seqlen_new:
        shape = (case.batch, case.seqlen_new, case.heads_kv, case.head_dim)
        strided = case.layout == "strided"
        inputs.k_new = _draw(shape, gen, dtype, device, strided)
        inputs.v_new = _draw((*shape[:-1], case.dv), gen, dtype, device, strided)
    if case.rotary_dim:
        angle = torch.rand(case.window_seqlen_k, case.rotary_dim // 2, generator=gen) * 2 * math.pi
        inputs.rotary_cos = torch.cos(angle).to(dtype).to(device)
        inputs.rotary_sin = torch.sin(angle).to(dtype).to(device)


def _page(inputs: Inputs, gen) -> None:
    """Scatter the logical cache into shuffled pages; spare pages hold decoys.

    kvcache: one block-table row per cache row (``Case.cache_rows``), each ``seqlen_k``
    positions. varlen: one row per sequence, holding its ``seqlens_k[b]`` packed keys (the
    layout ``flash_attn_varlen_func(block_table=...)`` reads, with ``cu_seqlens_k`` giving the
    lengths). Each row has ``ceil(seqlen_k / block)`` pages.
    """
    case = inputs.case
    block = case.paged_block_size
    k, v = inputs.k, inputs.v
    if case.entry == "varlen":
        assert inputs.cu_seqlens_k is not None and case.seqlens_k is not None
        cu = inputs.cu_seqlens_k.tolist()
        ends = [cu[b] + case.seqlens_k[b] for b in range(case.batch)]  # not a padded slot's tail
        spans = [(k[cu[b]:ends[b]], v[cu[b]:ends[b]]) for b in range(case.batch)]
    else:
        spans = [(k[r], v[r]) for r in range(case.cache_rows)]
    per_seq = -(-case.seqlen_k // block)
    spare = 2
    num_blocks = len(spans) * per_seq + spare
    order = torch.randperm(num_blocks, generator=gen)
    table = order[: len(spans) * per_seq].view(len(spans), per_seq)
    pages_shape = (num_blocks, block, case.heads_kv, case.head_dim)
    k_pages = (torch.randn(pages_shape, generator=gen) + 4.0).to(k.dtype).to(k.device)
    v_pages = (torch.randn(pages_shape, generator=gen) + 8.0)[..., : case.dv]
    v_pages = v_pages.contiguous().to(v.dtype).to(v.device)
    for b, (row_k, row_v) in enumerate(spans):
        for i in range(per_seq):
            lo, hi = i * block, min((i + 1) * block, row_k.shape[0])
            if hi <= lo:
                continue
            page = int(table[b, i])
            k_pages[page, : hi - lo] = row_k[lo:hi]
            v_pages[page, : hi - lo] = row_v[lo:hi]
    if case.layout == "latent-kv":  # v's pages are k's, as its cache is k's
        v_pages = k_pages[..., : case.dv]
    inputs.k_pages, inputs.v_pages = k_pages, v_pages
    inputs.block_table = table.to(torch.int32).to(k.device)
