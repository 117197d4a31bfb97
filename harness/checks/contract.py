"""The forward contract: what a kernel may do to its inputs and what it must return.

The kernel never sees the inputs the reference is computed from: every call gets a private copy
(:func:`clone_inputs`, same strides, gaps and packing), which is compared bitwise with the original
afterwards (:func:`modified_inputs`), so a kernel that writes into q, k, v (or into a kv-cache
outside the rows an append may write) fails with ``inputs modified in place`` instead of passing on
its own scribbles. What a kernel returns is held to the contract (:func:`contract_problems`: shape,
dtype, device of the output; the lse it promises).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from harness.backends.base import Backend
from harness.case import Case
from harness.exact import fp8, judge, reference
from harness.exact.inputs import TORCH_DTYPES, Inputs
from harness.exact.outputs import Outputs

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



# ------------------------------------------------------------------------------ what comes back


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
                lse_layout(lse, like)
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



def lse_layout(lse: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Kernels may pad lse's query dimension (flash-attn rounds it up); cut to the reference."""
    if lse.shape == like.shape:
        return lse
    if lse.dim() == like.dim() and all(a >= b for a, b in zip(lse.shape, like.shape, strict=True)):
        return lse[tuple(slice(0, n) for n in like.shape)]
    return lse.reshape(like.shape)
