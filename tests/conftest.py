"""Shared fixtures for the harness's self-tests (CPU, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]


@pytest.fixture
def repo() -> Path:
    return REPO
