"""Running the checks of one case on one backend, in this process.

This is the glue between the pure stages: it draws the inputs, calls the kernel, computes the
reference and the baseline once per case (lazily, only for the checks that need them) and hands
tensors to the judge. Processes, files and timeouts are the runner's business.
"""

from __future__ import annotations

import contextlib
import math
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from harness import judge, reference
from harness.backends.base import Backend, Unsupported
from harness.case import Case
from harness.dispatch import Plan
from harness.inputs import Inputs, derive_seed, make_inputs
from harness.outputs import Outputs
from harness.profile import Profile
from harness.target import Target
from harness.timing import BWD_FACTOR, tflops, time_function

CHECK_ORDER = ("fwd", "bwd", "determinism", "throughput")
#: Above this much forward work (GFLOP) the reference is computed for a seeded sample of query
#: rows only: about half a minute of float64 on a 2-core CPU, minutes of float32 on a GPU.
EXACT_REFERENCE_GFLOP = {"cpu": 200.0, "cuda": 20000.0}
#: Query rows per sequence a sampled verdict judges (first, last and seeded others).
SAMPLED_ROWS = 256
#: Query rows per sequence kept for the jury (comparing backends with each other).
JURY_ROWS = 64


class KernelError(Exception):
    """The kernel raised on a case it claims to support."""


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class CaseRun:
    """The checks of one case on one backend, sharing inputs and reference results."""

    def __init__(self, case: Case, backend: Backend, target: Target, *, seed: int,
                 profile: Profile, device: torch.device | str | None = None,
                 jury_dir: str = "") -> None:
        self.jury_dir = jury_dir
        self.case = case
        self.backend = backend
        self.target = target
        self.seed = seed
        self.profile = profile
        self.device = torch.device(device or ("cuda" if target.vendor != "cpu" else "cpu"))
        self._inputs: Inputs | None = None
        self._cache: dict[str, Any] = {}

    # --------------------------------------------------------------------------- shared state

    @property
    def inputs(self) -> Inputs:
        if self._inputs is None:
            self._inputs = make_inputs(self.case, self.device, self.seed)
        return self._inputs

    def _cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def ref(self, grads: bool = False) -> Outputs:
        if grads:
            return self._cached("ref+grads", lambda: reference.reference(self.inputs, grads=True))
        if "ref+grads" in self._cache:
            return self._cache["ref+grads"]
        return self._cached("ref", lambda: reference.reference(self.inputs))

    def base(self, grads: bool = False) -> Outputs:
        if grads:
            return self._cached("base+grads", lambda: reference.baseline(self.inputs, grads=True))
        if "base+grads" in self._cache:
            return self._cache["base+grads"]
        return self._cached("base", lambda: reference.baseline(self.inputs))

    def yardstick(self, ref: Outputs, plain: Outputs, key: str, grads: bool = False,
                  rows=None) -> Outputs:
        """The baseline the judge measures against.

        For 16-bit cases it is flash-attn's: the plain PyTorch math at the kernel's dtype. For
        float32, rounding-order noise rather than 16-bit rounding dominates, and one plain
        implementation understates how far correct float32 kernels land (a blockwise, online-
        softmax float32 computation errs several times more on ill-conditioned cases). There,
        per tensor, the larger error of the two correct float32 algorithms is the yardstick.
        """
        if self.inputs.q.dtype != torch.float32:
            return plain
        blockwise = self._cached(key, lambda: reference.reference(
            self.inputs, dtype=torch.float32, grads=grads, rows=rows))
        chosen = Outputs(out=plain.out, lse=plain.lse, dq=plain.dq, dk=plain.dk, dv=plain.dv,
                         rows=plain.rows)
        for name in ("out", "lse", "dq", "dk", "dv"):
            a, b, r = getattr(plain, name), getattr(blockwise, name), getattr(ref, name)
            if a is None or b is None or r is None:
                continue
            finite = torch.isfinite(r)
            err_a = float(torch.where(finite, (a.double() - r).abs(), 0).nan_to_num(0).max())
            err_b = float(torch.where(finite, (b.double() - r).abs(), 0).nan_to_num(0).max())
            if err_b > err_a:
                setattr(chosen, name, b)
        return chosen

    def _rng_seed(self, salt: str) -> int:
        return derive_seed(self.seed, self.case.case_id, salt)

    def call(self, inputs: Inputs, *, rng: str = "kernel") -> Outputs:
        """One forward call with the global RNG seeded (dropout draws from it)."""
        torch.manual_seed(self._rng_seed(rng))
        with _kernel_errors():
            return self.backend.forward(inputs, deterministic=True)

    def call_backward(self, *, rng: str = "kernel") -> Outputs:
        """Forward and backward on fresh differentiable inputs; grads filled in."""
        inputs = self.inputs.with_grad()
        result = self.call(inputs, rng=rng)
        with _kernel_errors("backward: "):
            dq, dk, dv = torch.autograd.grad(result.out, (inputs.q, inputs.k, inputs.v),
                                             self.inputs.dout)
        return Outputs(out=result.out.detach(), lse=result.lse, dq=dq, dk=dk, dv=dv)

    # ------------------------------------------------------------------------------- checks

    def run(self, check: str) -> judge.Verdict:
        """Run one check; every outcome, including kernel errors and OOM, is a verdict."""
        method = getattr(self, f"check_{check}")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            verdict = method()
            verdict.metrics.update(self._memory())
            return verdict
        except Unsupported as exc:
            return judge.Verdict(check, "skip", {"refused_at_call": True}, str(exc))
        except KernelError as exc:
            return judge.Verdict(check, "error", {}, f"the kernel raised {exc}")
        except Exception as exc:  # noqa: BLE001
            if _is_oom(exc):
                _free(self.device)
                return judge.Verdict(check, "skip", {"oom": True},
                                     f"out of memory on {self.target.device_name}: "
                                     f"{_describe(exc)}")
            return judge.Verdict(check, "error", {"traceback": traceback.format_exc()[-2000:]},
                                 f"the harness failed: {_describe(exc)}")

    def _memory(self) -> dict[str, int]:
        """Peak memory: device bytes of this check on GPUs; the worker's peak RSS on CPUs (a
        running maximum over the process, so an upper bound for this check)."""
        if self.device.type == "cuda":
            return {"peak_device_bytes": int(torch.cuda.max_memory_allocated(self.device))}
        import resource

        return {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    @property
    def sampled(self) -> bool:
        """Whether the forward reference is too expensive here to compute for every row."""
        limit = EXACT_REFERENCE_GFLOP[self.device.type]
        return self.case.flops_fwd() / 1e9 > limit

    def check_fwd(self) -> judge.Verdict:
        if self.case.dropout_p:
            return self._dropout("fwd")
        result = self.call(self.inputs)
        rows = None
        if self.sampled:
            rows = reference.sample_rows(self.inputs, SAMPLED_ROWS,
                                         self._rng_seed("sampled-rows"))
            ref = self._cached("ref-rows", lambda: reference.reference(self.inputs, rows=rows))
            base = self._cached("base-rows", lambda: reference.baseline(self.inputs, rows=rows))
            base = self.yardstick(ref, base, "blockwise-rows", rows=rows)
        else:
            ref = self.ref()
            base = self.yardstick(ref, self.base(), "blockwise")
        atol = judge.ATOL[self.inputs.q.dtype]
        comparisons = [judge.compare("out", result.out, base.out, ref.out, k=judge.K_OUT,
                                     atol=atol, valid=ref.row_mask(ref.out))]
        if result.lse is not None:
            lse = _lse_layout(result.lse, ref.lse)
            comparisons.append(judge.compare("lse", lse, base.lse, ref.lse, k=judge.K_OUT,
                                             atol=atol, valid=torch.isfinite(ref.lse)))
        allowed = comparisons[0].allowed
        notes = []
        if rows is None:
            effects = self.feature_effects()
            inert = judge.inert_features(effects, allowed)
            note = judge.inert_note(effects, allowed)
            notes = [note] if note else []
        else:
            effects, inert = {}, []
        verdict = judge.parity_verdict("fwd", comparisons, notes)
        verdict.metrics["feature_effect"] = effects
        verdict.metrics["inert_features"] = inert
        verdict.metrics["verdict_kind"] = "exact" if rows is None else "sampled-rows"
        if rows is not None:
            judged = int(ref.rows.sum())
            verdict.metrics["rows_judged"] = judged
            verdict.metrics["rows_total"] = int(ref.rows.numel())
            prefix = (f"judged on {judged} of {ref.rows.numel()} query rows (the exact "
                      f"reference of all rows is over {EXACT_REFERENCE_GFLOP[self.device.type]:g}"
                      " GFLOP here; see the jury for the kernels' agreement)")
            verdict = judge.Verdict(verdict.check, verdict.status, verdict.metrics,
                                    "; ".join(x for x in (verdict.reason, prefix) if x))
        if self.jury_dir:
            from harness.jury import save_rows

            chosen = rows or reference.sample_rows(self.inputs, JURY_ROWS,
                                                   self._rng_seed("jury-rows"))
            save_rows(self.jury_dir, self.case, self.backend.name, self.inputs, chosen,
                      result.out, ref, allowed, verdict.metrics["verdict_kind"])
        return verdict

    def check_bwd(self) -> judge.Verdict:
        if self.case.dropout_p:
            return self._dropout("bwd")
        result = self.call_backward()
        ref = self.ref(grads=True)
        base = self.yardstick(ref, self.base(grads=True), "blockwise+grads", grads=True)
        atol = judge.ATOL[self.inputs.q.dtype]
        comparisons = [
            judge.compare(name, getattr(result, name), getattr(base, name), getattr(ref, name),
                          k=judge.K_GRAD, atol=atol)
            for name in ("dq", "dk", "dv")
        ]
        if self.case.entry == "kvcache":  # pragma: no cover - dispatch never asks
            raise AssertionError("kvcache has no backward")
        return judge.parity_verdict("bwd", comparisons)

    def check_determinism(self) -> judge.Verdict:
        backward = self.backend.capabilities.backward and self.case.entry != "kvcache"
        runs = []
        for _ in range(2):
            if backward:
                r = self.call_backward(rng="determinism")
                tensors = {"out": r.out, **r.grads()}
            else:
                with torch.no_grad():
                    r = self.call(self.inputs, rng="determinism")
                tensors = {"out": r.out}
            if r.lse is not None:
                tensors["lse"] = r.lse
            runs.append({k: v.detach().clone() for k, v in tensors.items()})
        caps = self.backend.capabilities
        exempt = () if caps.deterministic_backward else ("dq", "dk", "dv")
        why = caps.notes.get("deterministic_backward",
                             f"{self.backend.name} does not promise a deterministic backward")
        verdict = judge.determinism_verdict(*runs, exempt=exempt, why=why)
        verdict.metrics["backward"] = backward
        return verdict

    def check_throughput(self) -> judge.Verdict:
        p = self.profile
        budget = {"warmup_s": p.warmup_s, "budget_s": p.budget_s, "min_reps": p.min_reps,
                  "graph": getattr(p, "graph_replay", False)}
        flops = self.case.flops_fwd()
        metrics: dict[str, Any] = {"flops_fwd": flops}
        torch.manual_seed(self._rng_seed("throughput"))
        with torch.no_grad():
            fwd = _kernel_timing(lambda: self.backend.forward(self.inputs), self.device, budget)
        metrics.update(_rate(fwd, flops, self.target, self.case.dtype))
        backward = self.backend.capabilities.backward and self.case.entry != "kvcache"
        if backward:
            # One set of leaves for both timings: copying fresh inputs inside the timed call
            # would add a copy of q, k and v to every forward+backward.
            inputs = self.inputs.with_grad()
            out = self.call(inputs, rng="throughput").out
            leaves = (inputs.q, inputs.k, inputs.v)
            bwd = _kernel_timing(
                lambda: torch.autograd.grad(out, leaves, self.inputs.dout, retain_graph=True),
                self.device, budget)
            metrics["bwd"] = _rate(bwd, BWD_FACTOR * flops, self.target, self.case.dtype)

            def fwd_bwd():
                o = self.backend.forward(inputs).out
                torch.autograd.grad(o, leaves, self.inputs.dout)

            both = _kernel_timing(fwd_bwd, self.device, budget)
            metrics["fwd_bwd"] = _rate(both, (1 + BWD_FACTOR) * flops, self.target,
                                       self.case.dtype)
        return judge.Verdict("throughput", "pass", metrics, "")

    # ------------------------------------------------------------------------ feature effects

    def feature_effects(self) -> dict[str, float]:
        """For each feature the case turns on, how much removing it changes the reference."""
        case = self.case
        p = reference.Params.of(case)
        variants: dict[str, tuple[reference.Params, bool]] = {}
        if case.causal:
            variants["causal"] = (reference.Params(p.scale, p.left, -1, p.softcap), case.alibi)
        if "window" in case.features:
            right = 0 if case.causal else -1
            variants["window"] = (reference.Params(p.scale, -1, right, p.softcap), case.alibi)
        if case.softcap:
            variants["softcap"] = (reference.Params(p.scale, p.left, p.right, 0.0), case.alibi)
        if case.alibi:
            variants["alibi"] = (p, False)
        if case.scale is not None:
            default = 1.0 / math.sqrt(case.head_dim)
            variants["scale"] = (reference.Params(default, p.left, p.right, p.softcap), case.alibi)
        ref = self.ref().out
        effects = {}
        for name, (params, alibi) in variants.items():
            other = reference.reference(self.inputs, params=params, alibi=alibi).out
            effects[name] = float((other - ref).abs().max())
        return effects

    # -------------------------------------------------------------------------------- dropout

    def _dropout(self, check: str) -> judge.Verdict:
        n = self.profile.dropout_samples
        samples: dict[str, list[torch.Tensor]] = {}
        for i in range(n):
            if check == "fwd":
                with torch.no_grad():
                    r = self.call(self.inputs, rng=f"dropout-{i}")
                tensors = {"out": r.out}
            else:
                r = self.call_backward(rng=f"dropout-{i}")
                tensors = r.grads()
            for name, t in tensors.items():
                samples.setdefault(name, []).append(t.detach().to("cpu", torch.float64))
        atol = judge.ATOL[self.inputs.q.dtype]
        if check == "fwd":
            expected = {"out": self.ref().out.cpu()}
            variance = {"out": reference.dropout_variance(self.inputs).cpu()}
            baselines = {"out": self.base().out.cpu()}
            k = judge.K_OUT
        else:
            ref = self.ref(grads=True)
            expected = {k: v.cpu() for k, v in ref.grads().items()}
            variance = {k: None for k in expected}
            baselines = {k: v.cpu() for k, v in self.base(grads=True).grads().items()}
            k = judge.K_GRAD
        verdict = judge.dropout_verdict(check, samples, expected, variance, baselines, k=k,
                                        atol=atol)
        verdict.metrics["dropout_p"] = self.case.dropout_p
        return verdict


#: Dtypes the device peak table (dense fp16/bf16 tensor throughput) is a fair yardstick for.
PEAK_DTYPES = ("float16", "bfloat16")


def _rate(timing, flops: float, target: Target, dtype: str) -> dict[str, Any]:
    rate = tflops(flops, timing.median_ms)
    out = {"time_ms": timing.median_ms, "tflops": rate, **{f"timing_{k}": v
                                                           for k, v in timing.to_dict().items()
                                                           if k != "median_ms"}}
    fair = target.peak_tflops and dtype in PEAK_DTYPES
    out["pct_peak"] = 100 * rate / target.peak_tflops if fair else None
    return out


@contextlib.contextmanager
def _kernel_errors(prefix: str = ""):
    """What a kernel call raises is the kernel's error (:class:`KernelError`), not the
    harness's; a refusal (:class:`Unsupported`) and an out-of-memory pass through."""
    try:
        yield
    except Unsupported:
        raise
    except Exception as exc:  # noqa: BLE001 - every kernel failure becomes a record
        if _is_oom(exc):
            raise
        raise KernelError(prefix + _describe(exc)) from exc


def _kernel_timing(fn, device, budget):
    """:func:`time_function` of a kernel call, its failures the kernel's."""
    with _kernel_errors():
        return time_function(fn, device, **budget)


def _lse_layout(lse: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Kernels may pad lse's query dimension (flash-attn rounds it up); cut to the reference."""
    if lse.shape == like.shape:
        return lse
    if lse.dim() == like.dim() and all(a >= b for a, b in zip(lse.shape, like.shape, strict=True)):
        return lse[tuple(slice(0, n) for n in like.shape)]
    return lse.reshape(like.shape)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_plan(plan: Plan, backend: Backend, target: Target, *, seed: int, profile: Profile,
             device: torch.device | str | None = None,
             jury_dir: str = "") -> Iterator[judge.Verdict]:
    """Verdicts for every check of a plan, in CHECK_ORDER: skips first-class, runs as they end."""
    run = CaseRun(plan.case, backend, target, seed=seed, profile=profile, device=device,
                  jury_dir=jury_dir)
    for check in CHECK_ORDER:
        if check in plan.skips:
            yield judge.Verdict(check, "skip", {}, plan.skips[check])
        elif check in plan.run:
            verdict = run.run(check)
            if plan.audit:
                verdict = audit_verdict(verdict, plan)
            yield verdict


def audit_verdict(verdict: judge.Verdict, plan: Plan) -> judge.Verdict:
    """Classify how a kernel treated a case it does not claim to support."""
    claim = "; ".join(plan.unsupported)
    metrics = dict(verdict.metrics)
    if verdict.status in ("error", "skip") and "out of memory" not in verdict.reason:
        metrics["audit"] = "rejected"
        return judge.Verdict(verdict.check, "skip", metrics,
                             f"audit: rejected loudly (good): {verdict.reason} "
                             f"[unsupported: {claim}]")
    if verdict.status == "fail":
        metrics["audit"] = "silent"
        return judge.Verdict(verdict.check, "fail", metrics,
                             f"audit: SILENT — accepted a case it does not support ({claim}) and "
                             f"computed something else: {verdict.reason}")
    if verdict.status == "pass" and verdict.check in ("fwd", "bwd"):
        metrics["audit"] = "accepted"
        return judge.Verdict(verdict.check, "pass", metrics,
                             f"audit: accepted and computed correctly although it does not claim "
                             f"to support it ({claim})")
    return verdict
