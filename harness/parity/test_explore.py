"""Exploration: hypothesis draws cases the backend claims to support (within the profile's cost
budget), and a failure is shrunk to the minimal case, written to ``--attn-regressions`` and
reported with its replay command.

    pytest --pyargs harness.parity --attn-backend my_kernel.py:attention --attn-explore 200
"""

import pytest

pytestmark = pytest.mark.attn_parity


def test_explore(attn, attn_backend):
    attn.explore(attn_backend)
