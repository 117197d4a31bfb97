"""Bug zoo (test fixture, not a kernel): the pure-PyTorch FA4 API of tests/fixtures/fa4_ref.py with
one bug, sink_every_split: under split-KV every split adds the learnable sink (FA4 adds it in
split 0 only), so it counts num_splits times.

Load it by path: ``--backend flash-attn4@tests/zoo/fa4/sink_every_split.py``;
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
_buggy = sys.modules[_NAME].variant("sink_every_split")

BUG = _buggy.BUG
flash_attn_func = _buggy.flash_attn_func
flash_attn_varlen_func = _buggy.flash_attn_varlen_func
_flash_attn_fwd = _buggy._flash_attn_fwd
