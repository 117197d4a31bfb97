"""Dropout bug zoo: attention kernels with seeded dropout, right and wrong, for testing the
exact dropout judge (``harness/exact/dropout.py``).

These are *test fixtures*, not kernels anyone should use. Each has flash_attn_func's signature
(as ``tests/zoo/kernels.py``'s ``correct``) and computes plain float32 attention with
flash-attn's semantics (bottom-right masks, softcap, ALiBi, GQA). Their dropout mask comes from
a ``torch.Generator`` seeded off torch's global RNG (one ``torch.randint`` draw per call), so two
calls after the same ``torch.manual_seed`` drop the same entries, as flash-attn's Philox seed and
offset do; the backward (a ``torch.autograd.Function``) regenerates the mask from the saved seed,
as flash-attn's does. ``correct`` is right forward and backward; every other kernel has one bug:

* ``backward_new_mask``: the backward draws a fresh seed, so it uses another mask than the
  forward (PyTorch #197563: CK's backward read the seed before it was written);
* ``heads_share_mask``: one mask for all heads of a batch entry;
* ``group_shares_mask``: one mask per kv head, shared by its GQA group (rocm-libraries #6533:
  pack-GQA dropout offsets by kv head);
* ``batch_shares_mask``: one mask for all batch entries;
* ``unscaled``: kept entries are not rescaled by ``1 / (1 - p)``;
* ``keep_rate_off``: drops with probability ``p / 2`` (scaling still ``1 / (1 - p)``);
* ``fixed_seed``: the generator is seeded with a constant, so the mask ignores the seed;
* ``unseeded``: the generator is seeded from the operating system, so two seeded calls differ.

``ZOO`` maps each buggy kernel to the check that must catch it.
"""

from __future__ import annotations

import math
import random

import torch

_SYSTEM_RANDOM = random.SystemRandom()


def _normalised_window(window_size, causal: bool, sk: int) -> tuple[int, int]:
    """The window as flash-attn's C++ layer reads it (csrc/flash_attn/flash_api.cpp); the same
    rule as tests/zoo/kernels.py's, repeated so this file loads by path on its own."""
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


def _probabilities(q, k, scale, causal, window_size, softcap, alibi_slopes):
    """float32 softmax probabilities ``(b, hq, sq, sk)`` and ``tanh`` (softcap) or None."""
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
    qf = q.float().transpose(1, 2)
    kf = _heads(k.float(), hq).transpose(1, 2)
    s = qf @ kf.transpose(-1, -2) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = softcap * t
    rel = (torch.arange(sq, device=q.device)[:, None] + sk - sq
           - torch.arange(sk, device=q.device)[None, :])
    if alibi_slopes is not None:
        s = s - alibi_slopes.float().reshape(-1, hq, 1, 1) * rel.abs()  # (hq,) or (b, hq)
    left, right = _normalised_window(window_size, causal, sk)
    visible = torch.ones_like(rel, dtype=torch.bool)
    if left >= 0:
        visible &= rel <= left
    if right >= 0:
        visible &= -rel <= right
    s = s.masked_fill(~visible, -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    prob = torch.where(denom > 0, e / denom.clamp_min(1e-30), torch.zeros_like(e))
    return prob, t


def _heads(t: torch.Tensor, hq: int) -> torch.Tensor:
    """kv heads repeated for the query heads (head h reads kv head h // group)."""
    b, s, hkv, d = t.shape
    return t[:, :, :, None].expand(b, s, hkv, hq // hkv, d).reshape(b, s, hq, d)


def _draw_seed(bug: str) -> int:
    if bug == "fixed_seed":
        return 1234
    if bug == "unseeded":
        return _SYSTEM_RANDOM.getrandbits(62)
    return int(torch.randint(0, 2**62, (1,)).item())  # off the global RNG, as Philox seeds


def _mask(seed: int, shape, hkv: int, dropout_p: float, device, bug: str) -> torch.Tensor:
    """The keep mask ``(b, hq, sq, sk)`` generated from ``seed``."""
    b, hq, sq, sk = shape
    draw = {"heads_share_mask": (b, 1, sq, sk), "batch_shares_mask": (1, hq, sq, sk),
            "group_shares_mask": (b, hkv, 1, sq, sk)}.get(bug, shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    rate = dropout_p / 2 if bug == "keep_rate_off" else dropout_p
    keep = torch.rand(draw, generator=gen, device=device) >= rate
    if bug == "group_shares_mask":
        keep = keep.expand(b, hkv, hq // hkv, sq, sk).reshape(shape)
    return keep.expand(shape)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dropout_p, scale, causal, window_size, softcap, alibi_slopes,
                bug):
        hq, hkv = q.shape[2], k.shape[2]
        prob, t = _probabilities(q, k, scale, causal, window_size, softcap, alibi_slopes)
        seed = _draw_seed(bug) if dropout_p > 0 else 0
        dropped = prob
        if dropout_p > 0:
            keep = _mask(seed, prob.shape, hkv, dropout_p, q.device, bug)
            factor = 1.0 if bug == "unscaled" else 1.0 / (1.0 - dropout_p)
            dropped = prob * keep * factor
        vf = _heads(v.float(), hq).transpose(1, 2)
        out = (dropped @ vf).transpose(1, 2)
        ctx.save_for_backward(q, k, v, prob, t if t is not None else torch.empty(0))
        ctx.settings = (dropout_p, scale, seed, bug, t is not None)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prob, t = ctx.saved_tensors
        dropout_p, scale, seed, bug, capped = ctx.settings
        hq, hkv = q.shape[2], k.shape[2]
        factor = torch.ones_like(prob)
        if dropout_p > 0:
            if bug == "backward_new_mask":  # the seed is read before the forward wrote it
                seed = int(torch.randint(0, 2**62, (1,)).item())
            keep = _mask(seed, prob.shape, hkv, dropout_p, q.device, bug)
            scaling = 1.0 if bug == "unscaled" else 1.0 / (1.0 - dropout_p)
            factor = keep * scaling
        do = dout.float().transpose(1, 2)  # (b, hq, sq, d)
        qf = q.float().transpose(1, 2)
        kf = _heads(k.float(), hq).transpose(1, 2)
        vf = _heads(v.float(), hq).transpose(1, 2)
        dropped = prob * factor
        dv = dropped.transpose(-1, -2) @ do
        dp = (do @ vf.transpose(-1, -2)) * factor
        ds = prob * (dp - (dp * prob).sum(-1, keepdim=True))
        if capped:
            ds = ds * (1 - t * t)
        dq = ds @ kf * scale
        dk = ds.transpose(-1, -2) @ qf * scale
        b, sk, d = k.shape[0], k.shape[1], k.shape[3]

        def group_sum(x):
            return x.transpose(1, 2).reshape(b, sk, hkv, hq // hkv, d).sum(3)

        return (dq.transpose(1, 2).to(q.dtype), group_sum(dk).to(k.dtype),
                group_sum(dv).to(v.dtype), None, None, None, None, None, None, None)


def _signature(bug: str):
    def kernel(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
               softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        return _Attention.apply(q, k, v, dropout_p, scale, causal, tuple(window_size), softcap,
                                alibi_slopes, bug)

    kernel.__name__ = bug or "correct"
    return kernel


correct = _signature("")
backward_new_mask = _signature("backward_new_mask")
heads_share_mask = _signature("heads_share_mask")
group_shares_mask = _signature("group_shares_mask")
batch_shares_mask = _signature("batch_shares_mask")
unscaled = _signature("unscaled")
keep_rate_off = _signature("keep_rate_off")
fixed_seed = _signature("fixed_seed")
unseeded = _signature("unseeded")

#: Buggy kernel -> the check that must catch it ("recovery": two seeded calls differ, so the
#: exact judge is not applicable and the statistical fallback is used).
ZOO = {
    "backward_new_mask": "bwd",
    "heads_share_mask": "fwd",
    "group_shares_mask": "fwd",
    "batch_shares_mask": "fwd",
    "unscaled": "fwd",
    "keep_rate_off": "fwd",
    "fixed_seed": "fwd",
    "unseeded": "recovery",
}
