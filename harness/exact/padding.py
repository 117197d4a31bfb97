"""Poisoned padding (issue 26): every element a kernel must not read is NaN.

A kernel that reads padding and keeps it out of the result with ``where``/``-inf`` masking is
correct; one that masks by multiplication (``0 * NaN = NaN``) or reads past a valid length
lets the NaN into its output, and the judge sees non-finite elements where the reference is
finite. The regions (:data:`harness.vocab.PADDING_REGIONS`) are recorded in
``Inputs.padding`` as boolean masks over each tensor's token dimensions, so they can be filled
again: with large finite junk where a family's contract says the padding must be finite
(``Capabilities.finite_padding``; FA4's varlen loads a whole 128-key tile, so rows past
``seqused_k`` in it must be finite: Dao-AILab/flash-attention issue #2374), and on a failure,
one region at a time with other contents, to say which region the kernel's output depends on
(:func:`regions_read`).

Junk is finite and large where it would show: keys and queries N(0, 1) (so a kernel that lets
a junk key into its softmax gives it a share like any key's), values ``N(0, 1) +``
:data:`JUNK_VALUE` (so that share moves the output far beyond any tolerance).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from harness.vocab import PADDING_REGIONS

if TYPE_CHECKING:  # inputs.py calls poison(): no import back at run time
    from harness.exact.inputs import Inputs

#: The offset of junk values (finite padding): a junk row that enters the softmax moves the
#: output by its share times this.
JUNK_VALUE = 1000.0


def _mask(shape, device=None) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.bool, device=device)


def regions(inputs: Inputs) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """The padding of ``inputs``: region -> ``[(tensor name, bool mask over its token
    dimensions)]`` (only regions with at least one element)."""
    case = inputs.case
    out: dict[str, list[tuple[str, torch.Tensor]]] = {}

    def add(name: str, tensors: Iterable[str], mask: torch.Tensor) -> None:
        if bool(mask.any()):
            for attr in tensors:
                out.setdefault(name, []).append((attr, mask))

    valid: list[tuple[int, int]] = []  # per cache row (kvcache) or sequence (varlen): [lo, hi)
    if case.entry == "kvcache":
        rows = (list(range(case.batch)) if inputs.cache_batch_idx is None
                else [int(r) for r in inputs.cache_batch_idx.tolist()])
        shape = inputs.k.shape[:2]
        tail, left, unused = _mask(shape), _mask(shape), torch.ones(shape, dtype=torch.bool)
        valid = [(0, 0)] * shape[0]
        for row, n, pad in zip(rows, case.cache_lengths(), case.leftpads(), strict=True):
            unused[row] = False
            tail[row, n:] = True
            left[row, :pad] = True
            valid[row] = (pad, n)
        add("cache-tail", ("k", "v"), tail)
        add("leftpad", ("k", "v"), left)
        add("cache-rows", ("k", "v"), unused)
    elif case.entry == "varlen":
        assert case.seqlens_q is not None and case.seqlens_k is not None
        valid = [(0, n) for n in case.seqlens_k]
        if case.layout == "padded":
            for tensors, lengths, cu in ((("q",), case.seqlens_q, inputs.cu_seqlens_q),
                                         (("k", "v"), case.seqlens_k, inputs.cu_seqlens_k)):
                assert cu is not None
                starts = cu.tolist()
                gap = _mask(starts[-1])
                for b, n in enumerate(lengths):
                    gap[starts[b] + n:starts[b + 1]] = True
                add("varlen-gap", tensors, gap)
    if case.paged_block_size and inputs.k_pages is not None and inputs.block_table is not None:
        _page_regions(inputs, valid, add)
    return out


def _page_regions(inputs: Inputs, valid: list[tuple[int, int]], add) -> None:
    """The pool's regions: slots past a row's keys in its last used page, slots before a
    leftpad, and every other slot no row's keys live in."""
    block = inputs.case.paged_block_size
    shape = inputs.k_pages.shape[:2]
    used = _mask(shape)
    tail, left = _mask(shape), _mask(shape)
    table = inputs.block_table.tolist()
    for r, (lo, hi) in enumerate(valid):
        for i, page in enumerate(table[r]):
            start = i * block
            slots = torch.arange(block) + start
            used[page] |= (slots >= lo) & (slots < hi)
            left[page] |= slots < lo
            if start < hi <= start + block:  # the last, partly used page
                tail[page] |= slots >= hi
    tail &= ~used
    left &= ~used & ~tail
    unused = ~used & ~tail & ~left
    add("page-tail", ("k_pages", "v_pages"), tail)
    add("leftpad", ("k_pages", "v_pages"), left)
    add("pages-unused", ("k_pages", "v_pages"), unused)


def poison(inputs: Inputs) -> None:
    """Write NaN into every padding region of ``inputs`` (in place) and record the regions in
    ``inputs.padding``."""
    found = regions(inputs)
    inputs.padding = found
    for entries in found.values():
        for attr, mask in entries:
            t = getattr(inputs, attr)
            t[mask.to(t.device)] = math.nan


def _junk(t: torch.Tensor, attr: str, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` junk rows for tensor ``attr`` (float32, CPU; see the module docstring)."""
    rows = torch.randn((count, *t.shape[-2:]), generator=gen)
    if attr.startswith("v"):
        rows += JUNK_VALUE
    return rows


def _write(t: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> None:
    """``t[mask] = rows`` at ``t``'s dtype; fp8 tensors are written through their bytes."""
    mask = mask.to(t.device)
    if t.dtype.itemsize == 1 and t.is_floating_point():
        limit = torch.finfo(t.dtype).max
        values = rows.clamp(-limit, limit).to(t.dtype).to(t.device)
        t.view(torch.uint8)[mask] = values.view(torch.uint8)
    else:
        t[mask] = rows.to(t.dtype).to(t.device)


def fill(inputs: Inputs, names: Iterable[str], *, kind: str = "junk", salt: str = "",
         in_place: bool = False) -> Inputs:
    """``inputs`` with the padding regions ``names`` filled with finite junk (``kind="junk"``,
    drawn from a generator of the case and ``salt``) or NaN (``kind="nan"``); a clone unless
    ``in_place``. Regions the inputs do not have are ignored."""
    target = inputs if in_place else inputs.clone()
    found = inputs.padding or {}
    digest = hashlib.sha256(f"junk:{inputs.case.case_id}:{salt}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    for name in names:
        for attr, mask in found.get(name, ()):
            t = getattr(target, attr)
            if kind == "nan":
                rows = torch.full((int(mask.sum()), *t.shape[-2:]), math.nan)
            else:
                rows = _junk(t, attr, int(mask.sum()), gen)
            _write(t, mask, rows)
    return target


def describe(names: Iterable[str]) -> str:
    """``page-tail (slots past ...)`` for each region name."""
    return "; ".join(f"{n} ({PADDING_REGIONS.get(n, n)})" for n in names)


def regions_read(inputs: Inputs, call: Callable[[Inputs], torch.Tensor], *,
                 finite: frozenset[str] = frozenset(), tolerance: float = 0.0,
                 valid: torch.Tensor | None = None) -> list[str]:
    """The padding regions the kernel's output depends on. One call with every NaN region
    filled with finite junk gives a clean output; then, one region at a time, a call with that
    region NaN again (or, for a ``finite`` region, holding other junk): a region whose contents
    change which elements are finite, or any element by more than ``tolerance``, is read. Only
    rows marked ``valid`` (a mask broadcastable to the output) count. ``1 +`` one call per
    region: run on failures only."""
    found = [name for name in (inputs.padding or {}) if name in PADDING_REGIONS]
    if not found:
        return []
    clean = fill(inputs, [n for n in found if n not in finite], kind="junk", salt="clean")
    base = call(clean).detach().double().cpu()
    keep = (torch.ones_like(base, dtype=torch.bool) if valid is None
            else valid.cpu().expand_as(base))
    read = []
    for name in found:
        if name in finite:
            altered = fill(clean, [name], kind="junk", salt="diagnose")
        else:
            altered = fill(clean, [name], kind="nan")
        other = call(altered).detach().double().cpu()
        if other.shape != base.shape:
            continue
        a, b = base[keep], other[keep]
        pattern = torch.isfinite(a) != torch.isfinite(b)
        both = torch.isfinite(a) & torch.isfinite(b)
        moved = float((a[both] - b[both]).abs().max()) if bool(both.any()) else 0.0
        if bool(pattern.any()) or moved > tolerance:
            read.append(name)
    return read
