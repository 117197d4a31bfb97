"""Order statistics of repeated timings, and the one rule by which two of them differ.

Shared by the timing protocol (:mod:`harness.checks.timing`, which says when a CPU window's
halves read apart) and by :mod:`harness.results.compare` (which says when two runs do): plain
functions of numbers, no torch.
"""

from __future__ import annotations

import math


def quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values by linear interpolation (``torch.quantile``'s rule)."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def shifted(before: tuple[float, float, float], after: tuple[float, float, float],
            threshold: float) -> int:
    """+1 when ``after`` is slower than ``before`` beyond their spread, -1 when faster, else 0.

    Each is ``(q1, median, q3)`` in milliseconds. Beyond the spread = the medians differ by more
    than ``threshold`` (relative) and the interquartile ranges do not overlap: the rule by which
    ``attn-harness compare`` calls two runs a change, and a CPU window's halves unsteady.
    """
    (a1, am, a3), (b1, bm, b3) = before, after
    change = bm / am - 1
    if change > threshold and b1 > a3:
        return 1
    if -change > threshold and b3 < a1:
        return -1
    return 0
