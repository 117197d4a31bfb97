"""From a case, a backend and a machine to a plan: which checks run, and why the others do not.

Nothing is dropped silently: every requested check of every case ends as a record, either from
running it or as a ``skip`` carrying the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.backends.base import Backend
from harness.case import DTYPE_BYTES, Case
from harness.exact.fp8 import fp8_reasons  # imports torch: only for fp8 cases
from harness.exact.reference import BLOCK_ELEMS
from harness.target import Target
from harness.vocab import CHECKS

#: Fraction of a device's memory a case may plan to use.
MEMORY_HEADROOM = 0.8

#: Default work limit on a CPU, GFLOP per pass (flash-attn's count; a backward pass counts
#: ``CheckSpec.work`` times the forward). Measured on a 2-core x86 machine with torch 2.13: the
#: float64 reference runs prefill at about 2 GFLOP/s, but decode (one query row against a long
#: cache) at about 0.2 GFLOP/s, bound by memory, and SDPA's CPU kernels are as slow there; a
#: judged check computes the kernel, the reference, the baseline and one more reference per
#: feature. 2 GFLOP keeps every check of a case within seconds for prefill and about a minute
#: for decode. GPUs have no default limit; ``--max-gflop`` sets one anywhere (0 = none).
CPU_MAX_GFLOP = 2.0


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
    """Peak memory the harness needs for the case: inputs and outputs at the case's dtype (and
    the kernel's own copy), the reference's float64 queries and output (everything, with the
    gradients, when a check takes gradients) and a few blocks of scores. What each check needs
    comes from its registry entry (``CheckSpec.reference``, ``.baseline``, ``.gradients``)."""
    es = DTYPE_BYTES[case.dtype]
    base = case.input_bytes()
    q_elems = case.rows_q * case.heads_q * (case.head_dim + case.dv) // 2  # q and out, halved
    kv_elems = (base - 2 * q_elems * es) // DTYPE_BYTES[case.kv_storage_dtype]  # k and v
    specs = [CHECKS[c] for c in checks]
    judged = any(s.reference for s in specs)  # these compute the reference
    # The forward reference widens q and its output to float64; keys go one block at a time.
    ref = 8 * 2 * q_elems if judged else 0
    grads = 0
    if case.entry != "kvcache":  # the kv-cache entry has no backward
        # The backward reference widens everything and keeps dq, dk, dv; the baseline's
        # gradients come at the case's dtype.
        if any(s.gradients and s.reference for s in specs):
            grads += 8 * 2 * (q_elems + kv_elems)
        if any(s.gradients and s.baseline for s in specs):
            grads += 2 * base
    blocks = 6 * BLOCK_ELEMS * 8 if judged else 0
    return base * 2 + ref + grads + blocks


def usable_memory(target: Target) -> int:
    """Bytes a case may plan on: the device's memory on a GPU; on a CPU the memory available
    now (``MemAvailable``), since other processes share it."""
    if target.vendor != "cpu":
        return target.memory_bytes
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return target.memory_bytes


def work_flops(case: Case, check: str) -> int:
    """FLOPs of one pass of ``check``: the forward's times the check's ``CheckSpec.work`` (a
    check with gradients does forward + backward)."""
    return int(case.flops_fwd() * CHECKS[check].work)


def work_limit_gflop(target: Target, max_gflop: float | None) -> float:
    """The work limit in force: ``max_gflop`` when given (0 = none), else the CPU default on a
    CPU and none on a GPU."""
    if max_gflop is not None:
        return max_gflop
    return CPU_MAX_GFLOP if target.vendor == "cpu" else 0.0


def work_reasons(case: Case, target: Target, checks: tuple[str, ...],
                 max_gflop: float | None) -> dict[str, str]:
    """check -> why it is too much work for this machine, for the checks over the limit."""
    limit = work_limit_gflop(target, max_gflop)
    if not limit:
        return {}
    where = "on this CPU" if target.vendor == "cpu" else "here"
    out = {}
    for check in checks:
        gflop = work_flops(case, check) / 1e9
        if gflop > limit:
            what = "forward + backward" if CHECKS[check].gradients else "forward"
            amount = f"{gflop:,.0f}" if gflop >= 10 else f"{gflop:.2g}"
            out[check] = (f"needs about {amount} GFLOP per {what} pass, more than the "
                          f"{limit:g} GFLOP limit {where} (--max-gflop N raises it, 0 removes it)")
    return out


def plan(case: Case, backend: Backend, target: Target, checks: tuple[str, ...], *,
         audit: bool = False, max_gflop: float | None = None) -> Plan:
    """Decide which of ``checks`` run for ``case`` on ``backend`` here, and why not the rest.

    ``max_gflop`` bounds the work of one pass (see :func:`work_limit_gflop`); checks over it
    are skipped with the estimate in the reason, like cases too large for the memory.
    """
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
    reasons = backend.unsupported_reasons(case, target)
    if case.dtype.startswith("float8") or case.kv_dtype:  # the fp8 format the target takes
        reasons = reasons + fp8_reasons(case, target)
    if reasons and not audit:  # every reason the backend does not take it, before sizes
        return skip_all("; ".join(reasons))
    need = estimated_bytes(case, tuple(wanted))
    memory = usable_memory(target)
    if memory and need > MEMORY_HEADROOM * memory:
        where = (f"the {memory / 2**30:.1f} GiB available on this machine"
                 if target.vendor == "cpu" else f"this device's {memory / 2**30:.1f} GiB")
        return skip_all(f"needs about {need / 2**30:.1f} GiB, more than "
                        f"{MEMORY_HEADROOM:.0%} of {where}")
    too_much = work_reasons(case, target, tuple(wanted), max_gflop)
    if too_much and all(c in too_much for c in wanted):
        return Plan(case, name, (), {**too_much, **skips})
    run = []
    for check in wanted:
        why = backend.capabilities.check_reasons(check, case, name)
        if check in too_much:
            skips[check] = too_much[check]
        elif why:
            skips[check] = "; ".join(why)
        else:
            run.append(check)
    return Plan(case, name, tuple(run), skips, audit=bool(reasons), unsupported=tuple(reasons))
