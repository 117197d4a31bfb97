"""What the checks of one case on one backend share, in this process.

One :class:`CheckContext` per case and backend holds what the checks share, each computed once
and only when a check needs it (``functools.cached_property``): the seeded inputs, the exact
reference, the same-precision baseline, their gradients, the reference without each feature.
Each check is one function registered with :func:`harness.checks.registry.check` under its name
in :data:`harness.vocab.CHECKS`; it takes the context and returns a new
:class:`~harness.exact.judge.Verdict` (verdicts are built, never mutated). This module imports
the harness's own checks, so all are registered once a context can run them.

The kernel is called through the context (:meth:`CheckContext.call`) on a private copy of the
inputs held to the forward contract (:mod:`harness.checks.contract`), and every output after the
judged call (the bwd check's forward, the determinism runs, the timed calls) to the judged one
(:mod:`harness.checks.ledger`). The global RNG is seeded before a call only where the case has
dropout: without dropout, a kernel's own randomness must show up as non-determinism. Processes,
files and timeouts are the runner's business.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import traceback
from functools import cached_property
from typing import Any

import torch

from harness.backends.base import Backend, Unsupported
from harness.case import Case

# The harness's own checks, registered on import (determinism and throughput for that alone).
from harness.checks import determinism, throughput  # noqa: F401
from harness.checks.contract import clone_inputs, contract_problems, grad_leaves, modified_inputs
from harness.checks.ledger import Ledger
from harness.checks.parity import forward_comparisons, gradient_comparison, max_error
from harness.checks.plan import estimated_bytes, usable_memory
from harness.checks.registry import (
    CHECK_FUNCTIONS,
    ContractViolation,
    KernelError,
    KernelOutOfMemory,
    KernelRefused,
    describe,
    is_oom,
    kernel_errors,
)
from harness.exact import fp8, judge, padding, reference
from harness.exact.inputs import Inputs, derive_seed, make_inputs
from harness.exact.outputs import Outputs
from harness.exact.scores import Params
from harness.options import Profile
from harness.target import Target

#: Above this much forward work (GFLOP) the reference is computed for a seeded sample of query
#: rows only: about half a minute of float64 on a 2-core CPU, minutes of float32 on a GPU.
EXACT_REFERENCE_GFLOP = {"cpu": 200.0, "cuda": 20000.0}
#: Query rows per sequence a sampled verdict judges (first, last and seeded others).
SAMPLED_ROWS = 256


class CheckContext:
    """What the checks of one case on one backend share, each piece computed once."""

    def __init__(self, case: Case, backend: Backend, target: Target, *, seed: int,
                 profile: Profile, device: torch.device | str | None = None,
                 jury_dir: str = "") -> None:
        self.case = case
        self.backend = backend
        self.target = target
        self.seed = seed
        self.profile = profile
        self.jury_dir = jury_dir
        self.device = torch.device(device or ("cuda" if target.vendor != "cpu" else "cpu"))
        #: tensor -> the yardstick used where the same-dtype baseline overflowed
        self.yardsticks: dict[str, str] = {}
        #: the exact dropout's recovered ``D(P)`` (``harness.exact.dropout.Recovery``): the
        #: forward check recovers it, the backward check of the same case reuses it
        self.dropout_recovery: Any = None

    # ----------------------------------------------------------------------- shared values

    @cached_property
    def inputs(self) -> Inputs:
        """The case's seeded inputs; never handed to the kernel (see :meth:`call`). fp8 cases
        are drawn in float32 and quantised as a user would
        (:func:`harness.exact.fp8.make_fp8_inputs`). The padding a kernel must not read is NaN,
        except the regions the backend's contract wants finite (``finite_padding``), which hold
        large finite junk (:mod:`harness.exact.padding`)."""
        if fp8.is_fp8_case(self.case):
            inputs = fp8.make_fp8_inputs(self.case, self.device, self.seed)
        else:
            inputs = make_inputs(self.case, self.device, self.seed)
        finite = getattr(self.backend.capabilities, "finite_padding", frozenset())
        if finite and inputs.padding:
            padding.fill(inputs, sorted(finite), kind="junk", in_place=True)
        return inputs

    @cached_property
    def exact_inputs(self) -> Inputs:
        """What the reference computes from: the inputs, or for fp8 their dequantised values
        (input quantisation is not charged to the kernel)."""
        return fp8.dequantised(self.inputs) if fp8.is_fp8_case(self.case) else self.inputs

    @property
    def lse_convention(self) -> str:
        """The lse the backend's family returns (the original's causal-ALiBi form for
        flash-attn); the reference and baseline compute the same, so outputs and lse are judged
        against what the original computes."""
        return getattr(self.backend, "lse_convention", "harness")

    @cached_property
    def reference(self) -> Outputs:
        """The exact forward (out, lse)."""
        return reference.reference(self.exact_inputs, lse_convention=self.lse_convention)

    @cached_property
    def reference_grads(self) -> Outputs:
        """The exact forward and gradients for ``inputs.dout``."""
        return reference.reference(self.exact_inputs, grads=True,
                                   lse_convention=self.lse_convention)

    @cached_property
    def baseline(self) -> Outputs:
        return self.yardstick(self.reference, self._baseline(), grads=False)

    @cached_property
    def baseline_grads(self) -> Outputs:
        return self.yardstick(self.reference_grads, self._baseline(grads=True), grads=True)

    def _baseline(self, **kwargs) -> Outputs:
        if fp8.is_fp8(self.case.dtype):  # emulates an fp8 kernel: P rounded to fp8 before P V
            return fp8.fp8_baseline(self.inputs, rows=kwargs.get("rows"))
        if fp8.is_fp8_case(self.case):  # an fp8 KV cache, dequantised to the queries' dtype
            return fp8.kv_baseline(self.inputs, lse_convention=self.lse_convention, **kwargs)
        return reference.baseline(self.inputs, lse_convention=self.lse_convention, **kwargs)

    @property
    def exact_reference_gflop(self) -> float:
        """Forward work (GFLOP) above which the reference is computed for sampled rows only."""
        return EXACT_REFERENCE_GFLOP[self.device.type]

    @cached_property
    def sampled_rows(self) -> list[torch.Tensor | None] | None:
        """The query rows a sampled verdict judges, or None when every row is judged."""
        if self.case.flops_fwd() / 1e9 <= self.exact_reference_gflop:
            return None
        return reference.sample_rows(self.inputs, SAMPLED_ROWS, self.rng_seed("sampled-rows"))

    @cached_property
    def sampled_reference(self) -> tuple[Outputs, Outputs]:
        """(reference, yardstick) on :attr:`sampled_rows` only."""
        rows = self.sampled_rows
        ref = reference.reference(self.exact_inputs, rows=rows,
                                  lse_convention=self.lse_convention)
        plain = self._baseline(rows=rows)
        return ref, self.yardstick(ref, plain, grads=False, rows=rows)

    def yardstick(self, ref: Outputs, plain: Outputs, *, grads: bool, rows=None) -> Outputs:
        """The baseline the judge measures against.

        For 16-bit cases it is flash-attn's: the plain PyTorch math at the kernel's dtype. For
        float32, rounding-order noise rather than 16-bit rounding dominates, and one plain
        implementation understates how far correct float32 kernels land (a blockwise, online-
        softmax float32 computation errs several times more on ill-conditioned cases, and the
        scale split between q and k, as PyTorch's math SDPA applies it, 2.4x more on scores of
        1e4). There, per tensor, the largest error of the three correct float32 algorithms is
        the yardstick.
        """
        chosen = plain
        if self.inputs.q.dtype == torch.float32:
            others = (self._blockwise32(grads, rows),
                      reference.baseline(self.inputs, grads=grads, rows=rows, split_scale=True,
                                         lse_convention=self.lse_convention))
            picked = {}
            for name in ("out", "lse", "dq", "dk", "dv"):
                a, r = getattr(plain, name), getattr(ref, name)
                picked[name] = a
                if a is None or r is None:
                    continue
                worst = max_error(a, r)
                for other in others:
                    b = getattr(other, name)
                    err = max_error(b, r) if b is not None else -math.inf
                    if err > worst:
                        picked[name], worst = b, err
            chosen = Outputs(**picked, rows=plain.rows)
        if fp8.is_fp8_case(self.case) or not judge.overflowed(chosen, ref):
            return chosen
        # The same-dtype baseline overflowed (fp16 scores past 65,504 under scaled or large
        # values): its error is undefined. The yardstick is then the larger error of two correct
        # algorithms that cannot overflow (docs/judging.md).
        widened = reference.baseline(self.inputs, grads=grads, rows=rows, widened=True,
                                     lse_convention=self.lse_convention)
        chosen, replaced = judge.sound_baseline(ref, chosen, widened,
                                                self._blockwise32(grads, rows))
        self.yardsticks.update({name: ("widened baseline", "float32 blockwise")[i]
                                for name, i in replaced.items()})
        return chosen

    @cached_property
    def score_unit(self) -> float | None:
        """The unit roundoff of the kernel's scores (float32 at least) where their rounding can
        matter, else None: when even the largest possible allowance (Cauchy-Schwarz on the
        longest q and k rows) stays under a tenth of the output's rounding floor, which is so
        for ordinary inputs in 16-bit dtypes. fp8 has its own rule."""
        q, k, v = self.inputs.q, self.inputs.k, self.inputs.v
        if fp8.is_fp8_case(self.case) or 0 in (q.numel(), k.numel()):
            return None
        unit = 2.0 ** -53 if q.dtype == torch.float64 else 2.0 ** -24
        d = q.shape[-1]
        scale = abs(Params.of(self.case).scale)

        def largest_of(t, norm=False):  # the padding (NaN, or junk) is never read
            x = torch.nan_to_num(t.float(), nan=0.0)
            return float((x.norm(dim=-1) if norm else x.abs()).max())

        largest_v = largest_of(v)
        largest = (math.sqrt(d) * unit * scale * largest_of(q, norm=True)
                   * largest_of(k, norm=True) * 2 * largest_v)
        return unit if largest > 0.1 * judge.rounding_floor(largest_v, q.dtype) else None

    @cached_property
    def score_slack(self) -> Outputs | None:
        """Per-element allowances of out and lse for the rounding of the kernel's scores
        (:func:`harness.exact.reference.score_rounding`) on the rows the forward verdict judges, or
        None where they cannot matter (:attr:`score_unit`)."""
        unit = self.score_unit
        return None if unit is None else reference.score_rounding(
            self.exact_inputs, unit, rows=self.sampled_rows)

    @cached_property
    def score_slack_grads(self) -> Outputs | None:
        """:attr:`score_slack` of dq, dk and dv for ``inputs.dout``, plus, where v or dout are
        drawn far from N(0, 1) (``v_values``, ``dout_values``) or q and k are (``values``),
        the allowance for a backward that takes ``D = rowsum(dO * O)`` from the output stored
        at the kernel's dtype (:func:`harness.exact.reference.delta_rounding`): those inputs
        make ``dS = P (dP - D)`` cancel (a row's only key: ``dP = D`` exactly, ``dS = 0``) and
        its rounding, times large keys, larger than the same-dtype baseline's own error (the
        flash-attn fixture's dq erred 1.2e-4 against an exact baseline on one key of q and k
        scaled x1000)."""
        unit = self.score_unit
        slack = None if unit is None else reference.score_rounding(
            self.exact_inputs, unit, grads=True)
        case = self.case
        if "normal" == case.values == getattr(case, "v_values", "normal") == \
                getattr(case, "dout_values", "normal"):
            return slack
        half_ulp = torch.finfo(self.inputs.q.dtype).eps / 2
        delta = reference.delta_rounding(self.exact_inputs, half_ulp)
        if slack is None:
            return delta
        return Outputs(out=slack.out, lse=slack.lse, dq=slack.dq + delta.dq,
                       dk=slack.dk + delta.dk, dv=slack.dv)

    @cached_property
    def feature_variants(self) -> dict[str, torch.Tensor]:
        """For each feature the case turns on, the exact output without it (what
        :func:`harness.checks.parity.feature_effects` and ``ignored_features`` measure against)."""
        case = self.case
        p = Params.of(case)
        variants: dict[str, tuple[Params, bool]] = {}
        if case.causal:
            variants["causal"] = (dataclasses.replace(p, right=-1), case.alibi)
        if "window" in case.features:
            right = 0 if case.causal else -1
            variants["window"] = (dataclasses.replace(p, left=-1, right=right), case.alibi)
        if case.softcap:
            variants["softcap"] = (dataclasses.replace(p, softcap=0.0), case.alibi)
        if case.alibi:
            variants["alibi"] = (p, False)
        if case.scale is not None:
            variants["scale"] = (dataclasses.replace(p, scale=1.0 / math.sqrt(case.head_dim)),
                                 case.alibi)
        if case.sink_tokens:
            variants["sink-tokens"] = (dataclasses.replace(p, sink_tokens=0), case.alibi)
        outs = {name: reference.reference(self.exact_inputs, params=params, alibi=alibi).out
                for name, (params, alibi) in variants.items()}
        if case.learnable_sink:
            outs["sink"] = reference.reference(self.exact_inputs, sink=False).out
        return outs

    @cached_property
    def ledger(self) -> Ledger:
        """The judged outputs every later output is held to (:mod:`harness.checks.ledger`)."""
        return Ledger(self.backend.capabilities.deterministic_backward, self.held_parity)

    def held_parity(self, name: str, tensor: torch.Tensor) -> judge.Comparison | None:
        """``tensor`` (out, lse, dq, dk or dv of a later call) judged by the parity rule
        against the reference its judged check used, which is cached by then; None for fp8
        (its rule is FA3's, and fp8 is forward only: every call is held bitwise)."""
        if fp8.is_fp8(self.case.dtype):
            return None
        if name in ("out", "lse"):
            out, lse = (tensor, None) if name == "out" else (None, tensor)
            return forward_comparisons(self, out, lse)[0]
        return gradient_comparison(self, name, tensor)

    def _blockwise32(self, grads: bool, rows) -> Outputs:
        return reference.reference(self.exact_inputs, dtype=torch.float32, grads=grads,
                                   rows=rows, lse_convention=self.lse_convention)

    def rng_seed(self, salt: str) -> int:
        return derive_seed(self.seed, self.case.case_id, salt)

    @property
    def atol(self) -> float:
        return judge.ATOL[self.inputs.q.dtype]

    @property
    def has_backward(self) -> bool:
        """Whether the case's backward can be taken on this backend (the bwd check's own rule)."""
        caps = self.backend.capabilities
        return caps.backward and not caps.backward_reasons(self.case, self.backend.name)

    # --------------------------------------------------------------------- calling the kernel

    def allowed_writes(self) -> dict[str, torch.Tensor]:
        """Tensors a call may write, with their expected contents afterwards (an append)."""
        if self.case.entry != "kvcache" or not getattr(self.case, "seqlen_new", 0):
            return {}
        cache_after = getattr(reference, "cache_after", None)
        if cache_after is None:  # pragma: no cover - the reference always has it with appends
            return {}
        k, v = cache_after(self.inputs)
        if self.case.paged_block_size:
            return {"k_pages": k, "v_pages": v}
        return {"k": k, "v": v}

    def call(self, *, rng: str = "kernel", deterministic: bool = True, grad: bool = False,
             inputs: Inputs | None = None) -> tuple[Outputs, Inputs]:
        """One forward call on a private copy of the inputs (``inputs``, default the case's),
        with the global RNG seeded where the case has dropout (its mask draws from it; without
        dropout a kernel's own randomness must show up between calls); the copy is checked for
        modification and the result for the contract.

        Returns the outputs and the copy the kernel saw (its q, k, v are the autograd leaves
        when ``grad``).
        """
        original = inputs if inputs is not None else self.inputs
        used = clone_inputs(original)
        if grad:
            used = used.with_grad()
        if self.case.dropout_p:
            torch.manual_seed(self.rng_seed(rng))
        with kernel_errors():
            result = self.backend.forward(used, deterministic=deterministic)
        self.require_contract(result)
        self.require_unmodified(used, original)
        return result, used

    def call_backward(self, *, rng: str = "kernel",
                      deterministic: bool = True) -> Outputs:
        """Forward and backward on a fresh differentiable copy; gradients filled in."""
        result, used = self.call(rng=rng, deterministic=deterministic, grad=True)
        leaves, unpack = grad_leaves(used)
        with kernel_errors("backward: "):
            dq, dk, dv = unpack(torch.autograd.grad(result.out, leaves, self.inputs.dout))
        self.require_unmodified(used)
        return Outputs(out=result.out.detach(), lse=result.lse, dq=dq, dk=dk, dv=dv)

    def raw_output(self, inputs: Inputs, *, rng: str = "kernel") -> torch.Tensor:
        """The kernel's output on a private copy of ``inputs``, without the contract checks
        (for diagnosing a failure on altered inputs)."""
        used = clone_inputs(inputs)
        torch.manual_seed(self.rng_seed(rng))
        with torch.no_grad(), kernel_errors():
            return self.backend.forward(used).out

    def padding_read(self, ref: Outputs, allowed: float) -> str:
        """On a failure: which padding regions the kernel's output depends on (one call more
        than there are regions, :func:`harness.exact.padding.regions_read`), as a note; ''
        when none or when the inputs have no padding."""
        inputs = self.inputs
        if not inputs.padding:
            return ""
        finite = frozenset(getattr(self.backend.capabilities, "finite_padding", ()))
        try:
            found = padding.regions_read(inputs, self.raw_output, finite=finite,
                                         tolerance=allowed, valid=ref.row_mask(ref.out))
        except (KernelError, KernelRefused, KernelOutOfMemory, Unsupported):
            return ""
        if not found:
            return ""
        kind = ("finite junk" if set(found) <= finite else "NaN")
        return (f"the output depends on padding the kernel must not read (its {kind} reaches "
                f"the result: masked by multiplication, or read past the valid length): "
                f"{padding.describe(found)}")

    def require_unmodified(self, used: Inputs, original: Inputs | None = None) -> None:
        problems = modified_inputs(original if original is not None else self.inputs, used,
                                   self.allowed_writes())
        if problems:
            raise ContractViolation("inputs modified in place: " + "; ".join(problems))

    def require_contract(self, result: Any) -> None:
        problems = contract_problems(result, self.inputs, self.backend, self.case)
        if problems:
            raise ContractViolation("kernel output breaks the forward contract: "
                                    + "; ".join(problems))

    # --------------------------------------------------------------------------- one check

    def run(self, name: str) -> judge.Verdict:
        """Run one check; every outcome, including kernel errors and OOM, is a verdict."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            verdict = CHECK_FUNCTIONS[name](self)
        except Unsupported as exc:
            return judge.Verdict(name, "skip", {"refused_at_call": True}, str(exc))
        except KernelRefused as exc:
            return judge.Verdict(name, "skip", {"rejected": True},
                                 f"the kernel refused the case: {exc}")
        except KernelOutOfMemory as exc:
            return self._out_of_memory(name, str(exc))
        except KernelError as exc:
            return judge.Verdict(name, "error", {}, f"the kernel raised {exc}")
        except ContractViolation as exc:
            return judge.Verdict(name, "fail", {"contract": True}, str(exc))
        except Exception as exc:  # noqa: BLE001
            if is_oom(exc):
                return self._out_of_memory(name, f"the harness itself: {describe(exc)}")
            return judge.Verdict(name, "error", {"traceback": traceback.format_exc()[-2000:]},
                                 f"the harness failed: {describe(exc)}")
        return dataclasses.replace(verdict, metrics={**verdict.metrics, **self._memory()})

    def _out_of_memory(self, name: str, what: str) -> judge.Verdict:
        """Out of memory is a skip only when the harness's estimate says the case cannot fit;
        otherwise the allocation that failed is an error (a kernel asking for 80 GiB on a
        16-token case must not pass)."""
        _free(self.device)
        need = estimated_bytes(self.case, (name,))
        have = usable_memory(self.target)
        metrics = {"oom": True, "estimated_bytes": need, "usable_bytes": have}
        if have and need > have:
            return judge.Verdict(name, "skip", metrics,
                                 f"out of memory, as estimated ({need / 2**30:.2f} GiB needed, "
                                 f"{have / 2**30:.2f} GiB here): {what}")
        return judge.Verdict(name, "error", metrics,
                             f"out of memory on a case estimated at {need / 2**20:.1f} MiB of "
                             f"{have / 2**30:.1f} GiB available: {what}")

    def _memory(self) -> dict[str, int]:
        """Peak memory: device bytes of this check on GPUs; the worker's peak RSS on CPUs (a
        running maximum over the process, so an upper bound for this check)."""
        if self.device.type == "cuda":
            return {"peak_device_bytes": int(torch.cuda.max_memory_allocated(self.device))}
        import resource  # noqa: PLC0415 - POSIX only

        return {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


#: The name the context had before the checks became functions (tests and notebooks use it).
CaseRun = CheckContext


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
