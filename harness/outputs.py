"""The import path backend plugins use for :class:`Outputs` (``from harness.outputs import
Outputs``), kept stable; the type lives in :mod:`harness.exact.outputs`."""

from harness.exact.outputs import Outputs

__all__ = ["Outputs"]
