"""Bug zoo (test fixture, not a kernel): the pure-PyTorch FA4 API of tests/fixtures/fa4_ref.py with
one bug, paged_dv_stale_v: Dao-AILab #2367: paged KV with page_size != 128 and head_dim !=
head_dim_v: the last key tile reads V rows one page too early (stale shared memory of the
cp.async path).

Load it by path: ``--backend flash-attn4@tests/zoo/fa4/paged_dv_stale_v.py``;
tests/zoo/fa4/ZOO.py names the checks that catch it and what a case needs for it to show.
"""

import importlib.util
import sys
from pathlib import Path

_REF = Path(__file__).resolve().parents[2] / "fixtures" / "fa4_ref.py"
_NAME = "attn_harness_fa4_ref"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, _REF)
    sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_NAME])
_buggy = sys.modules[_NAME].variant("paged_dv_stale_v")

BUG = _buggy.BUG
flash_attn_func = _buggy.flash_attn_func
flash_attn_varlen_func = _buggy.flash_attn_varlen_func
_flash_attn_fwd = _buggy._flash_attn_fwd
