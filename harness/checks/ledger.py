"""Every output a kernel gives the harness, held to the judged one.

The fwd and bwd checks judge one call each. A kernel whose later calls differ from its first
(an autotuner that switches to a broken configuration after warm-up, a workspace or semaphore
not reset between calls, a cache keyed on the wrong thing, a graph replayed with stale
pointers) would pass them while computing something else on every call a user makes. So every
later output the harness obtains (the bwd check's forward, each determinism run, the last timed
call of each timed pass) is held to what was judged, tensor by tensor:

* **bitwise**, against the first output of the same tensor obtained the same way (the *mode*:
  with or without autograd, ``deterministic`` or not), where the kernel promises to repeat: the
  forward (out, lse) under ``deterministic=True`` always (the determinism check's rule), the
  gradients where the backend also promises a deterministic backward
  (``Capabilities.deterministic_backward``). The fwd check's call is the first of its mode, so
  a timed forward must be that call's output bit for bit;
* otherwise **by the parity rule**: a tensor that is not bitwise the judged one is judged itself
  against the reference the judged check used (computed once, never again).

A tensor whose judged call already failed is not held (its failure is reported there), nor one
no check judged (there is nothing to hold it to but the other runs, which the determinism check
compares). The ledger knows no torch beyond comparing bits; the parity rule is the caller's
(:class:`~harness.checks.CheckContext`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from harness.exact import judge

#: The tensors of a forward call; the rest (dq, dk, dv) are gradients.
FORWARD_TENSORS = ("out", "lse")


@dataclass(frozen=True)
class Mode:
    """How a call was made: under autograd or not, with ``deterministic`` True or False."""

    grad: bool
    deterministic: bool


#: The fwd check's call (and the throughput check's timed forward).
FORWARD = Mode(grad=False, deterministic=True)


@dataclass(frozen=True)
class Entry:
    """A tensor the ledger holds others to: where it came from and whether its check passed."""

    tensor: torch.Tensor
    where: str
    passed: bool = True


class Ledger:
    """The judged tensors of one case on one backend, and the first of each mode.

    Args:
        deterministic_backward: the backend promises bitwise repeatable gradients under
            ``deterministic=True``.
        parity: ``(name, tensor) -> Comparison`` judging a tensor against the reference its
            judged check used; only called for tensors a check judged.
    """

    def __init__(self, deterministic_backward: bool,
                 parity: Callable[[str, torch.Tensor], judge.Comparison | None]) -> None:
        self.deterministic_backward = deterministic_backward
        self.parity = parity
        #: tensor name -> the judged call's tensor
        self.judged: dict[str, Entry] = {}
        #: (tensor name, mode) -> the first such tensor obtained
        self.first: dict[tuple[str, Mode], Entry] = {}

    def promised(self, name: str, mode: Mode) -> bool:
        """Whether ``name`` must repeat bit for bit between calls made in ``mode``."""
        return mode.deterministic and (name in FORWARD_TENSORS or self.deterministic_backward)

    def judge(self, name: str, tensor: torch.Tensor | None, mode: Mode, *, passed: bool,
              where: str) -> None:
        """Record the tensor a check judged (a private copy: a kernel may reuse its buffer)."""
        if tensor is None:
            return
        entry = Entry(tensor.detach().clone(), where, passed)
        self.judged[name] = entry
        self.first.setdefault((name, mode), entry)

    def hold(self, where: str, tensors: Mapping[str, torch.Tensor | None], mode: Mode, *,
             repeats_checked: bool = False, private: bool = False) -> list[str]:
        """How ``tensors``, obtained in ``mode``, fall short of the judged ones (empty: not).

        Args:
            where: the call, for messages (``determinism run 2``, ``timed fwd call``).
            tensors: name -> tensor (None entries are ignored).
            mode: how the call was made.
            repeats_checked: the caller compares promised tensors bitwise with the first of
                their mode itself (the determinism check's runs); only the parity rule applies.
            private: the tensors are the caller's own copies, which no later call can
                overwrite (kept as they are, not copied, when first of their mode).
        """
        problems = []
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            problem = self._held(where, name, tensor.detach(), mode, repeats_checked, private)
            if problem:
                problems.append(problem)
        return problems

    def _held(self, where: str, name: str, tensor: torch.Tensor, mode: Mode,
              repeats_checked: bool, private: bool) -> str:
        judged = self.judged.get(name)
        if judged is not None and not judged.passed:
            return ""  # wrong already on the judged call: reported by its check
        first = self.first.get((name, mode))
        if first is None:
            if self.promised(name, mode):  # what later calls in this mode must repeat
                self.first[(name, mode)] = Entry(tensor if private else tensor.clone(), where)
        elif self.promised(name, mode):
            if repeats_checked or same_bits(first.tensor, tensor):
                return ""
            n, worst = judge.bitwise_diff(first.tensor, tensor)
            if n:
                return (f"{where}: {name} is not bitwise the {first.where}'s ({n} of "
                        f"{tensor.numel()} elements differ, max |diff| {worst:.3g}), which "
                        "the kernel promises to repeat")
            return ""
        if judged is None or judged.tensor.shape != tensor.shape:
            return ""
        if same_bits(judged.tensor, tensor):
            return ""
        comparison = self.parity(name, tensor)
        if comparison is None or comparison.ok:
            return ""
        return (f"{where}: {name} is not the {judged.where}'s, and fails the parity rule: "
                f"{comparison.message()}")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bits (NaN payloads and signed zeros included), without
    copying either: a same-width integer view keeps the strides."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(width), b.view(width))
