"""A test fixture for the compare bench (``tests/bench/compare_noise.py``), not a kernel to use:
PyTorch's SDPA (math) behind flash-attn's signature, made slower on purpose when
``ATTN_BENCH_SLOWDOWN`` is set.

With ``ATTN_BENCH_SLOWDOWN=0.25`` every call, having computed its output, sleeps for a quarter of
the time that took: its wall time is 1.25 times what it would have been, whatever the machine's
load made that (extra work would not do: on a loaded machine a call's time is mostly waiting for
the cores, which more work of the same kind stretches by anything from 1.1 to 2 times).
"""

from __future__ import annotations

import math
import os
import time

import torch

SLOWDOWN = float(os.environ.get("ATTN_BENCH_SLOWDOWN", "0") or 0)


def _sdpa(q, k, v, scale, causal):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
        is_causal=causal).transpose(1, 2)


def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention without masks or extras (the bench's cases pose none); slower by SLOWDOWN."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    start = time.perf_counter()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = _sdpa(q, k, v, scale, causal)
    if SLOWDOWN > 0:
        time.sleep(SLOWDOWN * (time.perf_counter() - start))
    return out


attention.capabilities = {"dtypes": ["float32"], "features": ["scale"], "backward": False}
