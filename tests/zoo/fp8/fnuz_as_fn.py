"""A BUG-ZOO TEST FIXTURE, not a kernel: tests/fixtures/fa3_fp8_ref.py with one bug.

Reads e4m3fnuz bytes as e4m3fn (gfx942 inputs fed to a kernel built for OCP fp8): every
value doubles, scores grow four times, the output twice; saturated bytes (240 = 0x7f) read as NaN.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "fixtures" / "fa3_fp8_ref.py"
_SPEC = importlib.util.spec_from_file_location("_fa3_fp8_ref_for_zoo", _PATH)
_REF = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_REF)

BUG = "fnuz_as_fn"
ATTN_HARNESS_CAPABILITIES = {**_REF.ATTN_HARNESS_CAPABILITIES,
                             "dtypes": ["float8_e4m3fnuz"]}


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None,
                    k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
                    softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                    return_attn_probs=False, learnable_sink=None):
    """FA3's fp8 forward signature (with FA4's learnable_sink), with the bug named in the
    module docstring."""
    out, lse = _REF._attention(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal,
                               window_size, softcap, bug=BUG, sinks=learnable_sink)
    return (out, lse) if return_attn_probs else out


def flash_attn_fp8_pertensor_func(q, k, v, q_descale, k_descale, v_descale, causal=False,
                                  window_size=(-1, -1, 0), softmax_scale=None, sink_ptr=None):
    """AITER's fp8 entry (the family that takes e4m3fnuz: ``aiter@`` this file), with the bug
    named in the module docstring."""
    return _REF.aiter_fp8(q, k, v, q_descale, k_descale, v_descale, causal, window_size,
                          softmax_scale, sink_ptr, bug=BUG)
