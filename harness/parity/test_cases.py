"""The parity suite over case files: every case of ``--attn-suite`` (default: smoke) on every
backend of ``--attn-backend`` (default: every backend available here).

    pytest --pyargs harness.parity --attn-backend flash-attn --attn-suite models
"""

import pytest

pytestmark = pytest.mark.attn_parity


def test_case(attn, attn_backend, attn_case):
    attn.check(attn_case, attn_backend)
