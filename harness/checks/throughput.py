"""The throughput check: median time and TFLOP/s of the forward, the backward and both, timed by
:mod:`harness.checks.timing`, with the percentage of the device's dense peak; the latest timed
call of each pass is held to the judged calls (:mod:`harness.checks.ledger`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from harness.checks.contract import clone_inputs, grad_leaves
from harness.checks.ledger import FORWARD, Mode
from harness.checks.registry import check, kernel_errors
from harness.checks.timing import attention_control, tflops, time_functions
from harness.exact import fp8, judge
from harness.target import Target, peak_for
from harness.vocab import BWD_FLOP_FACTOR

if TYPE_CHECKING:
    from harness.checks.context import CheckContext


@check("throughput")
def check_throughput(ctx: CheckContext) -> judge.Verdict:
    """Time the forward, the backward and both; the latest timed call of each is then held to
    the judged calls (:mod:`harness.checks.ledger`), so a kernel whose outputs change once it is
    warm (an autotuner's switch, a stale workspace or graph) fails here, its timing kept."""
    p = ctx.profile
    budget = {"warmup_s": p.warmup_s, "budget_s": p.budget_s, "min_reps": p.min_reps,
              "graph": getattr(p, "graph_replay", False)}
    flops = ctx.case.flops_fwd()
    metrics: dict[str, Any] = {"flops_fwd": flops}
    used = clone_inputs(ctx.inputs)
    if ctx.case.dropout_p:
        torch.manual_seed(ctx.rng_seed("throughput"))
    #: pass -> what its latest call returned. Each call lets go of the previous result before
    #: it runs, so no more memory is live than when results were dropped at once.
    kept: dict[str, Any] = {}

    def forward():
        kept.pop("fwd", None)
        with torch.no_grad():
            kept["fwd"] = ctx.backend.forward(used)

    calls: dict[str, Callable[[], object]] = {"fwd": forward}
    unpack = None
    if ctx.has_backward:
        # One set of leaves for both timings: copying fresh inputs inside the timed call
        # would add a copy of q, k and v to every forward+backward.
        leaves_from = used.with_grad()
        with kernel_errors():
            out = ctx.backend.forward(leaves_from).out
        leaves, unpack = grad_leaves(leaves_from)
        dout = ctx.inputs.dout

        def backward():
            kept.pop("bwd", None)
            kept["bwd"] = (None, torch.autograd.grad(out, leaves, dout, retain_graph=True))

        def fwd_bwd():
            kept.pop("fwd_bwd", None)
            o = ctx.backend.forward(leaves_from).out
            kept["fwd_bwd"] = (o.detach(), torch.autograd.grad(o, leaves, dout))

        calls["bwd"] = backward
        calls["fwd_bwd"] = fwd_bwd
    # On a CPU the calls take turns in one window (harness.checks.timing.measure_interleaved).
    # On a CPU a fixed control workload takes turns with the kernel, block by block, so that
    # compare can tell a slower kernel from a busier machine (Timing.relative).
    c = ctx.case
    control = (attention_control(c.batch, c.heads_q, c.seqlen_q, c.seqlen_k, c.head_dim,
                                 ctx.device) if ctx.device.type == "cpu" else None)
    with kernel_errors():
        timings = time_functions(calls, ctx.device, control=control, **budget)
    metrics.update(_rate(timings["fwd"], flops, ctx.target, ctx.case.dtype))
    for name, factor in (("bwd", BWD_FLOP_FACTOR), ("fwd_bwd", 1 + BWD_FLOP_FACTOR)):
        if name in timings:
            metrics[name] = _rate(timings[name], factor * flops, ctx.target, ctx.case.dtype)
    problems = _timed_problems(ctx, kept, unpack)
    if problems:
        return judge.Verdict("throughput", "fail", metrics,
                             "the timed calls are not the judged ones: " + "; ".join(problems))
    return judge.Verdict("throughput", "pass", metrics, "")


def _timed_problems(ctx: CheckContext, kept: dict[str, Any],
                    unpack: Callable | None) -> list[str]:
    """How the latest timed call of each pass falls short of the judged calls. With dropout
    every timed call draws another mask: nothing to hold it to. (A kernel that writes into its
    inputs on later calls changes the output of the next call on them, which is held.)"""
    problems: list[str] = []
    if ctx.case.dropout_p:
        return problems
    if "fwd" in kept:
        r = kept["fwd"]
        problems += ctx.ledger.hold("timed fwd call", {"out": r.out, "lse": r.lse}, FORWARD)
    taped = Mode(grad=True, deterministic=True)  # Backend.forward's default
    for name, label in (("bwd", "timed bwd call"), ("fwd_bwd", "timed fwd+bwd call")):
        if name in kept and unpack is not None:
            out, grads = kept[name]
            dq, dk, dv = unpack(grads)
            problems += ctx.ledger.hold(label, {"out": out, "dq": dq, "dk": dk, "dv": dv}, taped)
    return problems


PEAK_DTYPES = ("float16", "bfloat16")


def peak_for_dtype(target: Target, dtype: str) -> float | None:
    """The dense peak a case of ``dtype`` is measured against on ``target``: the fp16/bf16
    figure for 16-bit cases, the table's fp8 figure for fp8 cases (None where none is
    recorded), none for float32 (attention's float32 runs off the tensor cores' peak)."""
    if dtype in PEAK_DTYPES:
        return target.peak_tflops or None
    if dtype in fp8.FP8_DTYPES and target.device_name:
        peak = peak_for(target.device_name)
        return peak.fp8_tflops if peak else None
    return None


def _rate(timing, flops: float, target: Target, dtype: str) -> dict[str, Any]:
    rate = tflops(flops, timing.median_ms)
    out = {"time_ms": timing.median_ms, "tflops": rate, **{f"timing_{k}": v
                                                           for k, v in timing.to_dict().items()
                                                           if k != "median_ms"}}
    peak = peak_for_dtype(target, dtype)
    out["pct_peak"] = 100 * rate / peak if peak else None
    return out
