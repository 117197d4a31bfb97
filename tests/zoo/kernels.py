"""The bug zoo: attention kernels with the classic porting bugs, for testing the harness.

These are *test fixtures*, not kernels anyone should use. ``correct`` is a blockwise
(FlashAttention-style, online softmax over key blocks of 64; past 4,096 keys at most 64 wider
blocks, as split-key decode kernels do, since the Python loop is the cost) implementation in
float32 with flash-attn's signature and semantics; every other function is ``correct`` with one
bug that has been seen in real ports. ``ZOO`` maps each buggy kernel to the checks expected to
catch it.

Run one through the harness like any user kernel::

    attn-harness run --backend tests/zoo/kernels.py:topleft_causal
"""

from __future__ import annotations

import math
import os
import random
import time

import torch

BLOCK = 64
_SYSTEM_RANDOM = random.SystemRandom()


def _blockwise(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
               softcap=0.0, alibi_slopes=None, *, bug: str = ""):
    """Forward attention in float32 over key blocks; ``bug`` switches one defect on."""
    out_dtype = q.dtype
    if bug == "batch_stride":  # reads the storage as if every input were contiguous
        q, k, v = (torch.as_strided(t, t.shape, torch.empty(t.shape).stride(), t.storage_offset())
                   for t in (q, k, v))
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if bug == "wrong_scale":  # the scale of the head_dim the kernel was tuned for
        scale = 0.125
    acc_dtype = torch.float16 if bug == "fp16_accumulate" else torch.float32
    qf = q.float().transpose(1, 2)  # (b, hq, sq, d)
    kf = _heads(k.float(), hq, bug).transpose(1, 2)
    vf = _heads(v.float(), hq, bug).transpose(1, 2)
    left, right = _normalised_window(window_size, causal, sk)
    offset = 0 if bug == "topleft_causal" else sk - sq
    rows = torch.arange(sq, device=q.device)[:, None]
    m = torch.full((b, hq, sq, 1), -math.inf, device=q.device)
    denom = torch.zeros((b, hq, sq, 1), device=q.device, dtype=acc_dtype)
    acc = torch.zeros((b, hq, sq, d), device=q.device, dtype=acc_dtype)
    block = max(BLOCK, -(-sk // (64 * BLOCK)) * BLOCK)
    n_blocks = sk // block if bug == "drop_key_tail" and sk > block else -(-sk // block)
    order = list(range(n_blocks))
    if bug == "nondeterministic":  # like atomics: the merge order changes from call to call
        _SYSTEM_RANDOM.shuffle(order)
    # split, not one slice per block: a slice's backward writes a zero tensor of the whole k
    # (and v), so the gradient of n blocks cost n passes over them; split's is one cat
    k_blocks, v_blocks = kf.split(block, dim=2), vf.split(block, dim=2)
    for blk in order:
        j0, j1 = blk * block, min(sk, (blk + 1) * block)
        s = qf @ k_blocks[blk].transpose(-1, -2) * scale
        if softcap and bug != "softcap_ignored":
            s = softcap * torch.tanh(s / softcap)
        rel = rows + offset - torch.arange(j0, j1, device=q.device)[None, :]
        if alibi_slopes is not None and bug != "alibi_ignored":
            sign = 1.0 if bug == "alibi_missigned" else -1.0
            slopes = alibi_slopes.float()  # (hq,) or per batch entry (b, hq)
            slopes = slopes.view(1 if slopes.dim() == 1 else b, hq, 1, 1)
            s = s + sign * slopes * rel.abs()
        visible = torch.ones_like(rel, dtype=torch.bool)
        if left >= 0:
            visible &= (rel < left) if bug == "window_off_by_one" else (rel <= left)
        if right >= 0:
            visible &= -rel <= right
        s = s.masked_fill(~visible, -math.inf)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe)
        alpha = torch.exp(m - m_safe)
        denom = (denom * alpha + p.sum(-1, keepdim=True)).to(acc_dtype)
        if dropout_p > 0:
            keep = torch.rand(p.shape, device=p.device) >= dropout_p
            p = p * keep / (1 - dropout_p)
        acc = (acc * alpha + p @ v_blocks[blk]).to(acc_dtype)
        m = m_new
    if bug == "nan_fully_masked":
        out = acc.float() / denom.float()
    else:
        out = torch.where(denom > 0, acc.float() / denom.float().clamp_min(1e-30), 0.0)
    out = out.transpose(1, 2)
    if bug == "output_rounding":  # the epilogue stores through bfloat16
        out = out.to(torch.bfloat16).float()
    return out.to(out_dtype)


def _normalised_window(window_size, causal: bool, sk: int) -> tuple[int, int]:
    """The window as flash-attn's C++ layer reads it (csrc/flash_attn/flash_api.cpp): causal
    fixes the right side to 0; a side >= seqlen_k is unbounded; then an unbounded side whose
    partner is bounded becomes seqlen_k."""
    left, right = window_size
    if causal:
        right = 0
    left = -1 if left >= sk else left
    right = -1 if right >= sk else right
    if left < 0 <= right:
        left = sk
    elif right < 0 <= left:
        right = sk
    return left, right


def _heads(t: torch.Tensor, hq: int, bug: str) -> torch.Tensor:
    """kv heads repeated for the query heads: head h reads kv head h // group (or, with the
    gqa_mapping bug, h % heads_kv). expand + reshape, so the backward is a deterministic sum
    (fancy indexing would backprop through a parallel scatter-add, nondeterministic on CPUs)."""
    b, s, hkv, d = t.shape
    group = hq // hkv
    if bug == "gqa_mapping":
        return t[:, :, None].expand(b, s, group, hkv, d).reshape(b, s, hq, d)
    return t[:, :, :, None].expand(b, s, hkv, group, d).reshape(b, s, hq, d)


def _signature(bug: str):
    def kernel(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
               softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        return _blockwise(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                          alibi_slopes, bug=bug)

    kernel.__name__ = bug or "correct"
    return kernel


correct = _signature("")
topleft_causal = _signature("topleft_causal")
wrong_scale = _signature("wrong_scale")
gqa_mapping = _signature("gqa_mapping")
drop_key_tail = _signature("drop_key_tail")
window_off_by_one = _signature("window_off_by_one")
softcap_ignored = _signature("softcap_ignored")
alibi_ignored = _signature("alibi_ignored")
alibi_missigned = _signature("alibi_missigned")
fp16_accumulate = _signature("fp16_accumulate")
nan_fully_masked = _signature("nan_fully_masked")
batch_stride = _signature("batch_stride")
output_rounding = _signature("output_rounding")
nondeterministic = _signature("nondeterministic")


class _WrongBackward(torch.autograd.Function):
    """Correct forward; the backward forgets the rowsum(dO * O) term of dS = P * (dP - D)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal):
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = _blockwise(qq, kk, vv, softmax_scale=scale, causal=causal)
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.causal = scale, causal
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        b, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(d)
        qf, do = q.float().transpose(1, 2), dout.float().transpose(1, 2)
        kf = _heads(k.float(), hq, "").transpose(1, 2)
        vf = _heads(v.float(), hq, "").transpose(1, 2)
        s = qf @ kf.transpose(-1, -2) * scale
        if ctx.causal:
            rel = torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]
            s = s.masked_fill(rel < 0, -math.inf)
        p = torch.softmax(s, -1).nan_to_num(0.0)
        dv = p.transpose(-1, -2) @ do
        ds = p * (do @ vf.transpose(-1, -2))  # missing: - rowsum(dO * O)
        dq = ds @ kf * scale
        dk = ds.transpose(-1, -2) @ qf * scale
        g = hq // hkv
        dk = dk.view(b, hkv, g, sk, d).sum(2)
        dv = dv.view(b, hkv, g, sk, d).sum(2)
        return (dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype),
                dv.transpose(1, 2).to(v.dtype), None, None)


def backward_only(q, k, v, softmax_scale=None, causal=False):
    """Forward right, gradients wrong; takes only scale and causal (so it is asked little)."""
    return _WrongBackward.apply(q, k, v, softmax_scale, causal)


def aborts_on_head_dim_96(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                          window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                          deterministic=False, return_attn_probs=False):
    """Kills its process (like a GPU memory fault) on head_dim 96; correct otherwise."""
    if q.shape[-1] == 96:
        os.abort()
    return correct(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)


def hangs_on_head_dim_40(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                         window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                         deterministic=False, return_attn_probs=False):
    """Never returns on head_dim 40 (like a deadlocked kernel); correct otherwise."""
    if q.shape[-1] == 40:
        time.sleep(3600)
    return correct(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)


def declares_no_softcap(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                        deterministic=False, return_attn_probs=False):
    """Claims no softcap support, and in fact ignores softcap (what --audit must expose)."""
    return softcap_ignored(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes)


declares_no_softcap.capabilities = {
    "features": ["causal", "window", "alibi", "dropout", "gqa", "scale", "strided",
                 "seqlen_q>seqlen_k"],
}

#: Buggy kernel -> the checks that must catch it on the smoke suite.
ZOO = {
    "topleft_causal": ("fwd", "bwd"),
    "wrong_scale": ("fwd", "bwd"),
    "gqa_mapping": ("fwd", "bwd"),
    "drop_key_tail": ("fwd", "bwd"),
    "window_off_by_one": ("fwd", "bwd"),
    "softcap_ignored": ("fwd", "bwd"),
    "alibi_ignored": ("fwd", "bwd"),
    "alibi_missigned": ("fwd", "bwd"),
    "fp16_accumulate": ("fwd",),
    "nan_fully_masked": ("fwd",),
    "batch_stride": ("fwd",),
    "output_rounding": ("fwd",),
    "backward_only": ("bwd",),
    "nondeterministic": ("determinism",),
}
