"""Judging a kernel's numbers: flash-attn's parity rule, determinism, feature effects, dropout.

All functions are pure: tensors in, :class:`Comparison`/:class:`Verdict` out.

The parity rule (flash-attn's tests since 2.0)::

    max|kernel - reference| <= k * max|baseline - reference| + atol

with ``k = 2`` for outputs and ``k = 3`` for gradients, where *reference* is exact (float64) and
*baseline* is the same math in the kernel's dtype. The ratio ``err / baseline_err`` is recorded
for every check, pass or fail, because it is what moves when a port regresses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.exact.outputs import Outputs

K_OUT = 2.0
K_GRAD = 3.0
#: Absolute slack added to the rule: flash-attn's 1e-5, for every dtype. The baseline's error can
#: be symbolically zero where the kernel's cannot (one visible key: autograd's softmax backward
#: cancels exactly, a fused kernel's D = rowsum(dO * O) leaves float32 rounding of ~1e-6), so
#: float32 needs this slack too; real defects are orders of magnitude larger.
ATOL = {torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float32: 1e-5}


@dataclass(frozen=True)
class Comparison:
    """One tensor judged against the reference with the baseline-relative rule."""

    name: str
    err: float
    baseline_err: float
    allowed: float
    mismatched: int
    nonfinite: int
    total: int
    worst_index: tuple[int, ...] = ()
    kernel_value: float = 0.0
    reference_value: float = 0.0
    #: Half an ulp, at the kernel's dtype, of the largest judged |reference| (see :func:`compare`).
    rounding_floor: float = 0.0
    #: The largest per-element allowance for score rounding on ill-conditioned rows that an
    #: element needed (:func:`harness.exact.reference.score_rounding`); 0 when none did.
    score_slack: float = 0.0
    #: With a score-rounding allowance: the largest error beyond each element's allowance (what
    #: the ratio weighs, so a pass reads at most ``k``); None without one.
    err_beyond_slack: float | None = None

    @property
    def ok(self) -> bool:
        return self.mismatched == 0 and self.nonfinite == 0

    @property
    def yardstick(self) -> float:
        """The error the rule multiplies: the baseline's, or the rounding floor when larger."""
        return max(self.baseline_err, self.rounding_floor)

    @property
    def ratio(self) -> float | None:
        """``err / yardstick`` (the error beyond the score-rounding allowance, where there is
        one); None when the yardstick is zero."""
        err = self.err if self.err_beyond_slack is None else self.err_beyond_slack
        return err / self.yardstick if self.yardstick > 0 else None

    def metrics(self) -> dict[str, Any]:
        return {
            "err": _finite(self.err),
            "baseline_err": self.baseline_err,
            "rounding_floor": self.rounding_floor,
            "allowed": self.allowed,
            "ratio": _finite(self.ratio),
            "mismatched": self.mismatched,
            "nonfinite": self.nonfinite,
            "total": self.total,
            **({"score_slack": self.score_slack, "err_beyond_slack": self.err_beyond_slack}
               if self.score_slack else {}),
        }

    def message(self) -> str:
        """An ``assert_close``-style account: how many, how bad, where, what was allowed."""
        where = f"at {self.worst_index}" if self.worst_index else ""
        if self.nonfinite:
            head = (f"{self.name}: {self.nonfinite} of {self.total} elements are NaN/Inf where "
                    "the reference is finite")
            if self.mismatched > self.nonfinite:
                head += f", {self.mismatched - self.nonfinite} more exceed the tolerance"
            return head + (f" (first {where})" if where else "")
        ratio = f"{self.ratio:.3g}x" if self.ratio is not None else "n/a (exact baseline)"
        if self.rounding_floor > self.baseline_err:
            yardstick = (f"the rounding floor {self.rounding_floor:.3g} (baseline error "
                         f"{self.baseline_err:.3g})")
        else:
            yardstick = f"baseline error {self.baseline_err:.3g}"
        slack = (f" (+ up to {self.score_slack:.3g} per element where float32 score rounding "
                 "leaves the softmax undetermined)" if self.score_slack else "")
        return (f"{self.name}: {self.mismatched} of {self.total} elements exceed the tolerance; "
                f"worst |diff| {self.err:.3g} {where} (kernel {self.kernel_value:.6g}, reference "
                f"{self.reference_value:.6g}); allowed {self.allowed:.3g} = k x {yardstick} + "
                f"atol{slack}; ratio to baseline {ratio}")


def _finite(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return x


def compare(name: str, kernel: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor,
            *, k: float, atol: float, valid: torch.Tensor | None = None,
            slack: torch.Tensor | None = None) -> Comparison:
    """Judge ``kernel`` against ``reference`` with the baseline-relative rule.

    Args:
        name: what the tensor is (``out``, ``dq`` ...), for messages.
        kernel, baseline, reference: same shape; compared in float64.
        k: multiple of the baseline's error allowed.
        atol: absolute slack.
        valid: optional boolean mask of elements to judge (e.g. lse rows that see a key).
        slack: optional per-element allowance added to the rule's (same shape): how far score
            rounding alone may move a correct result on ill-conditioned rows
            (:func:`harness.exact.reference.score_rounding`).

    The baseline's error is floored at half an ulp, at the kernel's dtype, of the largest
    judged |reference|: the rounding any correct result at that dtype may need. flash-attn's
    tensors are large enough that the baseline's maximum error reaches it; on a tensor of a few
    elements the baseline can round luckily closer (a sweep of generated cases flagged a
    kernel 0.8 ulp off on 4 fp16 outputs whose baseline erred 0.38 ulp).
    """
    if kernel.shape != reference.shape:
        raise ValueError(f"{name}: kernel shape {tuple(kernel.shape)} != reference "
                         f"{tuple(reference.shape)}")
    ref = reference.detach().to(torch.float64)
    ker = kernel.detach().to(ref.device, torch.float64)
    base = baseline.detach().to(ref.device, torch.float64)
    valid = torch.isfinite(ref) if valid is None else valid & torch.isfinite(ref)
    total = int(valid.sum())
    if total == 0:
        return Comparison(name, 0.0, 0.0, atol, 0, 0, 0)
    diff = torch.where(valid, (ker - ref).abs(), torch.zeros_like(ref))
    base_diff = torch.where(valid, (base - ref).abs(), torch.zeros_like(ref))
    base_diff = torch.nan_to_num(base_diff, nan=0.0, posinf=0.0)
    baseline_err = float(base_diff.max())
    floor = rounding_floor(torch.where(valid, ref.abs(), torch.zeros_like(ref)).max(),
                           kernel.dtype)
    allowed = k * max(baseline_err, floor) + atol
    nonfinite_mask = valid & ~torch.isfinite(ker)
    nonfinite = int(nonfinite_mask.sum())
    extra = torch.zeros_like(ref) if slack is None else torch.where(
        valid, slack.detach().to(ref.device, torch.float64), torch.zeros_like(ref))
    excess = diff - allowed - extra
    bad = nonfinite_mask | (excess > 0)
    mismatched = int(bad.sum())
    # the slack an element needed: its diff beyond the rule's allowance, where it passed
    needed = float(torch.where((diff > allowed) & ~bad, diff - allowed, 0.0).max()) \
        if slack is not None else 0.0
    if nonfinite:
        flat = int(torch.nonzero(nonfinite_mask.flatten())[0])
        err = math.inf
    else:
        flat = int((excess if mismatched else diff).flatten().argmax())
        err = float(diff.flatten()[flat]) if mismatched else float(diff.max())
    index = tuple(int(i) for i in unravel(flat, ref.shape))
    beyond = None if slack is None or nonfinite else float((diff - extra).clamp_min(0).max())
    return Comparison(name, err, baseline_err, allowed, mismatched, nonfinite, total, index,
                      float(ker.flatten()[flat]), float(ref.flatten()[flat]), floor, needed,
                      beyond)


def rounding_floor(magnitude, dtype: torch.dtype) -> float:
    """Half an ulp of ``magnitude`` at ``dtype`` (0 for non-floating dtypes or 0)."""
    magnitude = float(magnitude)
    if not dtype.is_floating_point or not magnitude > 0 or not math.isfinite(magnitude):
        return 0.0
    tiny = torch.finfo(dtype).tiny
    exponent = math.floor(math.log2(max(magnitude, tiny)))
    return 0.5 * torch.finfo(dtype).eps * 2.0 ** exponent


def unravel(flat: int, shape) -> list[int]:
    """The multi-index of a flat (row-major) position in ``shape``."""
    out = []
    for dim in reversed(shape):
        out.append(flat % dim)
        flat //= dim
    return list(reversed(out))


@dataclass(frozen=True)
class Verdict:
    """The judgement of one check of one case on one backend.

    Attributes:
        check: fwd, bwd, determinism, throughput.
        status: pass, fail, skip, xfail, xpass, crash, timeout or error.
        metrics: numbers behind the status (JSON-ready).
        reason: one line for people; empty for a plain pass.
    """

    check: str
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def parity_verdict(check: str, comparisons: list[Comparison], notes: list[str] = ()) -> Verdict:
    """Fold tensor comparisons into one verdict; headline ``ratio``/``err`` are the worst."""
    metrics: dict[str, Any] = {c.name: c.metrics() for c in comparisons}
    ratios = [c.ratio for c in comparisons if c.ratio is not None]
    metrics["ratio"] = _finite(max(ratios)) if ratios else None
    metrics["err"] = _finite(max((c.err for c in comparisons), default=0.0))
    failed = [c for c in comparisons if not c.ok]
    reason = "; ".join([c.message() for c in failed] + list(notes))
    return Verdict(check, "fail" if failed else "pass", metrics, reason)


# --------------------------------------------------------------------------- determinism


def bitwise_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """``(elements that differ bitwise, max |a - b| over them)``; NaN payloads compare too."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return a.numel(), math.inf
    ia = bits(a)
    ib = bits(b)
    differ = ia != ib
    n = int(differ.sum())
    if n == 0:
        return 0, 0.0
    d = (a.detach().double() - b.detach().double()).abs()[differ]
    return n, float(torch.nan_to_num(d, nan=math.inf).max())


def bits(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` as same-width integers, for bitwise comparison (NaN included)."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(width)


def determinism_verdict(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], *,
                        exempt: tuple[str, ...] = (), why: str = "") -> Verdict:
    """Two runs on identical inputs (and RNG seed) must agree bit for bit.

    Tensors named in ``exempt`` (a backward the kernel does not promise to repeat, ``why``) are
    measured and reported the same way but do not fail the check.
    """
    metrics: dict[str, Any] = {}
    problems, tolerated = [], []
    for name, a in first.items():
        n, worst = bitwise_diff(a, second[name])
        metrics[name] = {"differing": n, "max_diff": _finite(worst), "total": a.numel(),
                         "required": name not in exempt}
        if n:
            text = (f"{name}: {n} of {a.numel()} elements differ between two identical runs "
                    f"(max |diff| {worst:.3g})")
            (tolerated if name in exempt else problems).append(text)
    notes = list(problems)
    if tolerated:
        notes.append(f"not required to repeat bitwise ({why}): " + "; ".join(tolerated))
    return Verdict("determinism", "fail" if problems else "pass", metrics, "; ".join(notes))


# ------------------------------------------------------------------------- feature effects


def inert_features(effects: dict[str, float], allowed: float) -> list[str]:
    """Features whose removal changes the reference by no more than the tolerance.

    A kernel that ignored such a feature would still pass, so the case does not test it.
    """
    return [name for name, effect in effects.items() if not effect > allowed]


def inert_note(effects: dict[str, float], allowed: float) -> str:
    names = inert_features(effects, allowed)
    if not names:
        return ""
    parts = [f"{n} (changes the output by {effects[n]:.3g})" for n in names]
    return (f"this case does not test {', '.join(parts)}: no more than the tolerance "
            f"{allowed:.3g}, so a kernel ignoring it would pass; choose stronger parameters")


# ---------------------------------------------------------------------- dropout (statistics)

#: Fewest independent units (output rows x heads; all elements of one row share its dropout mask)
#: for the bias and variance tests to have power without false alarms.
DROPOUT_MIN_UNITS = 32
#: Thresholds sit this many standard errors out: with thousands of cases per night, a false alarm
#: must be far rarer than one in a million.
DROPOUT_SIGMAS = 8.0
#: Largest |t| of the projection test (Student t with N-1 >= 40 degrees of freedom: p < 1e-6).
DROPOUT_T_MAX = 6.5
#: Narrowest half-width of the variance band: the theory leaves out the outputs' rounding to
#: their dtype (which adds variance) and counts rows as independent units though they share
#: keys and values, so with tens of thousands of rows the statistical band alone (under 1%) read
#: a correct kernel's 1.02x as a wrong keep rate. A wrong rate moves the variance far more
#: (dropping with p/2 instead of p at p = 0.17: about 0.55x).
DROPOUT_VARIANCE_FLOOR = 0.05


def _projection_bias(name: str, x: torch.Tensor, ref: torch.Tensor, n: int,
                     entry: dict[str, Any], slack: float = 0.0) -> str:
    """t-test that runs project onto the reference with mean coefficient 1 (within ``slack``,
    the deterministic precision error the kernel is allowed)."""
    flat = ref.flatten()
    norm2 = float(flat @ flat)
    if norm2 == 0:
        return ""
    beta = (x.flatten(1) @ flat) / norm2  # one coefficient per run
    mean, sd = float(beta.mean()), float(beta.std(unbiased=True))
    deviation = max(0.0, abs(mean - 1) - slack)
    t = deviation / (sd / math.sqrt(n)) if sd > 0 else (0.0 if deviation == 0 else math.inf)
    entry.update({"projection": mean, "projection_slack": slack, "projection_t": _finite(t),
                  "projection_t_max": DROPOUT_T_MAX})
    if abs(t) > DROPOUT_T_MAX:
        return (f"{name}: runs average {mean:.3f} x the dropout-free reference, not 1 "
                f"(t = {t:.1f} over {n} runs): biased dropout scaling")
    return ""


def dropout_verdict(check: str, samples: dict[str, list[torch.Tensor]],
                    expected: dict[str, torch.Tensor],
                    variance: dict[str, torch.Tensor | None],
                    baselines: dict[str, torch.Tensor] | None = None, *, k: float = K_OUT,
                    atol: float = 0.0) -> Verdict:
    """A statistical check of dropout, for kernels that do not expose their dropout mask.

    Over N runs with different RNG seeds:

    * the output must vary (a kernel that ignores dropout fails);
    * the mean must converge to the dropout-free reference: inverted dropout is unbiased,
      gradients included. For the output, whose per-run variance is known exactly,
      ``S = mean(z**2)`` with ``z = (mean - ref) / sqrt(var / N)`` has expectation 1 and must stay
      below ``1 + 8 * sqrt(2 / units)``, which holds even if all elements of a row are perfectly
      correlated (they share the row's mask). For gradients, each run's projection on the
      reference (one scalar per run) must average 1 (|t| <= 6.5). Both tests first grant the
      kernel the deterministic error the parity rule allows, measured on the dropout-free
      ``baselines`` (the same math at the kernel's precision): ``k`` times the baseline's
      maximum error plus ``atol`` per element, ``k`` times the baseline's projection error;
    * where the theoretical variance ``p/(1-p) * sum_j P_ij**2 * v_jd**2`` is known (the forward
      output), the observed variance must match it within 8 standard errors of a pooled sample
      variance, ``sqrt((kurtosis - 1) / (N * units))``, kurtosis estimated from the runs.

    Cases with fewer than 32 independent units only get the first test and are recorded as
    skipped for the other two. This is evidence, not proof: N and thresholds are in the metrics.
    """
    metrics: dict[str, Any] = {}
    problems: list[str] = []
    too_small: list[str] = []
    for name, runs in samples.items():
        x = torch.stack([r.detach().double() for r in runs])
        n = x.shape[0]
        entry: dict[str, Any] = {"samples": n}
        metrics[name] = entry
        if not torch.isfinite(x).all():
            problems.append(f"{name}: NaN/Inf in dropout runs")
            continue
        mean, var = x.mean(0), x.var(0, unbiased=True)
        ref = expected[name].double().to(x.device)
        theory = variance.get(name)
        scale = theory.double() if theory is not None else var
        live = scale > 1e-12
        units = int(live.flatten(0, -2).any(-1).sum()) if live.dim() > 1 else int(live.sum())
        entry["units"] = units
        if units == 0:
            continue
        varied = float((var[live] > 0).double().mean())
        entry["varied_fraction"] = varied
        if varied < 0.5:
            problems.append(f"{name}: only {varied:.0%} of elements vary across {n} dropout seeds: "
                            "dropout has no effect")
            continue
        if units < DROPOUT_MIN_UNITS:
            too_small.append(f"{name} has {units} independent rows x heads")
            continue
        if theory is not None:
            # Exact per-run variance is known: elementwise z-scores have E[z^2] = 1 exactly.
            allowed = atol
            if baselines and name in baselines:
                base = baselines[name].double().to(x.device)
                allowed += k * float((base - ref).abs().max())
            excess = ((mean - ref).abs() - allowed).clamp_min(0)
            entry["allowed_abs"] = allowed
            z2 = (excess[live] ** 2) / (scale[live] / n)
            s_mean = float(z2.mean())
            s_max = 1 + DROPOUT_SIGMAS * math.sqrt(2 / units)
            entry.update({"mean_z2": s_mean, "mean_z2_max": s_max})
            if s_mean > s_max:
                problems.append(f"{name}: mean over {n} dropout runs is biased against the "
                                f"dropout-free reference (mean z^2 {s_mean:.2f} > {s_max:.2f})")
        else:
            # Gradients: elements share the row term rowsum(dO * O), and t-scores of skewed
            # samples are biased, so test one scalar per run instead: the projection of the run
            # on the reference, whose mean must be 1 (a t-test over the N runs).
            slack = 0.0
            if baselines and name in baselines:
                base = baselines[name].double().to(x.device).flatten()
                norm2 = float(ref.flatten() @ ref.flatten())
                if norm2 > 0:
                    slack = k * abs(float((base - ref.flatten()) @ ref.flatten())) / norm2
            problem = _projection_bias(name, x, ref, n, entry, slack)
            if problem:
                problems.append(problem)
        if theory is not None:
            ratio = float(var[live].mean() / theory.double()[live].mean())
            centred = x[:, live] - mean[live]
            kurtosis = float((centred**4).mean(0).sum() / ((centred**2).mean(0) ** 2).sum())
            half = max(DROPOUT_SIGMAS * math.sqrt(max(kurtosis - 1, 2.0) / (n * units)),
                       DROPOUT_VARIANCE_FLOOR)
            band = (1 - half, 1 + half)
            entry.update({"variance_ratio": ratio, "variance_band": list(band),
                          "kurtosis": kurtosis})
            if not band[0] <= ratio <= band[1]:
                problems.append(f"{name}: observed dropout variance is {ratio:.2f}x the theory for "
                                "this dropout_p (wrong drop probability or scaling)")
    if problems:
        status, reason = "fail", "; ".join(problems)
    elif too_small:
        status = "skip"
        reason = (f"dropout visibly acts, but {', '.join(too_small)}: fewer than "
                  f"{DROPOUT_MIN_UNITS}, too few for the statistical bias and variance tests")
    else:
        status, reason = "pass", ""
    return Verdict(check, status, {"dropout": metrics, "statistical": True}, reason)


# ------------------------------------------------------- yardstick where the baseline overflows


#: Tensors the parity rule judges, in the order of :class:`~harness.exact.outputs.Outputs`.
JUDGED = ("out", "lse", "dq", "dk", "dv")


def overflowed(plain, reference) -> list[str]:
    """Names of the tensors where the same-dtype baseline ``plain`` is NaN/Inf at an element
    whose exact ``reference`` is finite (scores past float16's 65,504, say): its error there is
    undefined, so it cannot be the parity rule's yardstick. Both are
    :class:`~harness.exact.outputs.Outputs`; missing tensors are skipped."""
    names = []
    for name in JUDGED:
        base, ref = getattr(plain, name), getattr(reference, name)
        if base is None or ref is None:
            continue
        finite_ref = torch.isfinite(ref)
        if bool((finite_ref & ~torch.isfinite(base.to(ref.device))).any()):
            names.append(name)
    return names


def sound_baseline(reference, plain, *fallbacks):
    """The baseline the parity rule uses, per tensor: the plain same-dtype one where it is
    finite wherever the reference is; else, of the ``fallbacks`` (correct algorithms that do not
    overflow), the one whose error against the reference is largest.

    The fallbacks the checks pass are ``reference.baseline(inputs, widened=True)`` (float32
    scores and softmax, ``P`` and ``dS`` rounded to the inputs' dtype: flash-attn's precision
    split) and ``reference.reference(inputs, dtype=torch.float32)`` (the blockwise algorithm in
    float32, whose backward forms ``D = rowsum(dO * O)`` as fused kernels do, with their
    cancellation error where rows are one-hot).

    Returns:
        ``(chosen, replaced)``: an :class:`~harness.exact.outputs.Outputs` and, per tensor taken
        from a fallback, its index in ``fallbacks`` (record it: ``metrics["yardstick"]``).
    """
    chosen = Outputs(out=plain.out, lse=plain.lse, dq=plain.dq, dk=plain.dk, dv=plain.dv,
                     rows=plain.rows)
    replaced: dict[str, int] = {}
    for name in overflowed(plain, reference):
        ref = getattr(reference, name).double()
        finite = torch.isfinite(ref)
        best, best_err = None, -1.0
        for index, other in enumerate(fallbacks):
            t = getattr(other, name, None)
            if t is None:
                continue
            diff = torch.where(finite, (t.double().to(ref.device) - ref).abs(), 0.0)
            if not bool(torch.isfinite(diff).all()):
                continue  # this fallback overflows too
            err = float(diff.max()) if diff.numel() else 0.0
            if err > best_err:
                best, best_err = index, err
        if best is not None:
            setattr(chosen, name, getattr(fallbacks[best], name))
            replaced[name] = best
    return chosen, replaced
