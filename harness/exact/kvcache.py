"""What ``flash_attn_with_kvcache`` does to its inputs, as plain tensors: the parity target.

The kv-cache entry point appends, rotates and indexes before it attends. This module models
each step exactly as flash-attn 2.x does it, so the reference (:mod:`harness.exact.reference`) can
attend over ordinary tensors and a check can verify the in-place cache update:

* **Append** (``k=``, ``v=``): sequence ``b`` writes its ``seqlen_new`` new keys and values into
  cache row ``cache_batch_idx[b]`` (``b`` without it) at positions ``cache_seqlens[b] ..
  cache_seqlens[b] + seqlen_new - 1``; nothing else in the cache changes
  (flash_attn/flash_attn_interface.py, ``flash_attn_with_kvcache`` docstring; the test
  ``test_flash_attn_kvcache`` builds ``k_cache_ref[update_mask] = k_ro`` the same way).
* **Rotary** (``rotary_cos``/``rotary_sin`` of shape ``(seqlen_ro, rotary_dim / 2)``): the new
  keys are rotated at positions ``cache_seqlens + i`` and stored rotated. The queries are
  rotated at ``cache_seqlens + i`` when the kernel runs causal or local, else all at
  ``cache_seqlens`` (the docstring, and ``Is_causal || Is_local`` in the CUDA kernel after the
  window normalisation, :attr:`Case.mask_window`). ``cache_seqlens`` is the absolute cache
  position, leftpad included: the kernel's cos/sin offset adds ``params.leftpad_k[bidb]`` to the
  block's position (``row_offset_cossin`` in csrc/flash_attn/src/flash_fwd_kernel.h, the
  ``Append_KV`` prologue), and the test rotates with ``seqlen_offsets=cache_seqlens`` whether or
  not ``cache_leftpad`` is given. Interleaved pairs dimensions ``(2j, 2j + 1)``; GPT-NeoX style
  ``(j, j + rotary_dim / 2)``; dimensions past ``rotary_dim`` pass through
  (flash_attn/layers/rotary.py, ``apply_rotary_emb_torch``). The kernel rotates in float32 and
  rounds to the input dtype before it attends and before it stores; so does this module (the
  rotation itself in float64, then one rounding).
* **Leftpad**: sequence ``b`` attends cache positions ``cache_leftpad[b] .. cache_seqlens[b] +
  seqlen_new - 1``, and its masks and ALiBi distances count from ``cache_leftpad[b]`` (the
  test's ``key_leftpad``; ``block_info.h`` subtracts ``leftpad_k`` from the key length).

:func:`resolve_cache` turns a kv-cache case into the plain attention problem it poses (rotated
q, per-sequence keys starting at 0); :func:`cache_after` gives the expected cache tensors after
the call. Every function here is a pure function of :class:`~harness.exact.inputs.Inputs`.
"""

from __future__ import annotations

import math

import torch

from harness.case import Case
from harness.exact.inputs import Inputs

#: lse conventions: ``harness`` (natural log, the docstring's ALiBi bias, -inf for rows that
#: see no key) and ``flash-attn`` (what flash-attn 2's CUDA and CK kernels return: in their
#: causal mode ALiBi adds ``+slope * col`` (csrc/flash_attn/src/alibi.h), so the lse is larger
#: by ``slope * (row + seqlen_k - seqlen_q)``; rows that see no key get +inf).
LSE_CONVENTIONS = ("harness", "flash-attn")


def has_cache_ops(case: Case) -> bool:
    """Whether the kv-cache call does more than attend (append, rotary, leftpad, batch-idx)."""
    return case.entry == "kvcache" and bool(
        case.seqlen_new or case.rotary_dim or case.cache_leftpad is not None
        or case.cache_batch_idx)


def cache_rows_of(inputs: Inputs) -> list[int]:
    """The cache row each sequence reads and writes (``cache_batch_idx``, else ``b``)."""
    if inputs.cache_batch_idx is None:
        return list(range(inputs.case.batch))
    return [int(r) for r in inputs.cache_batch_idx.tolist()]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of ``x`` at per-token positions, rounded once to ``x.dtype``.

    Args:
        x: ``(B, S, H, D)``.
        cos, sin: ``(seqlen_ro, rotary_dim / 2)`` tables.
        positions: int64 ``(B, S)``, the table row of each token.
        interleaved: pairs ``(2j, 2j + 1)`` (GPT-J) instead of ``(j, j + rotary_dim / 2)``.

    Returns:
        ``x`` with its first ``rotary_dim`` dimensions rotated (computed in float64).
    """
    half = cos.shape[-1]
    ro = 2 * half
    c = cos.to(torch.float64)[positions][:, :, None, :]  # (B, S, 1, half)
    s = sin.to(torch.float64)[positions][:, :, None, :]
    xr = x[..., :ro].to(torch.float64)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., ro:]), dim=-1)


def _positions(start: torch.Tensor, n: int, step: bool) -> torch.Tensor:
    """``(B, n)`` int64 positions ``start[b] + i`` (``step``) or ``start[b]`` for every i."""
    base = start.to(torch.int64)[:, None]
    offsets = torch.arange(n, device=start.device)[None, :] if step else torch.zeros(
        1, n, dtype=torch.int64, device=start.device)
    return base + offsets


def rotated_q(inputs: Inputs) -> torch.Tensor:
    """q as the kernel attends it: rotated when the case has rotary, else q itself."""
    case = inputs.case
    if not case.rotary_dim:
        return inputs.q
    assert inputs.rotary_cos is not None and inputs.rotary_sin is not None
    assert inputs.cache_seqlens is not None
    pos = _positions(inputs.cache_seqlens, case.seqlen_q, step=case.has_mask)
    return apply_rotary(inputs.q, inputs.rotary_cos, inputs.rotary_sin, pos,
                        case.rotary_interleaved)


def rotated_k_new(inputs: Inputs) -> torch.Tensor | None:
    """The appended keys as the cache stores them (rotated at ``cache_seqlens + i``)."""
    case = inputs.case
    if inputs.k_new is None or not case.rotary_dim:
        return inputs.k_new
    assert inputs.rotary_cos is not None and inputs.rotary_sin is not None
    assert inputs.cache_seqlens is not None
    pos = _positions(inputs.cache_seqlens, case.seqlen_new, step=True)
    return apply_rotary(inputs.k_new, inputs.rotary_cos, inputs.rotary_sin, pos,
                        case.rotary_interleaved)


def logical_cache_after(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The logical cache ``(cache_rows, seqlen_k, hkv, d)`` after the call (copies)."""
    k, v = inputs.k.clone(), inputs.v.clone()
    k_new = rotated_k_new(inputs)
    if k_new is not None:
        assert inputs.v_new is not None and inputs.cache_seqlens is not None
        n = inputs.case.seqlen_new
        starts = inputs.cache_seqlens.tolist()
        for b, row in enumerate(cache_rows_of(inputs)):
            k[row, starts[b]:starts[b] + n] = k_new[b]
            v[row, starts[b]:starts[b] + n] = inputs.v_new[b]
    return k, v


def cache_after(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected contents of the cache tensors the adapter passes, after the call.

    The logical ``(k, v)`` for a contiguous cache, ``(k_pages, v_pages)`` for a paged one: the
    old cache with the new rows (keys rotated when the case has rotary) written at
    ``cache_seqlens`` of each sequence's row, nothing else changed. Without appends the cache
    is unchanged. Returns copies; the inputs are not modified.
    """
    case = inputs.case
    if not case.paged_block_size:
        return logical_cache_after(inputs)
    assert inputs.k_pages is not None and inputs.v_pages is not None
    assert inputs.block_table is not None
    k_pages, v_pages = inputs.k_pages.clone(), inputs.v_pages.clone()
    k_new = rotated_k_new(inputs)
    if k_new is None:
        return k_pages, v_pages
    assert inputs.v_new is not None and inputs.cache_seqlens is not None
    block = case.paged_block_size
    table = inputs.block_table.tolist()
    starts = inputs.cache_seqlens.tolist()
    for b, row in enumerate(cache_rows_of(inputs)):
        for i in range(case.seqlen_new):
            pos = starts[b] + i
            page = table[row][pos // block]
            k_pages[page, pos % block] = k_new[b, i]
            v_pages[page, pos % block] = inputs.v_new[b, i]
    return k_pages, v_pages


def resolved_case(case: Case) -> Case:
    """The plain kv-cache case (no append, rotary, leftpad or batch-idx) whose sequences
    attend what ``case``'s do: keys ``0 .. key_lengths()[b] - 1`` of a cache of the same
    capacity (so the window normalises against the same ``seqlen_k``)."""
    lengths = case.key_lengths() if case.per_sequence_keys else None
    return case.replace(seqlen_new=0, rotary_dim=0, rotary_interleaved=False,
                        cache_leftpad=None, cache_batch_idx=False, seqlens_k=lengths)


def resolve_cache(inputs: Inputs) -> Inputs:
    """The attention problem a kv-cache call poses, as plain kv-cache inputs.

    q rotated as the kernel rotates it; k and v ``(batch, seqlen_k, hkv, d)`` holding, for
    sequence ``b``, cache row ``cache_batch_idx[b]`` after the append from position
    ``cache_leftpad[b]`` on, moved to start at 0 (the rest zero and never read); the case's
    ``seqlens_k`` the attended key lengths. Inputs without cache operations come back as they
    are. Memory: two copies of the cache at its dtype.
    """
    case = inputs.case
    if not has_cache_ops(case):
        return inputs
    k_after, v_after = logical_cache_after(inputs)
    rows = cache_rows_of(inputs)
    if case.cache_leftpad is None:
        index = torch.tensor(rows, dtype=torch.int64, device=k_after.device)
        k_eff, v_eff = k_after.index_select(0, index), v_after.index_select(0, index)
    else:
        shape = (case.batch, *k_after.shape[1:])
        k_eff = k_after.new_zeros(shape)
        v_eff = v_after.new_zeros(shape)
        for b, (row, pad, n) in enumerate(zip(rows, case.leftpads(), case.key_lengths(),
                                              strict=True)):
            k_eff[b, :n] = k_after[row, pad:pad + n]
            v_eff[b, :n] = v_after[row, pad:pad + n]
    del k_after, v_after
    plain = resolved_case(case)
    return Inputs(case=plain, q=rotated_q(inputs), k=k_eff, v=v_eff, dout=inputs.dout,
                  alibi_slopes=inputs.alibi_slopes,
                  cache_seqlens=torch.tensor(plain.cache_lengths(), dtype=torch.int32,
                                             device=inputs.device))


# ------------------------------------------------------------------------- lse conventions


def lse_alibi_shift(inputs: Inputs) -> torch.Tensor | None:
    """What flash-attn's causal-mode ALiBi adds to each row's lse, in the harness's lse layout
    (float64): ``slope[b, h] * (row + seqlen_k_b - seqlen_q_b)`` with the lengths each sequence
    attends; None when the case is not in that mode (:attr:`Case.alibi_causal_mode`)."""
    case = inputs.case
    if not (case.alibi and case.alibi_causal_mode) or inputs.alibi_slopes is None:
        return None
    plain = resolve_cache(inputs) if has_cache_ops(case) else inputs
    slopes = inputs.alibi_slopes.to(torch.float64)
    dev = inputs.device
    if case.entry == "varlen":
        shift = torch.zeros(case.heads_q, case.total_q, dtype=torch.float64, device=dev)
    else:
        shift = torch.zeros(case.batch, case.heads_q, case.seqlen_q, dtype=torch.float64,
                            device=dev)
    for index, piece in enumerate(plain.sequences()):
        n = piece.n_rows
        sk = piece.kv_like(plain.k).shape[1]
        if slopes.dim() == 1:
            sl = slopes[None, :]
        else:
            sl = slopes[index:index + 1] if piece.packed else slopes[piece.rows]
        rows = torch.arange(n, dtype=torch.float64, device=dev)
        piece.put_lse(shift, sl[:, :, None] * (rows + sk - n)[None, None, :])
    return shift


def convert_lse(lse: torch.Tensor, inputs: Inputs, source: str, target: str) -> torch.Tensor:
    """``lse`` of ``inputs``'s case rewritten from one convention (:data:`LSE_CONVENTIONS`) to
    another: the causal-ALiBi shift added or removed, and the value of rows that see no key
    (-inf in the harness's, +inf in flash-attn's) swapped. Finite values only move by the
    shift; a new tensor is returned."""
    for name in (source, target):
        if name not in LSE_CONVENTIONS:
            raise ValueError(f"lse convention {name!r} is not one of {', '.join(LSE_CONVENTIONS)}")
    if source == target:
        return lse
    shift = lse_alibi_shift(inputs)
    out = lse.clone()
    finite = torch.isfinite(out)
    if shift is not None:
        sign = 1.0 if target == "flash-attn" else -1.0
        moved = out.to(torch.float64) + sign * shift
        out = torch.where(finite, moved.to(out.dtype), out)
    empty = torch.isinf(lse)
    fill = math.inf if target == "flash-attn" else -math.inf
    return out.masked_fill(empty, fill)
