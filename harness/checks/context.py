"""Running the checks of one case on one backend, in this process.

One :class:`CheckContext` per case and backend holds what the checks share, each computed once
and only when a check needs it (``functools.cached_property``): the seeded inputs, the exact
reference, the same-precision baseline, their gradients. Each check is one function registered
with :func:`check` under its name in :data:`harness.vocab.CHECKS`; it takes the context and
returns a new :class:`~harness.exact.judge.Verdict` (verdicts are built, never mutated).

The kernel never sees the inputs the reference is computed from: every call gets a private copy
(:func:`clone_inputs`, same strides, gaps and packing), which is compared bitwise with the original
afterwards, so a kernel that writes into q, k, v (or into a kv-cache outside the rows an append may
write) fails with ``inputs modified in place`` instead of passing on its own scribbles. What a
kernel returns is held to the forward contract (shape, dtype, device of the output; the lse it
promises), and every output after the judged call (the bwd check's forward, the determinism runs,
the timed calls) to the judged one (:mod:`harness.checks.ledger`). The global RNG is seeded before a
call only where the case has dropout: without dropout, a kernel's own randomness must show up as
non-determinism. Processes, files and timeouts are the runner's business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import traceback
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import torch

from harness.backends.base import Backend, BadReturn, Unsupported
from harness.case import Case
from harness.checks.ledger import FORWARD, Ledger, Mode
from harness.checks.plan import Plan, estimated_bytes, usable_memory
from harness.checks.timing import attention_control, tflops, time_functions
from harness.exact import fp8, judge, padding, reference
from harness.exact.inputs import TORCH_DTYPES, Inputs, derive_seed, make_inputs
from harness.exact.outputs import Outputs
from harness.exact.scores import Params
from harness.options import Profile
from harness.target import Target
from harness.vocab import BWD_FLOP_FACTOR, CHECK_NAMES, JUDGED

CHECK_ORDER = CHECK_NAMES
#: Above this much forward work (GFLOP) the reference is computed for a seeded sample of query
#: rows only: about half a minute of float64 on a 2-core CPU, minutes of float32 on a GPU.
EXACT_REFERENCE_GFLOP = {"cpu": 200.0, "cuda": 20000.0}
#: Query rows per sequence a sampled verdict judges (first, last and seeded others).
SAMPLED_ROWS = 256
#: Query rows per sequence kept for the jury (comparing backends with each other).
JURY_ROWS = 64


class KernelError(Exception):
    """The kernel raised on a case it claims to support."""


class KernelRefused(Exception):
    """The kernel raised ``NotImplementedError``: Python's idiomatic refusal, a skip."""


class KernelOutOfMemory(Exception):
    """The kernel ran out of memory on a case the harness estimates fits the device."""


class ContractViolation(Exception):
    """What the kernel returned (or did to its inputs) breaks the forward contract."""


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


# ---------------------------------------------------------------------------- the registry

#: check name -> its judging function ``(context) -> Verdict``.
CHECK_FUNCTIONS: dict[str, Callable[[CheckContext], judge.Verdict]] = {}


def check(name: str):
    """Register the judging function of the check ``name`` (declared in harness.vocab)."""
    from harness.vocab import CHECKS

    if name not in CHECKS:
        raise ValueError(f"check {name!r} is not declared in harness.vocab.CHECKS")

    def register(fn):
        CHECK_FUNCTIONS[name] = fn
        return fn

    return register


# ------------------------------------------------------------------------- private copies


def clone_inputs(inputs: Inputs) -> Inputs:
    """A private copy for the kernel (:meth:`Inputs.clone`: same strides, gaps and packing)."""
    return inputs.clone()


def grad_leaves(used: Inputs) -> tuple[tuple[torch.Tensor, ...], Callable]:
    """The autograd leaves of a differentiable copy (:meth:`Inputs.with_grad`) and how to read
    dq, dk, dv from their gradients. With a packed layout the leaf is the packed buffer (as for
    ``flash_attn_qkvpacked_func``, whose graph reaches only it, not the q/k/v views): each
    gradient is the packed gradient read at its view's own place in the buffer, which is right
    whichever of the two the kernel used, and shows wrong gradient strides in a kernel."""
    packed = used.packed
    names = ("q", "k", "v")
    inside = [n for n in names if packed is not None and _same_buffer(getattr(used, n), packed)]
    leaves = ((packed,) if inside else ()) + tuple(getattr(used, n) for n in names
                                                   if n not in inside)

    def unpack(grads):
        found = list(grads)
        out = {}
        if inside:
            whole = found.pop(0)
            size = packed.untyped_storage().nbytes() // packed.element_size()
            flat = whole.new_zeros(size)
            flat.as_strided(packed.shape, packed.stride(), packed.storage_offset()).copy_(whole)
            for n in inside:
                t = getattr(used, n)
                out[n] = flat.as_strided(t.shape, t.stride(), t.storage_offset()).clone()
        for n in names:
            if n not in inside:
                out[n] = found.pop(0)
        return out["q"], out["k"], out["v"]

    return leaves, unpack


def _same_buffer(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def modified_inputs(original: Inputs, used: Inputs,
                    allowed: dict[str, torch.Tensor] | None = None) -> list[str]:
    """How a kernel changed the private copy ``used`` of ``original`` (empty: not at all).

    Every tensor must be bitwise unchanged, its buffer's gaps included. ``allowed`` maps the
    names of tensors the call may write (a kv-cache under an append) to their expected contents:
    those must equal it where it differs from the original, and the original elsewhere.
    """
    allowed = allowed or {}
    problems = []
    for name, before in vars(original).items():
        if not isinstance(before, torch.Tensor):
            continue
        after = getattr(used, name).detach()
        if name in allowed:
            problem = _cache_problem(name, before, after, allowed[name])
        else:
            problem = _changed(name, before, after)
        if problem:
            problems.append(problem)
    return problems


def _changed(name: str, before: torch.Tensor, after: torch.Tensor) -> str:
    if torch.equal(_bytes(before), _bytes(after)):
        return ""
    differ = judge.bits(before) != judge.bits(after)
    if not bool(differ.any()):
        return (f"{name}: the kernel wrote into its buffer outside the tensor's elements (the "
                "gaps of a strided or packed buffer)")
    flat = int(torch.nonzero(differ.flatten())[0])
    index = tuple(judge.unravel(flat, before.shape))
    was, now = float(before.flatten()[flat]), float(after.flatten()[flat])
    return (f"{name}: {int(differ.sum())} of {before.numel()} elements changed; first at "
            f"{index} (was {was:.6g}, now {now:.6g})")


def _cache_problem(name: str, before: torch.Tensor, after: torch.Tensor,
                   expected: torch.Tensor) -> str:
    """A cache the call appends to: written rows must hold the expected values (within two ulps
    of their magnitude when the kernel computed them, e.g. rotary), all others unchanged."""
    expected = expected.to(after.device, after.dtype)
    writable = judge.bits(expected) != judge.bits(before)
    untouched = ~writable & (judge.bits(after) != judge.bits(before))
    if bool(untouched.any()):
        flat = int(torch.nonzero(untouched.flatten())[0])
        index = tuple(judge.unravel(flat, before.shape))
        return (f"{name}: {int(untouched.sum())} cache elements outside the appended rows "
                f"changed; first at {index}")
    if not bool(writable.any()):
        return ""
    a, e = after[writable].double(), expected[writable].double()
    slack = 2 * torch.finfo(after.dtype).eps * float(e.abs().max()) if after.is_floating_point() \
        else 0.0
    wrong = ~((a - e).abs() <= slack)
    if bool(wrong.any()):
        return (f"{name}: {int(wrong.sum())} of {int(writable.sum())} appended cache elements "
                f"hold wrong values (worst |diff| {float((a - e).abs().max()):.3g})")
    return ""


# ------------------------------------------------------------------------------ the context


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

    @cached_property
    def sampled_rows(self) -> list[torch.Tensor | None] | None:
        """The query rows a sampled verdict judges, or None when every row is judged."""
        limit = EXACT_REFERENCE_GFLOP[self.device.type]
        if self.case.flops_fwd() / 1e9 <= limit:
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
                worst = _max_error(a, r)
                for other in others:
                    b = getattr(other, name)
                    err = _max_error(b, r) if b is not None else -math.inf
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
            return _forward_comparisons(self, out, lse)[0]
        return _gradient_comparison(self, name, tensor)

    def _blockwise32(self, grads: bool, rows) -> Outputs:
        return reference.reference(self.exact_inputs, dtype=torch.float32, grads=grads,
                                   rows=rows, lse_convention=self.lse_convention)

    def rng_seed(self, salt: str) -> int:
        return derive_seed(self.seed, self.case.case_id, salt)

    @property
    def atol(self) -> float:
        return judge.ATOL[self.inputs.q.dtype]

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
        with _kernel_errors():
            result = self.backend.forward(used, deterministic=deterministic)
        self.require_contract(result)
        self.require_unmodified(used, original)
        return result, used

    def call_backward(self, *, rng: str = "kernel",
                      deterministic: bool = True) -> Outputs:
        """Forward and backward on a fresh differentiable copy; gradients filled in."""
        result, used = self.call(rng=rng, deterministic=deterministic, grad=True)
        leaves, unpack = grad_leaves(used)
        with _kernel_errors("backward: "):
            dq, dk, dv = unpack(torch.autograd.grad(result.out, leaves, self.inputs.dout))
        self.require_unmodified(used)
        return Outputs(out=result.out.detach(), lse=result.lse, dq=dq, dk=dk, dv=dv)

    def raw_output(self, inputs: Inputs, *, rng: str = "kernel") -> torch.Tensor:
        """The kernel's output on a private copy of ``inputs``, without the contract checks
        (for diagnosing a failure on altered inputs)."""
        used = clone_inputs(inputs)
        torch.manual_seed(self.rng_seed(rng))
        with torch.no_grad(), _kernel_errors():
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
            if _is_oom(exc):
                return self._out_of_memory(name, f"the harness itself: {_describe(exc)}")
            return judge.Verdict(name, "error", {"traceback": traceback.format_exc()[-2000:]},
                                 f"the harness failed: {_describe(exc)}")
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
        import resource

        return {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


#: The name the context had before the checks became functions (tests and notebooks use it).
CaseRun = CheckContext


def _max_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    finite = torch.isfinite(ref)
    return float(torch.where(finite, (a.double() - ref).abs(), 0).nan_to_num(0).max())


def contract_problems(result: Any, inputs: Inputs, backend: Backend, case: Case) -> list[str]:
    """How a forward result breaks the contract: an output tensor shaped like q with v's head
    dim (``head_dim_v``), of the case's dtype, on the inputs' device; the lse when the backend
    promises it (float32, reshapeable to the reference's layout)."""
    if not isinstance(result, Outputs):
        return [f"the backend returned {type(result).__name__}, not Outputs"]
    out = result.out
    if not isinstance(out, torch.Tensor):
        return [f"the output is {type(out).__name__}, not a tensor"]
    problems = []
    expected = (*inputs.q.shape[:-1], case.dv)  # q's rows, v's head dim
    if tuple(out.shape) != expected:
        problems.append(f"output shape {tuple(out.shape)}, expected {expected}")
    want = output_dtype(case, backend)
    if out.dtype != want:
        problems.append(f"output dtype {str(out.dtype).replace('torch.', '')}, expected "
                        f"{str(want).replace('torch.', '')}")
    if out.device != inputs.q.device:
        problems.append(f"output on device {out.device}, expected {inputs.q.device}")
    promises = getattr(backend, "returns_lse_for", None)
    returns_lse = promises(case) if callable(promises) else backend.capabilities.returns_lse
    if returns_lse and not case.dropout_p:
        lse = result.lse
        if lse is None:
            problems.append(f"{backend.name} promises the log-sum-exp (returns_lse) but "
                            "returned none")
        elif not isinstance(lse, torch.Tensor):
            problems.append(f"the lse is {type(lse).__name__}, not a tensor")
        elif lse.dtype != torch.float32:
            problems.append(f"lse dtype {str(lse.dtype).replace('torch.', '')}, expected float32")
        elif lse.device != inputs.q.device:
            problems.append(f"lse on device {lse.device}, expected {inputs.q.device}")
        else:
            like = reference.empty_lse(case, "meta", torch.float32)
            try:
                _lse_layout(lse, like)
            except RuntimeError:
                problems.append(f"lse shape {tuple(lse.shape)} does not fit "
                                f"{tuple(like.shape)}")
    return problems


def output_dtype(case: Case, backend: Backend) -> torch.dtype:
    """The dtype a kernel must return for ``case``: the case's own, unless the backend declares
    another output dtype for it (fp8 kernels return bf16 or fp32)."""
    declared = getattr(backend, "output_dtype", None)
    if callable(declared):
        chosen = declared(case)
        if chosen is not None:
            return chosen
    if fp8.is_fp8(case.dtype):  # the case says what the kernel returns (bf16 FA3, fp32 AITER)
        return TORCH_DTYPES[case.fp8_out]
    return TORCH_DTYPES[case.dtype]


# -------------------------------------------------------------------------------- checks


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
    comparisons = _forward_comparisons(ctx, result.out, result.lse)
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
                  f"all rows is over {EXACT_REFERENCE_GFLOP[ctx.device.type]:g} GFLOP here; see "
                  "the jury for the kernels' agreement)")
        reason = "; ".join(x for x in (reason, prefix) if x)
    if ctx.jury_dir:
        from harness.results.jury import save_rows

        chosen = rows or reference.sample_rows(ctx.inputs, JURY_ROWS, ctx.rng_seed("jury-rows"))
        save_rows(ctx.jury_dir, ctx.case, ctx.backend.name, ctx.inputs, chosen, result.out, ref,
                  allowed, metrics["verdict_kind"])
    return judge.Verdict("fwd", verdict.status, metrics, reason)


def _forward_comparisons(ctx: CheckContext, out: torch.Tensor | None,
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
        comparisons.append(judge.compare("lse", _lse_layout(lse, ref.lse), base.lse, ref.lse,
                                         k=judge.K_OUT, atol=ctx.atol,
                                         valid=torch.isfinite(ref.lse),
                                         slack=slack and slack.lse))
    return comparisons


def _gradient_comparison(ctx: CheckContext, name: str, grad: torch.Tensor) -> judge.Comparison:
    """``grad`` (dq, dk or dv) judged as the bwd check judges it."""
    ref, base, slack = ctx.reference_grads, ctx.baseline_grads, ctx.score_slack_grads
    return judge.compare(name, grad, getattr(base, name), getattr(ref, name), k=judge.K_GRAD,
                         atol=ctx.atol, slack=slack and getattr(slack, name))


def _fp8_fwd(ctx: CheckContext, result: Outputs, ref: Outputs, base: Outputs) -> judge.Verdict:
    """FA3's rule for fp8 (:func:`harness.exact.fp8.fp8_verdict`): against a baseline that emulates
    an fp8 kernel (fp8 inputs, P rounded to fp8 before P V, fp32 accumulation), plus the mean rule,
    the lse, and the cosine similarity AITER's tests use."""
    lse = _lse_layout(result.lse, ref.lse) if result.lse is not None else None
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
    comparisons = [_gradient_comparison(ctx, name, getattr(result, name))
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


@check("determinism")
def check_determinism(ctx: CheckContext) -> judge.Verdict:
    """Identical inputs (and seed, where the case has dropout), called with ``deterministic=True``:
    the forward must repeat bitwise; the backward too where the kernel promises it, over the
    profile's repeat count (flash-attn's race-condition test repeats 250 times). Every run is also
    held to the judged calls (:mod:`harness.checks.ledger`): a forward-only run bitwise to the fwd
    check's output, a run with a backward by the parity rule where it is not bitwise the judged
    output (the judged calls were made without autograd, or with ``deterministic=False``)."""
    caps = ctx.backend.capabilities
    backward = has_backward(ctx)
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


def has_backward(ctx: CheckContext) -> bool:
    """Whether the case's backward can be taken on this backend (the bwd check's own rule)."""
    caps = ctx.backend.capabilities
    return caps.backward and not caps.backward_reasons(ctx.case, ctx.backend.name)


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
    if has_backward(ctx):
        # One set of leaves for both timings: copying fresh inputs inside the timed call
        # would add a copy of q, k and v to every forward+backward.
        leaves_from = used.with_grad()
        with _kernel_errors():
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
    with _kernel_errors():
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


# ------------------------------------------------------------------------ feature effects


def feature_effects(ctx: CheckContext) -> dict[str, float]:
    """For each feature the case turns on, how much removing it changes the reference."""
    ref = ctx.reference.out
    return {name: float((other - ref).abs().max())
            for name, other in feature_variants(ctx).items()}


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
    for name, other in feature_variants(ctx).items():
        if not effects.get(name, 0.0) > allowed:
            continue  # inert: equal to both, it tells nothing
        diff = _max_error(out, other)
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


def feature_variants(ctx: CheckContext) -> dict[str, torch.Tensor]:
    """For each feature the case turns on, the exact output without it (computed once per
    context)."""
    cached = getattr(ctx, "_feature_variants", None)
    if cached is not None:
        return cached
    case = ctx.case
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
    outs = {name: reference.reference(ctx.exact_inputs, params=params, alibi=alibi).out
            for name, (params, alibi) in variants.items()}
    if case.learnable_sink:
        outs["sink"] = reference.reference(ctx.exact_inputs, sink=False).out
    ctx._feature_variants = outs
    return outs


# -------------------------------------------------------------------------------- dropout


def _dropout(ctx: CheckContext, check_name: str) -> judge.Verdict:
    """Dropout judged exactly where the kernel's mask is a function of the seed and the case is
    small enough (:mod:`harness.exact.dropout`: D(P) recovered from calls with V = identity blocks,
    the backward judged with that D fixed); statistically otherwise, and the record says why."""
    from harness.exact import dropout

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
    allowed = judge.K_OUT * _max_error(base, ref) + ctx.atol
    diff = _max_error(result.out, ref)
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


# ---------------------------------------------------------------------------------- helpers

#: Dtypes the device peak table (dense fp16/bf16 tensor throughput) is a fair yardstick for.
PEAK_DTYPES = ("float16", "bfloat16")


def peak_for_dtype(target: Target, dtype: str) -> float | None:
    """The dense peak a case of ``dtype`` is measured against on ``target``: the fp16/bf16
    figure for 16-bit cases, the table's fp8 figure for fp8 cases (None where none is
    recorded), none for float32 (attention's float32 runs off the tensor cores' peak)."""
    if dtype in PEAK_DTYPES:
        return target.peak_tflops or None
    if dtype in fp8.FP8_DTYPES and target.device_name:
        from harness.target import peak_for

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


@contextlib.contextmanager
def _kernel_errors(prefix: str = ""):
    """What a kernel call raises is the kernel's: a refusal (:class:`Unsupported`) passes
    through, a return that is not the family's convention (:class:`BadReturn`) breaks the
    contract (:class:`ContractViolation`), ``NotImplementedError`` is a refusal too
    (:class:`KernelRefused`), out-of-memory is :class:`KernelOutOfMemory`, anything else
    :class:`KernelError`."""
    try:
        yield
    except Unsupported:
        raise
    except BadReturn as exc:
        raise ContractViolation(f"kernel output breaks the forward contract: {exc}") from None
    except NotImplementedError as exc:
        raise KernelRefused(prefix + _describe(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - every kernel failure becomes a record
        if _is_oom(exc):
            raise KernelOutOfMemory(prefix + _describe(exc)) from exc
        raise KernelError(prefix + _describe(exc)) from exc


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
