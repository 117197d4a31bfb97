"""This machine's fingerprint: the platform facts of :mod:`harness.target` and what every
backend family contributes (:func:`harness.backends.machine_facts`), joined at the edge, so the
fingerprint knows no backend and the backends know no fingerprint code."""

from __future__ import annotations

from harness.backends import machine_facts
from harness.target import Target, from_facts, probe


def detect(device_index: int = 0) -> Target:
    """The fingerprint of this machine, with the libraries its backends found."""
    facts = probe(device_index)
    facts["libraries"] = machine_facts(facts.get("torch_version_hip") or "")
    return from_facts(facts)
