"""What the kernel's answer is held to: the seeded inputs, the exact reference and the
same-precision baseline, the kv-cache, fp8 and dropout semantics, and the parity rule (``judge``).

Everything here is a plain function of values: a :class:`~harness.case.Case` and a seed in,
tensors and verdicts out. Nothing here knows a backend, a process or a file.
"""
