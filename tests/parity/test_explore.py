"""The shipped exploration suite (harness/parity/test_explore.py), collected here so that
`pytest tests/parity --attn-backend ...` runs it from a checkout."""

from harness.parity.test_explore import pytestmark, test_explore  # noqa: F401
