"""Module backends: a family's API, loaded from any module, on any device.

A spec ``FAMILY@TARGET`` names an API convention (a *family*, see
:mod:`harness.backends.families`) and where to import it from: an importable module name
(``my_fork.flash_attn_interface``) or a ``.py`` file (``path/to/fa.py``). A bare ``FAMILY`` imports
the family's usual module. The module may define any subset of the family's functions: an entry
point whose function is missing is a skip with that reason. An optional module attribute
``ATTN_HARNESS_CAPABILITIES`` (a dict of :class:`~harness.backends.base.Capabilities` fields, or a
``Capabilities``) narrows what the module is asked; ``ATTN_HARNESS_FLAVOR`` names the flavor it
imitates (its capabilities then start from that flavor's).

Which device the tensors live on is the module's business: a module target is never refused
because the harness runs on the CPU.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.backends.base import Backend, BadReturn, Capabilities
from harness.case import Case
from harness.errors import UsageError

#: The module attribute that narrows what a module backend is asked.
CAPABILITIES_ATTR = "ATTN_HARNESS_CAPABILITIES"
#: The module attribute naming the flavor a module imitates (optional).
FLAVOR_ATTR = "ATTN_HARNESS_FLAVOR"


@dataclass(frozen=True)
class Convention:
    """How a family's API differs from the harness's semantics (data, read by the adapters).

    Attributes:
        layout: tensor layout of q, k, v: ``bshd`` (batch, seq, heads, dim), ``bhsd``, ``bmhk``
            (xformers' name for bshd), ``thd`` for packed varlen tokens.
        causal: ``bottom-right`` or ``top-left`` alignment of ``causal=True``.
        lse_base: ``e`` (natural log) or ``2``.
        lse_layout: dense and kv-cache lse shape, and the varlen one.
        lse_empty_rows: lse of a query row that sees no key (``+inf``, ``-inf``, or ``none`` when
            the family returns no lse); the harness excludes such rows from the lse check.
        returns: what the call returns, in the family's words.
        source: where these facts come from.
    """

    layout: str
    causal: str
    lse_base: str
    lse_layout: str
    lse_empty_rows: str
    returns: str
    source: str

    def describe(self) -> dict[str, str]:
        return {"layout": self.layout, "causal": self.causal, "lse_base": self.lse_base,
                "lse_layout": self.lse_layout, "lse_empty_rows": self.lse_empty_rows,
                "returns": self.returns}


def parse_spec(spec: str, families: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """``(family, target)`` for ``FAMILY@TARGET`` or a bare ``FAMILY``; None for anything else.

    Raises:
        UsageError: ``X@Y`` with an unknown family or an empty target.
    """
    if "@" not in spec:
        return (spec, None) if spec in families else None
    family, _, target = spec.partition("@")
    if family not in families:
        raise UsageError(f"--backend {spec}: unknown family {family!r} "
                         f"(families: {', '.join(families)}); write FAMILY@MODULE or "
                         "FAMILY@FILE.py")
    if not target.strip():
        raise UsageError(f"--backend {spec}: empty target after '@' (give a module name or "
                         "a .py file)")
    return family, target


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300] if first else type(exc).__name__


def import_file(path_text: str, spec: str) -> ModuleType:
    """Import a ``.py`` file under a name unique to its resolved path; one-line UsageErrors."""
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"--backend {spec}: no such file {path_text}")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"attn_harness_user_{path.stem}_{digest}"
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UsageError(f"--backend {spec}: cannot import {path_text} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code can raise anything
        del sys.modules[module_name]
        raise UsageError(f"--backend {spec}: importing {path_text} failed: "
                         f"{first_line(exc)}") from None
    return module


def import_target(spec: str, target: str) -> ModuleType:
    """The module a ``FAMILY@TARGET`` spec names; every failure is a one-line UsageError."""
    if target.endswith(".py"):
        return import_file(target, spec)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise UsageError(f"--backend {spec}: no such module {target!r} (give an importable "
                             "module name or a .py file)") from None
        raise UsageError(f"--backend {spec}: importing {target} failed: "
                         f"{first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the module's own code can raise anything
        raise UsageError(f"--backend {spec}: importing {target} failed: "
                         f"{first_line(exc)}") from None


def import_default(name: str) -> tuple[ModuleType | None, str]:
    """Import a family's usual module: ``(module, "")`` or ``(None, why)``."""
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # noqa: BLE001 - any import failure makes the family unavailable
        return None, first_line(exc)


def narrow(base: Capabilities, declared: Capabilities | Mapping[str, Any] | None,
           who: str) -> Capabilities:
    """``base`` narrowed by a module's declaration: sets intersect, limits tighten, flags AND.

    A declaration can only take away: claiming what the family cannot express changes nothing.
    """
    if declared is None:
        return base
    if isinstance(declared, Mapping):
        given = set(declared)
        declared = Capabilities.from_mapping(declared, f"{who}.{CAPABILITIES_ATTR}")
    elif isinstance(declared, Capabilities):
        given = {f for f in Capabilities.__dataclass_fields__}
    else:
        raise UsageError(f"{who}.{CAPABILITIES_ATTR} must be a dict of capability fields, "
                         f"got {type(declared).__name__}")
    changes: dict[str, Any] = {}
    for name in ("dtypes", "features", "entries"):
        if name in given:
            changes[name] = getattr(base, name) & getattr(declared, name)
    if "head_dim_max" in given and declared.head_dim_max:
        limits = [x for x in (base.head_dim_max, declared.head_dim_max) if x]
        changes["head_dim_max"] = min(limits)
    for name in ("head_dim_multiple", "paged_block_multiple"):
        if name in given:
            changes[name] = math.lcm(getattr(base, name), getattr(declared, name))
    for name in ("backward", "returns_lse", "deterministic_backward"):
        if name in given:
            changes[name] = getattr(base, name) and getattr(declared, name)
    if "exclusive" in given:
        changes["exclusive"] = tuple(dict.fromkeys(base.exclusive + declared.exclusive))
    if "head_dims_v" in given and declared.head_dims_v:
        changes["head_dims_v"] = declared.head_dims_v
    if "finite_padding" in given:  # asking for finite padding takes NaN away there
        changes["finite_padding"] = base.finite_padding | declared.finite_padding
    notes = dict(base.notes)
    for feature in changes.get("features", base.features) ^ base.features:
        notes[feature] = f"{feature} is not claimed by {who} ({CAPABILITIES_ATTR})"
    notes.update(declared.notes if "notes" in given else {})
    changes["notes"] = notes
    return replace(base, **changes)


@dataclass(frozen=True)
class Signature:
    """The keyword arguments a function takes (``var_kw`` when it takes ``**kwargs``)."""

    params: tuple[str, ...]
    var_kw: bool
    defaults: Mapping[str, Any]

    @classmethod
    def of(cls, func: Callable[..., Any]) -> Signature:
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):  # builtins without a signature: assume it takes all
            return cls((), True, {})
        params = tuple(sig.parameters)
        var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        defaults = {n: p.default for n, p in sig.parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return cls(params, var_kw, defaults)

    def accepts(self, name: str) -> bool:
        return self.var_kw or name in self.params

    def pick(self, *names: str) -> str | None:
        """The first of ``names`` the function takes (explicitly; ``**kwargs`` takes the first)."""
        for name in names:
            if name in self.params:
                return name
        return names[0] if self.var_kw and names else None


class ModuleBackend(Backend):
    """A family's API bound to one module.

    Subclasses set :attr:`family`, :attr:`default_module`, :attr:`entry_functions` (entry ->
    function name), :attr:`feature_keywords` (feature -> keyword(s) that express it, any one
    accepted suffices) and implement :meth:`forward`.
    """

    family = ""
    default_module = ""
    #: entry point -> the module function that serves it.
    entry_functions: Mapping[str, str] = {}
    #: case feature -> the keyword names (any one) that carry it, per entry ("*" = every entry).
    feature_keywords: Mapping[str, Mapping[str, tuple[str, ...]]] = {}
    convention: Convention | None = None

    def __init__(self, module: Any = None, target: str | None = None, *,
                 base: Capabilities | None = None, import_error: str = "") -> None:
        self.target = target
        self.name = self.family if target is None else f"{self.family}@{target}"
        self._module = module
        self._error = import_error
        if target is not None:
            self.device_types = ("cpu", "cuda")
        self.version = str(getattr(module, "__version__", "") or "") if module is not None else ""
        caps = base if base is not None else Capabilities()
        self.capabilities = self._narrowed(caps)

    # ---------------------------------------------------------------------------- helpers

    @property
    def module(self) -> Any:
        return self._module

    def function(self, entry: str) -> Callable[..., Any] | None:
        """The module's function for ``entry`` (None when it has none)."""
        name = self.entry_functions.get(entry)
        if self._module is None or name is None:
            return None
        func = getattr(self._module, name, None)
        return func if callable(func) else None

    def signature(self, entry: str) -> Signature:
        func = self.function(entry)
        return Signature.of(func) if func is not None else Signature((), False, {})

    def _narrowed(self, caps: Capabilities) -> Capabilities:
        """Entry points without a function are not claimed; the module's declaration narrows."""
        if self._module is None:
            return caps
        present = frozenset(e for e in caps.entries if self.function(e) is not None)
        caps = replace(caps, entries=present)
        declared = getattr(self._module, CAPABILITIES_ATTR, None)
        return narrow(caps, declared, self.name)

    def _no_function(self, entry: str) -> str:
        return (f"{self.name} has no {self.entry_functions.get(entry, '?')} "
                f"(the {entry} entry point)")

    def keyword_for(self, feature: str, entry: str) -> tuple[str, ...]:
        per_entry = self.feature_keywords.get(feature, {})
        return per_entry.get(entry, per_entry.get("*", ()))

    def missing_keywords(self, case: Case) -> list[str]:
        """Reasons: the case needs a feature whose keyword the entry's function does not take."""
        func = self.function(case.entry)
        if func is None:
            return []
        sig = self.signature(case.entry)
        out = []
        for feature in sorted(case.features):
            names = self.keyword_for(feature, case.entry)
            if names and not any(sig.accepts(n) for n in names):
                fname = self.entry_functions[case.entry]
                out.append(f"{self.name}: {fname} takes no {' or '.join(names)} argument, "
                           f"which {feature} needs")
        return out

    # ------------------------------------------------------------------------ the protocol

    def availability(self) -> str | None:
        if self._module is None:
            return self.unavailable_reason()
        if not any(self.function(e) is not None for e in self.entry_functions):
            names = ", ".join(dict.fromkeys(self.entry_functions.values()))
            return f"{self.name} defines none of {names}"
        return None

    def unavailable_reason(self) -> str:
        """Why the family's module is not here (subclasses refine the wording)."""
        return f"import {self.default_module} failed: {self._error}"

    def call_reasons(self, case: Case, target) -> list[str]:
        if target.device_type not in self.device_types:
            return [f"{self.name} does not run on {target.device_type} "
                    f"(runs on {', '.join(self.device_types)})"]
        if self._module is not None and case.entry in self.entry_functions \
                and self.function(case.entry) is None:
            return [self._no_function(case.entry)]
        if case.entry not in self.capabilities.entries:
            return [self.capabilities.notes.get(f"entry:{case.entry}",
                                                f"{self.name} has no {case.entry} entry point")]
        return self.missing_keywords(case)

    def unsupported_reasons(self, case: Case, target) -> list[str]:
        """Call reasons first; the generic "no entry point" line is dropped when a call reason
        already says which function is missing."""
        call = self.call_reasons(case, target)
        generic = f"{self.name} has no {case.entry} entry point"
        reasons = call + [r for r in self.capabilities.reasons(case, self.name)
                          if not (call and r == generic)]
        return list(dict.fromkeys(reasons))


def case_value(case: Case, name: str, default: Any) -> Any:
    """A case field that may not exist yet in this tree (added by parallel work)."""
    return getattr(case, name, default)


def inputs_value(inputs: Any, name: str) -> Any:
    """An Inputs attribute that may not exist yet in this tree (added by parallel work)."""
    return getattr(inputs, name, None)


def take_return(result: Any, call: str, *conventions: str) -> tuple[Any, Any]:
    """``(out, lse or None)`` from what ``call`` returned, which must be one of ``conventions``.

    A convention is written as the family documents it: ``out`` is a bare tensor; a
    parenthesised list is a tuple of exactly those items (``(out,)``, ``(out, softmax_lse)``,
    ``(out, softmax_lse, S_dmask)``), or of at least them when it ends in ``...``. ``out`` and
    an item whose name ends in ``lse`` must be tensors; other items may be anything (S_dmask is
    None without dropout). A list is never a tuple: no family returns one.

    Raises:
        BadReturn: the result is none of them; the message names what it is and what each
            convention is.
    """
    import torch

    for convention in conventions:
        names = _convention_items(convention)
        if names is None:
            if isinstance(result, torch.Tensor):
                return result, None
            continue
        if not isinstance(result, tuple):
            continue
        more = names[-1:] == ["..."]
        fixed = names[:-1] if more else names
        if len(result) < len(fixed) or (not more and len(result) != len(fixed)):
            continue
        if any((n == "out" or n.endswith("lse")) and not isinstance(result[i], torch.Tensor)
               for i, n in enumerate(fixed)):
            continue
        lse = next((result[i] for i, n in enumerate(fixed) if n.endswith("lse")), None)
        return result[0], lse
    wanted = " or ".join("out (a bare tensor)" if c == "out" else c for c in conventions)
    raise BadReturn(f"{call} returned {describe_value(result)}; expected {wanted}")


def _convention_items(convention: str) -> list[str] | None:
    """The item names of a tuple convention, or None for a bare ``out``."""
    text = convention.strip()
    if not text.startswith("("):
        return None
    return [n.strip() for n in text.strip("()").split(",") if n.strip()]


def describe_value(value: Any, *, inner: bool = False) -> str:
    """What a kernel returned, in a few words: ``tuple (Tensor[float16, (1, 16, 2, 64)],
    None)``, ``list [Tensor[...]]``, ``dict``."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"Tensor[{str(value.dtype).replace('torch.', '')}, {tuple(value.shape)}]"
    if value is None:
        return "None"
    if isinstance(value, (tuple, list)) and not inner:
        shown = [describe_value(v, inner=True) for v in value[:4]] + (["..."] if len(value) > 4
                                                                       else [])
        left, right = ("(", ")") if isinstance(value, tuple) else ("[", "]")
        comma = "," if len(value) == 1 and isinstance(value, tuple) else ""
        return f"{type(value).__name__} {left}{', '.join(shown)}{comma}{right}"
    return type(value).__name__


def same_storage(buffer: Any, *views: Any) -> bool:
    """Whether every view reads from ``buffer``'s storage (a packed layout the adapter may pass
    as the buffer itself)."""
    if buffer is None:
        return False
    try:
        ptr = buffer.untyped_storage().data_ptr()
        return all(v is not None and v.untyped_storage().data_ptr() == ptr for v in views)
    except (AttributeError, RuntimeError):
        return False

