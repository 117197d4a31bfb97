"""fp8 bug-zoo variants of tests/fixtures/fa3_fp8_ref.py (issue 14): one bug per module."""
