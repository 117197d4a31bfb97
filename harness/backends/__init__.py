"""The backend registry: built-in families, user files and entry-point plugins.

A backend spec on the command line is one of

* a built-in name: ``flash-attn``, ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``,
  ``sdpa-math``;
* ``FILE.py:FUNC``, a function with ``flash_attn_func``'s signature;
* the name of an ``attn_harness.backends`` entry point, whose object is a :class:`Backend`
  instance or subclass, or a function with ``flash_attn_func``'s signature.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

from harness.backends.base import Backend, Capabilities, Unsupported
from harness.errors import UsageError

__all__ = ["Backend", "Capabilities", "Unsupported", "BUILTIN", "load_backend", "known_backends",
           "entry_point_names"]

ENTRY_POINT_GROUP = "attn_harness.backends"


def _sdpa(name: str) -> Callable[[], Backend]:
    def make() -> Backend:
        from harness.backends.sdpa import SdpaBackend

        return SdpaBackend(name)

    return make


def _flash_attn() -> Backend:
    from harness.backends.flash_attn import FlashAttnBackend

    return FlashAttnBackend()


#: Built-in backends in the order ``info`` lists them.
BUILTIN: dict[str, Callable[[], Backend]] = {
    "flash-attn": _flash_attn,
    "sdpa-flash": _sdpa("sdpa-flash"),
    "sdpa-efficient": _sdpa("sdpa-efficient"),
    "sdpa-cudnn": _sdpa("sdpa-cudnn"),
    "sdpa-math": _sdpa("sdpa-math"),
}


def _entry_points() -> list[metadata.EntryPoint]:
    try:
        return list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    except TypeError:  # pragma: no cover - Python < 3.10 API
        return list(metadata.entry_points().get(ENTRY_POINT_GROUP, []))


def entry_point_names() -> list[str]:
    return sorted(ep.name for ep in _entry_points())


def load_backend(spec: str) -> Backend:
    """Resolve a backend spec (see the module docstring); UsageError if it names nothing."""
    from harness.backends.user import FunctionBackend, is_file_spec, load_function

    if spec in BUILTIN:
        return BUILTIN[spec]()
    if is_file_spec(spec):
        return FunctionBackend(spec, load_function(spec))
    for ep in _entry_points():
        if ep.name == spec:
            return _from_entry_point(ep)
    known = list(BUILTIN) + entry_point_names()
    raise UsageError(f"--backend {spec}: unknown backend (known: {', '.join(known)}; "
                     "or give FILE.py:FUNC)")


def _from_entry_point(ep: metadata.EntryPoint) -> Backend:
    from harness.backends.user import FunctionBackend

    try:
        obj = ep.load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the harness down
        raise UsageError(f"--backend {ep.name}: loading entry point {ep.value} failed: "
                         f"{type(exc).__name__}: {exc}") from None
    if isinstance(obj, type) and issubclass(obj, Backend):
        obj = obj()
    if isinstance(obj, Backend):
        if not obj.name:
            obj.name = ep.name
        obj.family = obj.family or "plugin"
        return obj
    if callable(obj):
        version = ep.dist.version if getattr(ep, "dist", None) else ""
        backend = FunctionBackend(ep.name, obj, version=version)
        backend.family = "plugin"
        return backend
    raise UsageError(f"--backend {ep.name}: entry point {ep.value} is neither a Backend nor a "
                     "function")


def known_backends() -> list[str]:
    """Every backend name this machine knows: built-ins, then registered plugins."""
    return list(BUILTIN) + entry_point_names()
