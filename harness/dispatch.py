"""From a case, a backend and a machine to a plan: which checks run, and why the others do not.

Nothing is dropped silently: every requested check of every case ends as a record, either from
running it or as a ``skip`` carrying the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.backends.base import Backend
from harness.case import DTYPE_BYTES, Case
from harness.reference import BLOCK_ELEMS
from harness.target import Target

#: Fraction of a device's memory a case may plan to use.
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True)
class Plan:
    """What to do for one case on one backend.

    Attributes:
        run: checks to run.
        skips: check -> reason, for the checks that will not run.
        audit: running although the backend does not claim the case (``--audit``); the reasons
            it does not claim it are in ``unsupported``.
    """

    case: Case
    backend: str
    run: tuple[str, ...]
    skips: dict[str, str] = field(default_factory=dict)
    audit: bool = False
    unsupported: tuple[str, ...] = ()


def estimated_bytes(case: Case, checks: tuple[str, ...]) -> int:
    """Peak memory the harness needs for the case: inputs and outputs at the case's dtype, the
    float64 reference copies (with gradients when ``bwd`` runs) and one block of scores."""
    scale = 8 / DTYPE_BYTES[case.dtype]
    base = case.input_bytes()
    ref = int(base * scale)
    grads = 2 * (base + ref) if "bwd" in checks else 0
    blocks = 6 * BLOCK_ELEMS * 8
    return base * 2 + ref + grads + blocks


def plan(case: Case, backend: Backend, target: Target, checks: tuple[str, ...], *,
         audit: bool = False) -> Plan:
    """Decide which of ``checks`` run for ``case`` on ``backend`` here, and why not the rest."""
    name = backend.name
    wanted = [c for c in checks if case.checks is None or c in case.checks]
    skips = {c: f"the case asks only for {', '.join(case.checks)}" for c in checks
             if c not in wanted}

    def skip_all(reason: str) -> Plan:
        return Plan(case, name, (), {**{c: reason for c in wanted}, **skips})

    unavailable = backend.availability()
    if unavailable:
        return skip_all(f"{name} is unavailable: {unavailable}")
    call = backend.call_reasons(case, target)
    if call:
        return skip_all("; ".join(call))
    need = estimated_bytes(case, tuple(wanted))
    if target.memory_bytes and need > MEMORY_HEADROOM * target.memory_bytes:
        return skip_all(f"needs about {need / 2**30:.1f} GiB, more than "
                        f"{MEMORY_HEADROOM:.0%} of this device's {target.memory_bytes / 2**30:.1f} GiB")
    reasons = backend.unsupported_reasons(case, target)
    if reasons and not audit:
        return skip_all("; ".join(reasons))
    run = []
    for check in wanted:
        why = backend.capabilities.check_reasons(check, case, name)
        if why:
            skips[check] = "; ".join(why)
        else:
            run.append(check)
    return Plan(case, name, tuple(run), skips, audit=bool(reasons), unsupported=tuple(reasons))
