"""The parity checks: the forward (``fwd``) and the gradients (``bwd``) against the exact
reference, by flash-attn's rule (:mod:`harness.exact.judge`), with what a failure looks like it
ignored (the features whose removal the kernel's output matches), and dropout judged exactly where
the kernel's mask is a function of the seed, statistically otherwise.

Every output of a judged call is entered in the context's ledger, so later calls (the bwd check's
forward, the determinism runs, the timed calls) are held to it (:mod:`harness.checks.ledger`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from harness.checks.contract import lse_layout
from harness.checks.ledger import FORWARD, Mode
from harness.checks.registry import check
from harness.exact import dropout, fp8, judge, reference
from harness.exact.outputs import Outputs
from harness.results.jury import save_rows

if TYPE_CHECKING:
    from harness.checks.context import CheckContext

#: Query rows per sequence kept for the jury (comparing backends with each other).
JURY_ROWS = 64


@check("fwd")
def check_fwd(ctx: CheckContext) -> judge.Verdict:
    if ctx.case.dropout_p:
        return _dropout(ctx, "fwd")
    with torch.no_grad():
        result, _ = ctx.call()
    rows = ctx.sampled_rows
    ref, base = ctx.sampled_reference if rows is not None else (ctx.reference, ctx.baseline)
    if fp8.is_fp8_case(ctx.case):
        return _fp8_fwd(ctx, result, ref, base)
    comparisons = forward_comparisons(ctx, result.out, result.lse)
    for c in comparisons:
        ctx.ledger.judge(c.name, getattr(result, c.name), FORWARD, passed=c.ok,
                         where="fwd check")
    allowed = comparisons[0].allowed
    effects = feature_effects(ctx) if rows is None else {}
    note = judge.inert_note(effects, allowed)
    notes = [note] if note else []
    read = ctx.padding_read(ref, allowed) if not all(c.ok for c in comparisons) else ""
    verdict = judge.parity_verdict("fwd", comparisons, ([read] if read else []) + notes)
    metrics = {**verdict.metrics, "feature_effect": effects,
               "inert_features": judge.inert_features(effects, allowed),
               "verdict_kind": "exact" if rows is None else "sampled-rows"}
    if verdict.status == "fail" and rows is None:  # only on failure: it costs a reference each
        ignored = ignored_features(ctx, result.out, allowed, effects)
        if ignored:
            metrics["ignored_features"] = ignored
            verdict = dataclasses.replace(verdict, reason="; ".join(
                [ignored_text(ignored), verdict.reason]))
    if ctx.yardsticks:
        metrics["yardstick"] = dict(ctx.yardsticks)
    reason = verdict.reason
    if getattr(ctx.case, "docstring_differs", False):
        metrics["docstring_differs"] = True
        metrics["kernel_window"] = list(ctx.case.kernel_window)
        note = (f"flash-attn's C++ layer normalises window {list(ctx.case.window)} to "
                f"{list(ctx.case.kernel_window)} (csrc/flash_attn/flash_api.cpp): judged by that "
                "meaning; the docstring's rule would mask differently")
        reason = "; ".join(x for x in (reason, note) if x)
    if rows is not None:
        judged = int(ref.rows.sum())
        metrics.update(rows_judged=judged, rows_total=int(ref.rows.numel()))
        prefix = (f"judged on {judged} of {ref.rows.numel()} query rows (the exact reference of "
                  f"all rows is over {ctx.exact_reference_gflop:g} GFLOP here; see "
                  "the jury for the kernels' agreement)")
        reason = "; ".join(x for x in (reason, prefix) if x)
    if ctx.jury_dir:
        chosen = rows or reference.sample_rows(ctx.inputs, JURY_ROWS, ctx.rng_seed("jury-rows"))
        save_rows(ctx.jury_dir, ctx.case, ctx.backend.name, ctx.inputs, chosen, result.out, ref,
                  allowed, metrics["verdict_kind"])
    return judge.Verdict("fwd", verdict.status, metrics, reason)


def forward_comparisons(ctx: CheckContext, out: torch.Tensor | None,
                         lse: torch.Tensor | None) -> list[judge.Comparison]:
    """``out`` and ``lse`` (each where given) judged as the fwd check judges them."""
    rows = ctx.sampled_rows
    ref, base = ctx.sampled_reference if rows is not None else (ctx.reference, ctx.baseline)
    # Where float32 score rounding leaves ill-conditioned rows undetermined (scores of 1e4-1e5
    # from cancelling products), the allowance it implies.
    slack = ctx.score_slack
    comparisons = []
    if out is not None:
        comparisons.append(judge.compare("out", out, base.out, ref.out, k=judge.K_OUT,
                                         atol=ctx.atol, valid=ref.row_mask(ref.out),
                                         slack=slack and slack.out))
    if lse is not None:
        comparisons.append(judge.compare("lse", lse_layout(lse, ref.lse), base.lse, ref.lse,
                                         k=judge.K_OUT, atol=ctx.atol,
                                         valid=torch.isfinite(ref.lse),
                                         slack=slack and slack.lse))
    return comparisons


def gradient_comparison(ctx: CheckContext, name: str, grad: torch.Tensor) -> judge.Comparison:
    """``grad`` (dq, dk or dv) judged as the bwd check judges it."""
    ref, base, slack = ctx.reference_grads, ctx.baseline_grads, ctx.score_slack_grads
    return judge.compare(name, grad, getattr(base, name), getattr(ref, name), k=judge.K_GRAD,
                         atol=ctx.atol, slack=slack and getattr(slack, name))


def _fp8_fwd(ctx: CheckContext, result: Outputs, ref: Outputs, base: Outputs) -> judge.Verdict:
    """FA3's rule for fp8 (:func:`harness.exact.fp8.fp8_verdict`): against a baseline that emulates
    an fp8 kernel (fp8 inputs, P rounded to fp8 before P V, fp32 accumulation), plus the mean rule,
    the lse, and the cosine similarity AITER's tests use."""
    lse = lse_layout(result.lse, ref.lse) if result.lse is not None else None
    verdict = fp8.fp8_verdict(ctx.case, Outputs(out=result.out, lse=lse), base, ref)
    for name in ("out", "lse"):
        ctx.ledger.judge(name, getattr(result, name), FORWARD,
                         passed=verdict.status == "pass", where="fwd check")
    allowed = verdict.metrics.get("out", {}).get("allowed", 0.0)
    effects = feature_effects(ctx) if ctx.sampled_rows is None else {}
    note = judge.inert_note(effects, allowed)
    read = ctx.padding_read(ref, allowed) if verdict.status == "fail" else ""
    reason = "; ".join(x for x in (verdict.reason, read, note) if x)
    metrics = {**verdict.metrics, "feature_effect": effects,
               "inert_features": judge.inert_features(effects, allowed),
               "verdict_kind": "exact-fp8" if ctx.sampled_rows is None else "sampled-rows-fp8"}
    return judge.Verdict("fwd", verdict.status, metrics, reason)


@check("bwd")
def check_bwd(ctx: CheckContext) -> judge.Verdict:
    """Gradients as training computes them: the kernel's default ``deterministic=False``."""
    if ctx.case.dropout_p:
        return _dropout(ctx, "bwd")
    result = ctx.call_backward(deterministic=False)
    comparisons = [gradient_comparison(ctx, name, getattr(result, name))
                   for name in ("dq", "dk", "dv")]
    verdict = judge.parity_verdict("bwd", comparisons)
    training = Mode(grad=True, deterministic=False)
    for c in comparisons:
        ctx.ledger.judge(c.name, getattr(result, c.name), training, passed=c.ok,
                         where="bwd check")
    # The forward of this call is a later call too: held to the fwd check's output.
    held = ctx.ledger.hold("the bwd check's forward", {"out": result.out, "lse": result.lse},
                           training)
    metrics = {**verdict.metrics, "deterministic": False}
    if ctx.yardsticks:
        metrics["yardstick"] = dict(ctx.yardsticks)
    if held:
        reason = "; ".join(x for x in (verdict.reason, *held) if x)
        return judge.Verdict("bwd", "fail", metrics, reason)
    return judge.Verdict("bwd", verdict.status, metrics, verdict.reason)


def max_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |a - ref|`` over the elements where ``ref`` is finite (NaN in ``a`` counts 0)."""
    finite = torch.isfinite(ref)
    return float(torch.where(finite, (a.double() - ref).abs(), 0).nan_to_num(0).max())


# ------------------------------------------------------------------------ feature effects


def feature_effects(ctx: CheckContext) -> dict[str, float]:
    """For each feature the case turns on, how much removing it changes the reference."""
    ref = ctx.reference.out
    return {name: float((other - ref).abs().max())
            for name, other in ctx.feature_variants.items()}


#: How a feature is named where a kernel is told about it (flash-attn's argument) and what
#: attention without it is, for :func:`ignored_text`.
FEATURE_WORDS = {"causal": ("causal", "the causal mask"), "window": ("window_size", "the window"),
                 "softcap": ("softcap", "the softcap"), "alibi": ("alibi_slopes", "ALiBi"),
                 "scale": ("softmax_scale", "the explicit scale (with 1/sqrt(head_dim))"),
                 "dropout": ("dropout_p", "dropout"),
                 "sink-tokens": ("sink_tokens", "the sink tokens (a plain window)"),
                 "sink": ("learnable_sink", "the learnable sink")}


def ignored_features(ctx: CheckContext, out: torch.Tensor, allowed: float,
                     effects: dict[str, float]) -> dict[str, float]:
    """The features a failing kernel output looks as if it ignored: ``{feature: max
    difference}`` for each feature whose removal changes the reference by more than ``allowed``
    while the kernel's ``out`` equals the reference without it within ``allowed`` (the parity
    rule's tolerance of this case)."""
    found = {}
    for name, other in ctx.feature_variants.items():
        if not effects.get(name, 0.0) > allowed:
            continue  # inert: equal to both, it tells nothing
        diff = max_error(out, other)
        if diff <= allowed:
            found[name] = diff
    return found


def ignored_text(ignored: dict[str, float]) -> str:
    """``window_size appears to be ignored: the output equals attention without the window,
    max difference 3e-04`` (one clause per feature)."""
    parts = []
    for name, diff in ignored.items():
        argument, without = FEATURE_WORDS.get(name, (name, name))
        parts.append(f"{argument} appears to be ignored: the output equals attention without "
                     f"{without}, max difference {diff:.2g}")
    return "; ".join(parts)


# -------------------------------------------------------------------------------- dropout


def _dropout(ctx: CheckContext, check_name: str) -> judge.Verdict:
    """Dropout judged exactly where the kernel's mask is a function of the seed and the case is
    small enough (:mod:`harness.exact.dropout`: D(P) recovered from calls with V = identity blocks,
    the backward judged with that D fixed); statistically otherwise, and the record says why."""
    exact = dropout.exact_dropout(
        check_name, ctx.inputs,
        call=lambda inputs, salt: ctx.call(rng=salt, inputs=inputs)[0],
        call_backward=lambda salt: ctx.call_backward(rng=salt, deterministic=False),
        recovery=ctx.dropout_recovery)  # the forward's, reused by the backward
    ctx.dropout_recovery = exact.recovery
    if exact.verdict is not None:
        v = exact.verdict
        verdict = judge.Verdict(v.check, v.status, {**v.metrics, "dropout_p": ctx.case.dropout_p},
                                v.reason)
    else:
        verdict = dropout.mark_statistical(_dropout_statistics(ctx, check_name), exact.why_not)
    if check_name == "fwd" and verdict.status == "fail":
        verdict = _dropout_ignored(ctx, verdict)
    return verdict


def _dropout_ignored(ctx: CheckContext, verdict: judge.Verdict) -> judge.Verdict:
    """A failing dropout forward whose output equals attention without dropout (within the
    parity rule's tolerance) says so: the kernel looks as if it ignored ``dropout_p``."""
    with torch.no_grad():
        result, _ = ctx.call(rng="ignored-dropout")
    ref, base = ctx.reference.out, ctx.baseline.out
    allowed = judge.K_OUT * max_error(base, ref) + ctx.atol
    diff = max_error(result.out, ref)
    if not diff <= allowed:
        return verdict
    ignored = {"dropout": diff}
    return judge.Verdict(verdict.check, verdict.status,
                         {**verdict.metrics, "ignored_features": ignored},
                         "; ".join([ignored_text(ignored), verdict.reason]))


def _dropout_statistics(ctx: CheckContext, check_name: str) -> judge.Verdict:
    n = ctx.profile.dropout_samples
    samples: dict[str, list[torch.Tensor]] = {}
    for i in range(n):
        if check_name == "fwd":
            with torch.no_grad():
                r, _ = ctx.call(rng=f"dropout-{i}")
            tensors = {"out": r.out}
        else:
            r = ctx.call_backward(rng=f"dropout-{i}", deterministic=False)
            tensors = r.grads()
        for name, t in tensors.items():
            samples.setdefault(name, []).append(t.detach().to("cpu", torch.float64))
    if check_name == "fwd":
        expected = {"out": ctx.reference.out.cpu()}
        variance = {"out": reference.dropout_variance(ctx.inputs).cpu()}
        baselines = {"out": ctx.baseline.out.cpu()}
        k = judge.K_OUT
    else:
        expected = {name: t.cpu() for name, t in ctx.reference_grads.grads().items()}
        variance = {name: None for name in expected}
        baselines = {name: t.cpu() for name, t in ctx.baseline_grads.grads().items()}
        k = judge.K_GRAD
    verdict = judge.dropout_verdict(check_name, samples, expected, variance, baselines, k=k,
                                    atol=ctx.atol)
    return judge.Verdict(verdict.check, verdict.status,
                         {**verdict.metrics, "dropout_p": ctx.case.dropout_p}, verdict.reason)
