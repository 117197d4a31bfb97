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
        rows: for row-sampled results, a boolean mask over q's row dims (``(batch, seqlen_q)``
            or ``(total_q,)``) of the query rows computed; ``None`` when all were.
    """

    out: torch.Tensor
    lse: torch.Tensor | None = None
    dq: torch.Tensor | None = None
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def row_mask(self, like: torch.Tensor) -> torch.Tensor | None:
        """``rows`` (a boolean mask over q's row dims: which query rows were computed, None for
        all) broadcast to the shape of ``like``, a q-shaped tensor."""
        if self.rows is None:
            return None
        extra = like.dim() - self.rows.dim()
        return self.rows.view(*self.rows.shape, *([1] * extra)).expand_as(like)

    def grads(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in (("dq", self.dq), ("dk", self.dk), ("dv", self.dv))
                if t is not None}
