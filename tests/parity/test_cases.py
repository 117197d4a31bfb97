"""The shipped parity suite over case files (harness/parity/test_cases.py), collected here so
that `pytest tests/parity --attn-backend ...` runs it from a checkout."""

from harness.parity.test_cases import pytestmark, test_case  # noqa: F401
