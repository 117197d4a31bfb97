"""Zoo kernels that are wrong only in the input space of issue 12.

These are *test fixtures* imitating defects reported against real attention kernels, not kernels
anyone should use. Each has ``flash_attn_func``'s signature and is exactly the zoo's ``correct``
blockwise float32 kernel (``tests/zoo/kernels.py``) except under one condition:

* ``unscaled_fp16_scores``: forms ``q @ k^T`` in float16 *before* the softmax scale (a
  half-precision product), which overflows to inf, and then NaN, once ``|q . k|`` passes 65,504:
  scaled and large inputs (flash-attn #334/#443, FA3 #1052).
* ``running_max_from_zero``: starts the online softmax's running max at 0 instead of -inf, so a
  row whose scores all lie below about -88.7 (a very negative log-sum-exp: queries opposed to a
  shared key bias) underflows to 0/0 (PyTorch #196678, cudnn-frontend #1072).
* ``v_uses_k_strides``: reads v with k's strides (ROCm/pytorch #3230: only V transposed).
* ``dout_assumed_contiguous``: the backward reads ``dout`` as if it were contiguous
  (flash-attn #355).
* ``packed_grad_strides``: when q, k and v are views of one packed buffer, the backward writes
  dq, dk, dv into a packed gradient buffer with the unpacked row stride (ROCm/flash-attention
  #122).
* ``grid_limit``: programs (batch x heads) past 65,535 are never launched; their output stays
  zero (PyTorch #142228/#146733).
* ``keys_past_16k``: keys past 16,384 are never read (ROCm/vllm #22).

``ZOO_INPUT_SPACE`` maps each to the checks expected to catch it.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch


def _zoo():
    """tests/zoo/kernels.py, also when this file is loaded by path (``--backend FILE.py:FUNC``),
    where the ``tests`` package is not importable."""
    try:
        from tests.zoo import kernels
    except ModuleNotFoundError:
        name = "attn_harness_zoo_kernels"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                name, Path(__file__).with_name("kernels.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        kernels = sys.modules[name]
    return kernels


_kernels = _zoo()
BLOCK, _heads, correct = _kernels.BLOCK, _kernels._heads, _kernels.correct

#: CUDA's grid y/z limit: programs with a larger index are not launched by the buggy kernel.
GRID_LIMIT = 65535
#: Keys the buggy long-context kernel reads.
KEY_LIMIT = 16384


def _forward(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
             softcap=0.0, alibi_slopes=None, *, bug: str = ""):
    """``correct``'s blockwise float32 forward (online softmax over key blocks of 64, larger
    past 4,096 keys), with one input-space defect switched on by ``bug``; differentiable."""
    out_dtype = q.dtype
    if bug == "v_uses_k_strides":
        v = torch.as_strided(v, v.shape, k.stride(), v.storage_offset())
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qf = q.float().transpose(1, 2)
    kf = _heads(k.float(), hq, "").transpose(1, 2)
    vf = _heads(v.float(), hq, "").transpose(1, 2)
    left, right = _kernels._normalised_window(window_size, causal, sk)
    offset = sk - sq
    rows = torch.arange(sq, device=q.device)[:, None]
    start = 0.0 if bug == "running_max_from_zero" else -math.inf
    m = torch.full((b, hq, sq, 1), start, device=q.device)
    denom = torch.zeros((b, hq, sq, 1), device=q.device)
    acc = torch.zeros((b, hq, sq, d), device=q.device)
    keys = min(sk, KEY_LIMIT) if bug == "keys_past_16k" else sk
    # Blocks of 64 keys, or at most 64 blocks for long keys (the Python loop is the cost here).
    block = max(BLOCK, -(-keys // (64 * BLOCK)) * BLOCK)
    # split, not one slice per block: a slice's backward writes a zero tensor of the whole k
    # (and v), so the gradient of n blocks cost n passes over them; split's is one cat
    k_blocks, v_blocks = kf[:, :, :keys].split(block, dim=2), vf[:, :, :keys].split(block, dim=2)
    for blk, j0 in enumerate(range(0, keys, block)):
        j1 = min(keys, j0 + block)
        if bug == "unscaled_fp16_scores":
            # the unscaled product held in a float16 register: inf past 65,504 (its rounding
            # is left out, so the kernel is exact wherever it does not overflow)
            raw = qf @ k_blocks[blk].transpose(-1, -2)
            s = torch.where(raw.abs() > 65504.0, raw.sign() * math.inf, raw) * scale
        else:
            s = qf @ k_blocks[blk].transpose(-1, -2) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        rel = rows + offset - torch.arange(j0, j1, device=q.device)[None, :]
        if alibi_slopes is not None:
            s = s - alibi_slopes.float().reshape(-1, hq, 1, 1) * rel.abs()  # (hq,) or (b, hq)
        visible = torch.ones_like(rel, dtype=torch.bool)
        if left >= 0:
            visible &= rel <= left
        if right >= 0:
            visible &= -rel <= right
        s = s.masked_fill(~visible, -math.inf)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe)
        alpha = torch.exp(m - m_safe)
        denom = denom * alpha + p.sum(-1, keepdim=True)
        if dropout_p > 0:
            keep = torch.rand(p.shape, device=p.device) >= dropout_p
            p = p * keep / (1 - dropout_p)
        acc = acc * alpha + p @ v_blocks[blk]
        m = m_new
    if bug == "running_max_from_zero":  # 0/0 where every exp underflowed
        out = acc / denom
    else:
        out = torch.where(denom > 0, acc / denom.clamp_min(1e-30), 0.0)
    if bug == "grid_limit" and b * hq > GRID_LIMIT:
        program = (torch.arange(b, device=q.device)[:, None] * hq
                   + torch.arange(hq, device=q.device)[None, :])  # (b, hq)
        out = out * (program < GRID_LIMIT).view(b, hq, 1, 1)
    return out.transpose(1, 2).to(out_dtype)


def _signature(bug: str):
    def kernel(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
               softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        return _forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                        alibi_slopes, bug=bug)

    kernel.__name__ = bug
    return kernel


unscaled_fp16_scores = _signature("unscaled_fp16_scores")
running_max_from_zero = _signature("running_max_from_zero")
v_uses_k_strides = _signature("v_uses_k_strides")
grid_limit = _signature("grid_limit")
keys_past_16k = _signature("keys_past_16k")


def _contiguous_strides(shape) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


class _BackwardBug(torch.autograd.Function):
    """``correct``'s forward; its backward is autograd's through that forward, with the dout
    read (``dout``) or the gradients written (``packed``) the way a buggy kernel does."""

    @staticmethod
    def forward(ctx, q, k, v, kwargs, bug):
        ctx.kwargs, ctx.bug = kwargs, bug
        ctx.packed = (q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
                      == v.untyped_storage().data_ptr())
        ctx.save_for_backward(q, k, v)
        with torch.no_grad():
            return correct(q, k, v, **kwargs)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        if ctx.bug == "dout":  # the kernel indexes dout as a contiguous tensor
            dout = torch.as_strided(dout, dout.shape, _contiguous_strides(dout.shape),
                                    dout.storage_offset())
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = correct(qq, kk, vv, **ctx.kwargs)
            dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), dout)
        if ctx.bug == "packed" and ctx.packed:
            # dq, dk, dv land in one (b, s, 3, h, d) buffer, each written with the row stride of
            # an unpacked (b, s, h, d) tensor: the second token's dq overwrites the first's dk.
            dqkv = torch.zeros((*q.shape[:-2], 3, *q.shape[-2:]), dtype=q.dtype,
                               device=q.device)
            flat = dqkv.view(-1)
            n = dq.numel()
            for i, g in enumerate((dq, dk, dv)):
                flat[i * n:(i + 1) * n] = g.reshape(-1)
            dq, dk, dv = dqkv.unbind(-3)
        return dq, dk, dv, None, None


def _backward_signature(bug: str, name: str):
    def kernel(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
               softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        kwargs = dict(dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes)
        if dropout_p:  # the mask must be the forward's: keep the plain autograd path
            return correct(q, k, v, **kwargs)
        return _BackwardBug.apply(q, k, v, kwargs, bug)

    kernel.__name__ = name
    return kernel


dout_assumed_contiguous = _backward_signature("dout", "dout_assumed_contiguous")
packed_grad_strides = _backward_signature("packed", "packed_grad_strides")

#: Kernel -> the checks expected to catch it (and the input space it needs).
ZOO_INPUT_SPACE = {
    "unscaled_fp16_scores": ("fwd", "bwd"),  # values=scaled (factor >= 30) or large
    "running_max_from_zero": ("fwd", "bwd"),  # values=key-bias (opposed rows)
    "v_uses_k_strides": ("fwd", "bwd"),  # layout=v-transposed
    "dout_assumed_contiguous": ("bwd",),  # layout=dout-strided
    "packed_grad_strides": ("bwd",),  # layout=packed-qkv
    "grid_limit": ("fwd", "bwd"),  # batch x heads > 65,535
    "keys_past_16k": ("fwd", "bwd"),  # seqlen_k > 16,384
}
