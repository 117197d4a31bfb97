"""attn-harness: parity and throughput of attention kernels against exact softmax attention.

The vocabulary (see the design document): a :class:`~harness.case.Case` is one attention problem, a
:class:`~harness.target.Target` the machine, a backend the kernel under test, a
:class:`~harness.exact.judge.Verdict` the judgement of one check and a
:class:`~harness.results.records.Record` one line of ``results.jsonl``. Importing this package does
not import torch.
"""

__version__ = "0.1.0"
