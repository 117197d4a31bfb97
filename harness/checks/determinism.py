"""The determinism check: identical inputs give bitwise identical results, and every run is held
to the judged calls (:mod:`harness.checks.ledger`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from harness.checks.ledger import Mode
from harness.checks.registry import check
from harness.exact import judge

if TYPE_CHECKING:
    from harness.checks.context import CheckContext


@check("determinism")
def check_determinism(ctx: CheckContext) -> judge.Verdict:
    """Identical inputs (and seed, where the case has dropout), called with ``deterministic=True``:
    the forward must repeat bitwise; the backward too where the kernel promises it, over the
    profile's repeat count (flash-attn's race-condition test repeats 250 times). Every run is also
    held to the judged calls (:mod:`harness.checks.ledger`): a forward-only run bitwise to the fwd
    check's output, a run with a backward by the parity rule where it is not bitwise the judged
    output (the judged calls were made without autograd, or with ``deterministic=False``)."""
    caps = ctx.backend.capabilities
    backward = ctx.has_backward
    runs = max(2, ctx.profile.determinism_runs) if caps.deterministic_backward else 2
    mode = Mode(grad=backward, deterministic=True)
    first: dict[str, torch.Tensor] | None = None
    worst: judge.Verdict | None = None
    held: list[str] = []
    for run in range(runs):
        tensors = _determinism_run(ctx, backward)
        held += ctx.ledger.hold(f"determinism run {run + 1}", tensors, mode,
                                repeats_checked=first is not None, private=True)
        if held:
            break
        if first is None:
            first = tensors
            continue
        exempt = () if caps.deterministic_backward else ("dq", "dk", "dv")
        why = caps.notes.get("deterministic_backward",
                             f"{ctx.backend.name} does not promise a deterministic backward")
        verdict = judge.determinism_verdict(first, tensors, exempt=exempt, why=why)
        if worst is None or (verdict.status == "fail" and worst.status != "fail"):
            worst = verdict
        if verdict.status == "fail":
            break
    metrics = {**(worst.metrics if worst else {}), "backward": backward, "runs": runs}
    if held:
        reason = "; ".join(x for x in (*held, worst.reason if worst else "") if x)
        return judge.Verdict("determinism", "fail", metrics, reason)
    assert worst is not None
    return judge.Verdict("determinism", worst.status, metrics, worst.reason)


def _determinism_run(ctx: CheckContext, backward: bool) -> dict[str, torch.Tensor]:
    if backward:
        r = ctx.call_backward(rng="determinism", deterministic=True)
        tensors = {"out": r.out, **r.grads()}
    else:
        with torch.no_grad():
            r, _ = ctx.call(rng="determinism", deterministic=True)
        tensors = {"out": r.out}
    if r.lse is not None:
        tensors["lse"] = r.lse
    return {k: v.detach().clone() for k, v in tensors.items()}
