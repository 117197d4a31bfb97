"""How numbers read, the same in the console and in the report: FLOP rates scaled to their
magnitude (``472 MFLOP/s``, ``1.31 TFLOP/s``), never a bare ``0.000472`` TFLOP/s."""

from __future__ import annotations

import math

#: (factor from TFLOP/s, unit), largest first.
_RATE_UNITS = ((1e3, "PFLOP/s"), (1.0, "TFLOP/s"), (1e-3, "GFLOP/s"), (1e-6, "MFLOP/s"),
               (1e-9, "kFLOP/s"), (1e-12, "FLOP/s"))


def rate(tflops: float | None, digits: int = 3) -> str:
    """A rate given in TFLOP/s, in the largest unit in which it is at least 1, ``digits``
    significant digits: ``rate(4.72e-4) == "472 MFLOP/s"``; ``–`` for None or non-finite."""
    if tflops is None or not math.isfinite(tflops):
        return "–"
    for factor, unit in _RATE_UNITS:
        if abs(tflops) >= factor:
            return f"{tflops / factor:.{digits}g} {unit}"
    return f"{tflops / 1e-12:.{digits}g} FLOP/s"
