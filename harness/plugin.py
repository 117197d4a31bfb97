"""pytest plugin: parity suites as tests (registered through the ``pytest11`` entry point).

Importing this module must stay cheap: torch and the harness's heavy modules are imported inside
hooks and fixtures only.
"""

from __future__ import annotations


def pytest_addoption(parser) -> None:
    group = parser.getgroup("attn-harness", "attention kernel parity (attn-harness)")
    group.addoption("--attn-backend", action="append", default=None, metavar="NAME|FILE.py:FUNC",
                    help="backend the parity suites test, repeatable (default: the CPU backends "
                         "sdpa-math and sdpa-flash, or every available backend on a GPU)")
