"""Running many cases safely: the worker processes, the session both front ends share, the
devices, this machine's fingerprint, and exploration with its strategies."""
