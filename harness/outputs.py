"""What an attention computation returns: the output, its log-sum-exp and, after a backward
pass, the gradients. Kernels, the reference and the baseline all return this one type."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Outputs:
    """Tensors in the layout of the case's entry point.

    Attributes:
        out: attention output, shaped like q.
        lse: natural-log softmax normaliser per (sequence, head, query), ``(batch, heads_q,
            seqlen_q)`` for dense and kvcache, ``(heads_q, total_q)`` for varlen; ``-inf`` for
            rows that see no key. ``None`` when the kernel does not return it.
        dq, dk, dv: gradients with respect to q, k, v (``None`` before a backward pass).
    """

    out: torch.Tensor
    lse: torch.Tensor | None = None
    dq: torch.Tensor | None = None
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None

    def grads(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in (("dq", self.dq), ("dk", self.dk), ("dv", self.dv))
                if t is not None}
