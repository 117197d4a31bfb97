"""Bug zoo (test fixture, not a kernel): the pure-PyTorch flash-attn API of
tests/fixtures/flash_attn_ref.py (with issue 26's keywords) with one bug, mla_scale_dv: MLA: the
default softmax scale taken from v's head dim, 1/sqrt(head_dim_v).

Load it by path: ``--backend flash-attn@tests/zoo/problems/mla_scale_dv.py``;
tests/zoo/problems/ZOO.py names the checks that catch it and the problem class it belongs to.
"""

import importlib.util
import sys
from pathlib import Path

_REF = Path(__file__).resolve().parents[2] / "fixtures" / "flash_attn_ref.py"
_NAME = "attn_harness_fa2_ref"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, _REF)
    sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_NAME])
_buggy = sys.modules[_NAME].variant("mla_scale_dv")

BUG = _buggy.BUG
ATTN_HARNESS_CAPABILITIES = _buggy.ATTN_HARNESS_CAPABILITIES
flash_attn_func = _buggy.flash_attn_func
flash_attn_varlen_func = _buggy.flash_attn_varlen_func
flash_attn_with_kvcache = _buggy.flash_attn_with_kvcache
flash_attn_qkvpacked_func = _buggy.flash_attn_qkvpacked_func
flash_attn_kvpacked_func = _buggy.flash_attn_kvpacked_func
flash_attn_varlen_qkvpacked_func = _buggy.flash_attn_varlen_qkvpacked_func
flash_attn_varlen_kvpacked_func = _buggy.flash_attn_varlen_kvpacked_func
