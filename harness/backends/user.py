"""User kernels: any function with ``flash_attn_func``'s signature and layout.

Given as ``--backend path/to/file.py:func`` or registered by a package under the
``attn_harness.backends`` entry-point group. The function is called as::

    func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
         softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)

with ``q`` of shape ``(batch, seqlen_q, heads_q, head_dim)`` and ``k``/``v`` of shape
``(batch, seqlen_k, heads_kv, head_dim)``, and must return the output (or, with
``return_attn_probs=True``, a tuple whose first two items are the output and the log-sum-exp).
Any other return (``(out, None)``, ``[out]``, a tuple where none was asked for) fails the forward
contract with what it was.
Keyword arguments the function does not accept are not passed; a case that needs one of them
is skipped with that reason. A ``capabilities`` attribute (a dict with the fields of
:class:`~harness.backends.base.Capabilities`) narrows what it is asked to do; an ``out``
parameter, if present, receives a NaN-poisoned buffer so unwritten elements cannot pass.

Issue 26's problems are asked of a function whose signature names their keyword (not through
``**kwargs``): ``learnable_sink`` (FA4's name: float32 ``(heads_q,)`` sink logits),
``sink_token_length`` (sink tokens kept besides the window) and ``k_descale`` (an fp8 KV cache:
k and v arrive in fp8 with ``k_descale``/``v_descale`` of shape ``(batch, heads_kv)``, as FA3
takes them). A value head dim of its own (``mla``, v ``(batch, seqlen_k, heads_kv,
head_dim_v)``) and v as a view of k (``latent-kv``) need a ``capabilities`` declaration.
fp8 cases pass ``q_descale``/``k_descale``/``v_descale`` to a function that takes them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.backends.base import Backend, Capabilities
from harness.backends.module import take_return
from harness.case import Case
from harness.errors import UsageError

#: flash_attn_func keyword -> the case feature that needs it.
PARAMETER_FEATURES = {
    "dropout_p": "dropout",
    "softmax_scale": "scale",
    "causal": "causal",
    "window_size": "window",
    "softcap": "softcap",
    "alibi_slopes": "alibi",
    "learnable_sink": "sink",
    "sink_token_length": "sink-tokens",
    "k_descale": "fp8-kv",
}
#: Issue 26's keywords: a function whose signature names one is asked the problem it poses
#: (without a ``capabilities`` declaration; with one, the declaration decides).
SIGNATURE_FEATURES = {"learnable_sink": "sink", "sink_token_length": "sink-tokens",
                      "k_descale": "fp8-kv"}


def is_file_spec(spec: str) -> bool:
    path, sep, func = spec.rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(func)


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``FILE.py:FUNC``; every failure is a one-line UsageError."""
    path_text, _, func_name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"--backend {spec}: no such file {path_text} (give FILE.py:FUNC)")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"attn_harness_user_{path.stem}_{digest}"
    module = sys.modules.get(module_name)
    if module is None:
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
                             f"{type(exc).__name__}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        raise UsageError(f"--backend {spec}: {path_text} has no function {func_name!r} "
                         f"(it defines: {', '.join(names) or 'none'})")
    return func


def _require_qkv(name: str, func: Callable[..., Any], signature: inspect.Signature) -> None:
    """A function that cannot be called as ``func(q, k, v)`` is bad usage, before any case."""
    try:
        signature.bind(*"qkv")
    except TypeError as exc:
        what = getattr(func, "__name__", type(func).__name__)
        raise UsageError(f"--backend {name}: {what}{signature} cannot be called as "
                         f"{what}(q, k, v) ({exc}); give it flash_attn_func's signature, "
                         "q, k, v first") from None


class FunctionBackend(Backend):
    """A function with flash_attn_func's signature, wrapped as a backend."""

    family = "user"

    def __init__(self, name: str, func: Callable[..., Any], version: str = "") -> None:
        self.name = name
        self.func = func
        self.version = version
        self.flavor = getattr(func, "flavor", "") or ""
        declared = getattr(func, "capabilities", None)
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):  # builtins without one: assume it takes everything
            self.params, self.var_kw = set(PARAMETER_FEATURES) | {"deterministic"}, True
        else:
            self.params = set(signature.parameters)
            self.var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
            _require_qkv(name, func, signature)
        if isinstance(declared, Capabilities):
            self.capabilities = declared
        elif isinstance(declared, Mapping):
            self.capabilities = Capabilities.from_mapping(declared, f"{name}.capabilities")
        elif declared is None:
            named = {f for k, f in SIGNATURE_FEATURES.items() if k in self.params}
            base = Capabilities()
            self.capabilities = replace(base, features=base.features | named)
        else:
            raise UsageError(f"{name}.capabilities must be a dict of capability fields, "
                             f"got {type(declared).__name__}")
        self.capabilities = self._narrowed(self.capabilities)

    def _narrowed(self, caps: Capabilities) -> Capabilities:
        """Features whose keyword the function does not take are not claimed either, so
        strategies never draw them and skips say why."""
        missing = {feature: self._missing_reason(keyword, feature)
                   for keyword, feature in PARAMETER_FEATURES.items()
                   if not self._accepts(keyword) and feature in caps.features}
        if not missing:
            return caps
        return replace(caps, features=caps.features - set(missing),
                       notes={**caps.notes, **missing})

    def _missing_reason(self, keyword: str, feature: str) -> str:
        return f"{self.name} takes no {keyword} argument, which {feature} needs"

    def _accepts(self, keyword: str) -> bool:
        return self.var_kw or keyword in self.params

    def call_reasons(self, case: Case, target) -> list[str]:
        reasons = super().call_reasons(case, target)
        for keyword, feature in PARAMETER_FEATURES.items():
            if feature in case.features and not self._accepts(keyword):
                reasons.append(self._missing_reason(keyword, feature))
        return reasons

    def forward(self, inputs, *, deterministic: bool = True):
        import torch

        from harness.exact.outputs import Outputs

        case = inputs.case
        kwargs: dict[str, Any] = {}
        wanted = {
            "dropout_p": case.dropout_p,
            "softmax_scale": case.scale,
            "causal": case.causal,
            "window_size": case.window,
            "softcap": case.softcap,
            "alibi_slopes": inputs.alibi_slopes,
            "deterministic": deterministic,
        }
        if getattr(case, "learnable_sink", False):
            wanted["learnable_sink"] = inputs.learnable_sink
        if getattr(case, "sink_tokens", 0):
            wanted["sink_token_length"] = case.sink_tokens
        for name in ("q_descale", "k_descale", "v_descale"):  # fp8 inputs and fp8 KV caches
            if getattr(inputs, name, None) is not None:
                wanted[name] = getattr(inputs, name)
        for keyword, value in wanted.items():
            if self._accepts(keyword):
                kwargs[keyword] = value
        lse_wanted = self.capabilities.returns_lse and self._accepts("return_attn_probs")
        if lse_wanted:
            kwargs["return_attn_probs"] = True
        if "out" in self.params:
            kwargs["out"] = torch.full((*inputs.q.shape[:-1], case.dv), float("nan"),
                                       dtype=inputs.q.dtype, device=inputs.q.device)
        result = self.func(inputs.q, inputs.k, inputs.v, **kwargs)
        # flash_attn_func's convention: `out if not return_softmax else (out, softmax_lse, S)`
        out, lse = take_return(result, self.name, "(out, softmax_lse, ...)" if lse_wanted
                               else "out")
        return Outputs(out=out, lse=lse)
