"""A BUG-ZOO TEST FIXTURE, not a kernel: tests/fixtures/fa3_fp8_ref.py with one bug.

Keeps the P V accumulator in bf16 between key blocks (rounded after every block): its error
grows with the number of blocks, so long keys show it, and a v far from zero (v_values =
"offset") shows it sooner.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "fixtures" / "fa3_fp8_ref.py"
_SPEC = importlib.util.spec_from_file_location("_fa3_fp8_ref_for_zoo", _PATH)
_REF = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_REF)

BUG = "pv_bf16"
ATTN_HARNESS_CAPABILITIES = {**_REF.ATTN_HARNESS_CAPABILITIES,
                             "dtypes": ["float8_e4m3fn", "float8_e4m3fnuz"]}


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None,
                    k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
                    softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                    return_attn_probs=False, learnable_sink=None):
    """FA3's fp8 forward signature (with FA4's learnable_sink), with the bug named in the
    module docstring."""
    out, lse = _REF._attention(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal,
                               window_size, softcap, bug=BUG, sinks=learnable_sink)
    return (out, lse) if return_attn_probs else out
