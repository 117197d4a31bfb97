"""A plan's checks, run in this process: one :class:`~harness.checks.context.CheckContext` for
the case and backend, every check the plan runs in registry order, skips first-class, and under
``--audit`` each verdict classified by how the kernel treated a case it does not claim."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from harness.backends.base import Backend
from harness.checks.context import CheckContext
from harness.checks.plan import Plan
from harness.exact import judge
from harness.options import Profile
from harness.target import Target
from harness.vocab import CHECK_NAMES, JUDGED

CHECK_ORDER = CHECK_NAMES


def run_plan(plan: Plan, backend: Backend, target: Target, *, seed: int, profile: Profile,
             device: torch.device | str | None = None,
             jury_dir: str = "") -> Iterator[judge.Verdict]:
    """Verdicts for every check of a plan, in registry order: skips first-class, runs as they
    end."""
    ctx = CheckContext(plan.case, backend, target, seed=seed, profile=profile, device=device,
                       jury_dir=jury_dir)
    for name in CHECK_ORDER:
        if name in plan.skips:
            yield judge.Verdict(name, "skip", {}, plan.skips[name])
        elif name in plan.run:
            verdict = ctx.run(name)
            if plan.audit:
                verdict = audit_verdict(verdict, plan)
            yield verdict


def audit_verdict(verdict: judge.Verdict, plan: Plan) -> judge.Verdict:
    """Classify how a kernel treated a case it does not claim to support."""
    claim = "; ".join(plan.unsupported)
    metrics = dict(verdict.metrics)
    if verdict.status in ("error", "skip") and not metrics.get("oom"):
        metrics["audit"] = "rejected"
        return judge.Verdict(verdict.check, "skip", metrics,
                             f"audit: rejected loudly (good): {verdict.reason} "
                             f"[unsupported: {claim}]")
    if verdict.status == "fail":
        metrics["audit"] = "silent"
        return judge.Verdict(verdict.check, "fail", metrics,
                             f"audit: SILENT — accepted a case it does not support ({claim}) and "
                             f"computed something else: {verdict.reason}")
    if verdict.status == "pass" and verdict.check in JUDGED:
        metrics["audit"] = "accepted"
        return judge.Verdict(verdict.check, "pass", metrics,
                             f"audit: accepted and computed correctly although it does not claim "
                             f"to support it ({claim})")
    return verdict
