"""The backend registry: built-in families, module backends, user files and entry-point plugins.

A backend spec on the command line is one of

* a built-in name: ``flash-attn``, ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``,
  ``sdpa-math``, and the other families' bare names (``flash-attn3``, ``aiter``,
  ``vllm-flash-attn``, ``xformers``, ``flex-attention``), each importing its usual module;
* ``FAMILY@TARGET``: a family's API loaded from a module name or a ``.py`` file
  (:mod:`harness.backends.module`), run on whatever device the module uses;
* ``FILE.py:FUNC``, a function with ``flash_attn_func``'s signature;
* the name of an ``attn_harness.backends`` entry point, whose object is a :class:`Backend`
  instance or subclass, or a function with ``flash_attn_func``'s signature.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from harness.backends.base import Backend, Capabilities, Unsupported
from harness.backends.families import BARE, FAMILIES, Family
from harness.backends.families import machine_facts as _family_facts
from harness.backends.module import import_target
from harness.backends.sdpa import SdpaBackend
from harness.backends.user import FunctionBackend, is_file_spec, load_function
from harness.errors import UsageError

__all__ = ["Backend", "Capabilities", "Unsupported", "BUILTIN", "FAMILIES", "Family",
           "load_backend", "known_backends", "entry_point_names", "machine_facts",
           "family_listing", "spec_problem"]

ENTRY_POINT_GROUP = "attn_harness.backends"


def _sdpa(name: str) -> Callable[[], Backend]:
    def make() -> Backend:
        return SdpaBackend(name)

    return make


def _family(name: str) -> Callable[[], Backend]:
    def make() -> Backend:
        return FAMILIES[name].make()

    return make


#: Built-in backends in the order ``info`` lists them (flash-attn and SDPA first, as before).
BUILTIN: dict[str, Callable[[], Backend]] = {
    "flash-attn": _family("flash-attn"),
    "sdpa-flash": _sdpa("sdpa-flash"),
    "sdpa-efficient": _sdpa("sdpa-efficient"),
    "sdpa-cudnn": _sdpa("sdpa-cudnn"),
    "sdpa-math": _sdpa("sdpa-math"),
    **{name: _family(name) for name in BARE if name != "flash-attn"},
}


def _entry_points() -> list[metadata.EntryPoint]:
    try:
        return list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    except TypeError:  # pragma: no cover - Python < 3.10 API
        return list(metadata.entry_points().get(ENTRY_POINT_GROUP, []))


def entry_point_names() -> list[str]:
    return sorted(ep.name for ep in _entry_points())


def _module_spec(spec: str) -> tuple[str, str] | None:
    """``(family, target)`` when ``spec`` is ``FAMILY@TARGET`` with a known family."""
    family, sep, target = spec.partition("@")
    if sep and family in FAMILIES:
        return family, target
    return None


def spec_problem(spec: str) -> str:
    """What can be said about a spec without importing anything heavy ('' when it looks fine).

    For the pytest plugin's configure-time check: built-ins, entry points, ``FILE.py:FUNC`` with
    an existing file, ``FAMILY@MODULE`` and ``FAMILY@FILE.py`` with an existing file.
    """
    if spec in BUILTIN or spec in entry_point_names():
        return ""
    if "@" in spec:
        family, _, target = spec.partition("@")
        if family not in FAMILIES:
            return (f"--backend {spec}: unknown family {family!r} "
                    f"(families: {', '.join(BARE)})")
        if not FAMILIES[family].module_targets:
            return (f"--backend {spec}: family {family!r} takes no module target "
                    "(use sdpa-math, sdpa-flash, ...)")
        if not target.strip():
            return f"--backend {spec}: empty target after '@' (give a module name or a .py file)"
        if target.endswith(".py"):
            return "" if Path(target).is_file() else f"--backend {spec}: no such file {target}"
        top = target.split(".")[0]
        try:  # the top-level package only: finding it imports nothing
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return (f"--backend {spec}: no such module {target!r} (give an importable module "
                    "name or a .py file)")
        return ""
    if is_file_spec(spec):
        path = spec.rpartition(":")[0]
        return "" if Path(path).is_file() else f"--backend {spec}: no such file {path}"
    known = ", ".join([*BUILTIN, *entry_point_names()])
    return (f"--backend {spec}: unknown backend (known: {known}; or FILE.py:FUNC, or "
            "FAMILY@MODULE / FAMILY@FILE.py)")


def load_backend(spec: str) -> Backend:
    """Resolve a backend spec (see the module docstring); UsageError if it names nothing."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    parsed = _module_spec(spec)
    if parsed is not None:
        problem = spec_problem(spec)
        if problem:
            raise UsageError(problem)
        family, target = parsed
        return FAMILIES[family].make(import_target(spec, target), target)
    if is_file_spec(spec):
        return FunctionBackend(spec, load_function(spec))
    for ep in _entry_points():
        if ep.name == spec:
            return _from_entry_point(ep)
    if "@" in spec:
        raise UsageError(spec_problem(spec))
    known = list(BUILTIN) + entry_point_names()
    raise UsageError(f"--backend {spec}: unknown backend (known: {', '.join(known)}; "
                     "or give FILE.py:FUNC or FAMILY@MODULE)")


def _from_entry_point(ep: metadata.EntryPoint) -> Backend:
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
    """Every backend name this machine knows: built-ins (one or more per family), then plugins."""
    return list(BUILTIN) + entry_point_names()


def family_listing() -> list[dict[str, str]]:
    """One row per family: name, default module, the built-in specs that use it, summary."""
    rows = []
    for name, family in FAMILIES.items():
        specs = [s for s in BUILTIN if s == name or (name == "sdpa" and s.startswith("sdpa-"))]
        rows.append({"family": name, "default_module": family.default_module,
                     "specs": ", ".join(specs),
                     "module_targets": "yes" if family.module_targets else "no",
                     "summary": family.summary})
    return rows


def machine_facts(hip: str | None = None) -> dict[str, str]:
    """The facts every family contributes to the machine fingerprint, without importing any
    kernel package: ``flash_attn``, ``flash_attn_flavor``, ``sdpa_rocm_library`` (ROCm),
    ``flash_attn_3``, ``aiter``, ``vllm``, ``xformers`` (each only when present).

    Args:
        hip: ``torch.version.hip`` ('' for CUDA/CPU torch); read from torch when None.
    """
    return _family_facts(hip)
