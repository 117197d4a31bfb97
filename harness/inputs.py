"""The import path backend plugins use for :class:`Inputs` (``from harness.inputs import
Inputs``), kept stable; the type lives in :mod:`harness.exact.inputs`."""

from harness.exact.inputs import Inputs

__all__ = ["Inputs"]
