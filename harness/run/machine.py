"""Probing this machine: :func:`detect` reads the platform facts (:func:`harness.target.probe`)
and every backend family's library facts (:func:`harness.backends.machine_facts`) and joins them
into the :class:`~harness.target.Target` value, so the value knows no backend and the backends
know no fingerprint code."""

from __future__ import annotations

from harness.backends import machine_facts
from harness.target import Target, from_facts, probe


def detect(device_index: int = 0) -> Target:
    """The fingerprint of this machine, with the libraries its backends found."""
    facts = probe(device_index)
    facts["libraries"] = machine_facts(facts.get("torch_version_hip") or "")
    return from_facts(facts)
