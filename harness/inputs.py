"""Seeded input tensors for a case, identical on every machine.

Values are drawn on the CPU in float32 with a generator seeded from ``(seed, case_id)``, rounded
to the case's dtype and only then moved to the device, so an MI300X and an H100 judge the very same
numbers. ``strided`` cases get views into larger buffers whose gaps hold NaN: a kernel that
ignores strides reads the gaps and its output shows it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from harness.case import Case

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
    * varlen: ``q`` (total_q, hq, d); ``k``, ``v`` (total_k, hkv, d); ``cu_seqlens_q/k`` int32.
    * kvcache: ``q`` (batch, seqlen_q, hq, d); ``k``, ``v`` the logical cache
      (batch, seqlen_k, hkv, d) with ``cache_seqlens`` int32; when paged, ``k_pages``/``v_pages``
      (num_blocks, block, hkv, d) and ``block_table`` (batch, blocks_per_seq) int32 hold the same
      values in a shuffled page order. Cache slots past a sequence's length hold decoy values.

    ``dout`` is the output gradient (shaped like ``q``); ``alibi_slopes`` is float32 (hq,).
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

    @property
    def device(self) -> torch.device:
        return self.q.device

    def sequences(self) -> Iterator[Piece]:
        """The batch as uniform pieces (the whole batch at once when lengths are uniform)."""
        case = self.case
        if case.entry == "varlen":
            assert self.cu_seqlens_q is not None and self.cu_seqlens_k is not None
            cq = self.cu_seqlens_q.tolist()
            ck = self.cu_seqlens_k.tolist()
            for b in range(case.batch):
                yield Piece(self, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1]), packed=True)
        elif case.entry == "kvcache" and case.seqlens_k is not None:
            for b, length in enumerate(case.seqlens_k):
                yield Piece(self, slice(b, b + 1), slice(0, length), packed=False)
        else:
            yield Piece(self, slice(None), slice(None), packed=False)

    def with_grad(self) -> Inputs:
        """A shallow copy whose q, k, v are fresh tensors (same strides and gaps) requiring grad."""
        copy = Inputs(**self.__dict__)
        for name in ("q", "k", "v"):
            copy.__dict__[name] = _fresh_view(getattr(self, name))
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


def _fresh_view(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the same geometry, differentiable with respect to the copy."""
    if t.is_contiguous():
        return t.detach().clone().requires_grad_(True)
    size = t.untyped_storage().nbytes() // t.element_size()
    buf = torch.full((size,), math.nan, dtype=t.dtype, device=t.device)
    buf.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t.detach())
    buf.requires_grad_(True)
    return buf.as_strided(t.shape, t.stride(), t.storage_offset())


def make_inputs(case: Case, device: str | torch.device = "cpu", seed: int = 0) -> Inputs:
    """Draw the inputs of ``case`` on ``device`` from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, case.case_id))
    dtype = TORCH_DTYPES[case.dtype]
    strided = case.layout == "strided"
    hq, hkv, d = case.heads_q, case.heads_kv, case.head_dim
    slopes = None
    if case.alibi:
        slopes = torch.tensor(alibi_slopes(hq), dtype=torch.float32, device=device)
    if case.entry == "varlen":
        return _varlen(case, gen, dtype, device, strided, slopes)
    q_shape = (case.batch, case.seqlen_q, hq, d)
    kv_shape = (case.batch, case.seqlen_k, hkv, d)
    q = _draw(q_shape, gen, dtype, device, strided)
    k = _draw(kv_shape, gen, dtype, device, strided)
    v = _draw(kv_shape, gen, dtype, device, strided)
    dout = _draw(q_shape, gen, dtype, device, False)
    inputs = Inputs(case=case, q=q, k=k, v=v, dout=dout, alibi_slopes=slopes)
    if case.entry == "kvcache":
        lengths = case.seqlens_k or (case.seqlen_k,) * case.batch
        _decoy_cache_tail(k, v, lengths, gen)
        inputs.cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
        if case.paged_block_size:
            _page(inputs, gen)
    return inputs


def _varlen(case, gen, dtype, device, strided, slopes) -> Inputs:
    assert case.seqlens_q is not None and case.seqlens_k is not None
    tq, tk = sum(case.seqlens_q), sum(case.seqlens_k)
    q = _draw((tq, case.heads_q, case.head_dim), gen, dtype, device, strided)
    k = _draw((tk, case.heads_kv, case.head_dim), gen, dtype, device, strided)
    v = _draw((tk, case.heads_kv, case.head_dim), gen, dtype, device, strided)
    dout = _draw((tq, case.heads_q, case.head_dim), gen, dtype, device, False)
    return Inputs(case=case, q=q, k=k, v=v, dout=dout, alibi_slopes=slopes,
                  cu_seqlens_q=cumulative(case.seqlens_q, device),
                  cu_seqlens_k=cumulative(case.seqlens_k, device))


def cumulative(lengths, device) -> torch.Tensor:
    """``cu_seqlens``: int32 prefix sums starting at 0."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def _draw(shape, gen, dtype, device, strided: bool) -> torch.Tensor:
    """Standard normal values of ``shape``; strided: a view into a NaN-filled larger buffer."""
    values = torch.empty(shape, dtype=dtype)
    flat = values.view(shape[0], -1)
    for start in range(0, shape[0], _DRAW_ROWS):
        rows = flat[start : start + _DRAW_ROWS]
        rows.copy_(torch.randn(rows.shape, generator=gen, dtype=torch.float32))
    if not strided:
        return values.to(device)
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


def _decoy_cache_tail(k, v, lengths, gen) -> None:
    """Fill cache slots past each length with shifted values that would dominate if read."""
    for b, length in enumerate(lengths):
        tail = k.shape[1] - length
        if tail > 0:
            shape = (tail, *k.shape[2:])
            k[b, length:] = (torch.randn(shape, generator=gen) + 4.0).to(k.dtype).to(k.device)
            v[b, length:] = (torch.randn(shape, generator=gen) + 8.0).to(v.dtype).to(v.device)


def _page(inputs: Inputs, gen) -> None:
    """Scatter the logical cache into shuffled pages; spare pages hold decoys."""
    case = inputs.case
    block = case.paged_block_size
    per_seq = -(-case.seqlen_k // block)
    spare = 2
    num_blocks = case.batch * per_seq + spare
    order = torch.randperm(num_blocks, generator=gen)
    table = order[: case.batch * per_seq].view(case.batch, per_seq)
    pages_shape = (num_blocks, block, case.heads_kv, case.head_dim)
    k, v = inputs.k, inputs.v
    k_pages = (torch.randn(pages_shape, generator=gen) + 4.0).to(k.dtype).to(k.device)
    v_pages = (torch.randn(pages_shape, generator=gen) + 8.0).to(v.dtype).to(v.device)
    for b in range(case.batch):
        for i in range(per_seq):
            lo, hi = i * block, min((i + 1) * block, case.seqlen_k)
            page = int(table[b, i])
            k_pages[page, : hi - lo] = k[b, lo:hi]
            v_pages[page, : hi - lo] = v[b, lo:hi]
    inputs.k_pages, inputs.v_pages = k_pages, v_pages
    inputs.block_table = table.to(torch.int32).to(k.device)
