"""FlexAttention (``torch.nn.attention.flex_attention``) as a family, ``flex-attention``.

Call convention (pytorch/pytorch ``torch/nn/attention/flex_attention.py``):
``flex_attention(q, k, v, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
return_lse=False)`` on BHSD tensors (newer torch also ``return_aux=AuxRequest(lse=True)``;
``return_lse`` is used where ``return_aux`` does not exist, e.g. older torch). Masks are
``create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN)`` objects; the adapter writes flash-attn's
bottom-right causal and local windows as a ``mask_mod`` and softcap and ALiBi (after softcap) as
a ``score_mod``. Varlen packs the sequences into one of batch 1 with a document mask. Rows that
see no key come back as zeros; the lse is natural-log, ``(batch, heads_q, seqlen_q)``.

Eager ``flex_attention`` is a debug path (torch warns it may be slow and wrong), so the built-in
backend calls ``torch.compile(flex_attention, dynamic=True)``: the mods read every number from
captured tensors, so cases that differ in sequence lengths and windows can share a graph (torch
still specializes the head count, sizes of 1, and two sizes that are equal); with Python ints
captured instead, torch 2.13's CPU lowering failed (``'Mul' object has no attribute
'get_name'``, a C++ compile error). Where a dynamic compile fails anyway (torch 2.13's CPU
template with a varlen document mask at some sizes, b3 q64 h4 d64 but not b2 q28: C++ naming an
undeclared ``cur_qSplitSize7``), that case falls back to a static graph, and every other case
still tries dynamic first. Each case is compiled as in a fresh process (dynamo is reset when
the case changes). Otherwise what torch compiles for a case depends on the cases before it
(sizes seen earlier are symbols of their own, sizes first seen together share one; a failed
dynamic compile sent every later case to static graphs), so a replay of one case compiled
another graph than the run that failed, and graphs compiled ahead in another process
(:mod:`harness.run.warmup`) were not the run's. On
the CPU torch's inductor supports inference only and no lse (``torch/_inductor/kernel/flex/
flex_cpu.py``: "torch.compile on CPU only supports inference and `return_lse` is not supported
yet"), so there the backend claims no backward and returns no lse.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Any

from harness.backends.base import Capabilities, Unsupported
from harness.backends.module import (
    Convention,
    ModuleBackend,
    Signature,
    first_line,
    import_default,
    take_return,
)
from harness.case import Case

CONVENTION = Convention(
    layout="BHSD (varlen: batch 1 with a document mask)",
    causal="none built in: the adapter's mask_mod is bottom-right",
    lse_base="e",
    lse_layout="(batch, heads_q, seqlen_q); varlen (heads_q, total_q) after unpacking",
    lse_empty_rows="-inf",
    returns="out, (out, lse) with return_lse=True, or (out, AuxOutput) with return_aux",
    source="pytorch/pytorch torch/nn/attention/flex_attention.py",
)

#: Issue 26: a value head dim of its own (flex_attention takes value (B, Hkv, S, Ev)), v as a
#: view of k, and sink tokens in the mask_mod; a learnable sink has no parameter.
_FEATURES = frozenset({"causal", "window", "softcap", "alibi", "alibi-per-batch", "gqa",
                       "scale", "strided", "seqlen_q>seqlen_k", "packed", "v-transposed",
                       "mla", "latent-kv", "sink-tokens"})
_CPU_REASON = ("torch.compile on CPU only supports inference and `return_lse` is not supported "
               "yet (torch/_inductor/kernel/flex/flex_cpu.py)")

FLAVOR_CAPABILITIES: dict[str, Capabilities] = {
    # torch/nn/attention/flex_attention.py: no dropout argument, no kv-cache entry of
    # flash-attn's shape (paged attention is a separate helper, not posed here).
    "cuda": Capabilities(
        dtypes=frozenset({"float16", "bfloat16", "float32"}), features=_FEATURES,
        entries=frozenset({"dense", "varlen"}), backward=True, returns_lse=True,
        notes={"dropout": "flex_attention has no dropout",
               "paged": "the flex-attention adapter poses no paged KV cache",
               "sink": "flex_attention has no learnable sink (score_mod cannot add a logit to "
                       "the denominator)"},
    ),
}
FLAVOR_CAPABILITIES["cpu"] = replace(
    FLAVOR_CAPABILITIES["cuda"], backward=False, returns_lse=False,
    notes={**FLAVOR_CAPABILITIES["cuda"].notes, "backward": _CPU_REASON})
FLAVOR_CAPABILITIES["module"] = FLAVOR_CAPABILITIES["cuda"]
#: Masks and score functions kept per backend (each pins a compiled graph's guards).
MASK_CACHE_SIZE = 64


def _recompile_patch() -> dict[str, int]:
    """Dynamo's recompile limits raised for the compiled flex function (one graph per shape
    and mask; the default limit of 8 would send later shapes to the eager debug path). The
    names changed across torch versions (``cache_size_limit`` -> ``recompile_limit``)."""
    import torch._dynamo.config as config

    out = {}
    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                        ("accumulated_recompile_limit", 8192),
                        ("accumulated_cache_size_limit", 8192)):
        if hasattr(config, name):
            out[name] = value
    return out


class FlexAttentionBackend(ModuleBackend):
    """torch's flex_attention, compiled, with bottom-right block masks."""

    family = "flex-attention"
    default_module = "torch.nn.attention.flex_attention"
    entry_functions = {"dense": "flex_attention", "varlen": "flex_attention"}
    feature_keywords = {"softcap": {"*": ("score_mod",)}, "alibi": {"*": ("score_mod",)},
                        "gqa": {"*": ("enable_gqa",)}, "scale": {"*": ("scale",)}}
    convention = CONVENTION

    def __init__(self, module: Any = None, target: str | None = None,
                 device_type: str | None = None) -> None:
        import torch

        error = ""
        if module is None and target is None:
            module, error = import_default(self.default_module)
        self.device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        flavor = "module" if target is not None else self.device_type
        super().__init__(module, target, base=FLAVOR_CAPABILITIES[flavor], import_error=error)
        self.flavor = flavor if module is not None else ""
        self.version = torch.__version__ if target is None else self.version
        self._compiled: dict[bool, Any] = {}
        #: the case whose graphs dynamo holds (reset when another case comes)
        self._case_id = ""
        #: torch's own flex_attention is compiled here; a module's is called as given
        self.compiles_per_structure = target is None
        #: Why dynamic-shape compilation was given up for a static graph, if it was: the first
        #: failure's reason; the cases it was given up for (their ids).
        self.dynamic_failure = ""
        self._static: set[str] = set()
        self._masks: dict[Any, Any] = {}

    def unavailable_reason(self) -> str:
        import torch

        return (f"torch {torch.__version__} has no torch.nn.attention.flex_attention "
                f"(torch >= 2.5; {self._error})")

    def availability(self) -> str | None:
        import torch

        reason = super().availability()
        if reason is not None or self.target is not None:
            return reason
        if self.device_type == "cpu":
            release = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
            if release < (2, 6):
                return f"torch {torch.__version__} has no CPU FlexAttention (torch >= 2.6)"
            if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
                return ("no C++ compiler here: torch.compile's CPU backend (inductor) needs one "
                        "to compile flex_attention")
        return None

    # ------------------------------------------------------------------------------ calling

    def _function(self, dynamic: bool):
        """The flex_attention to call: torch's own compiled (dynamic shapes first, static when
        dynamic compilation failed here), a module's as given."""
        flex = self._module.flex_attention
        if self.target is not None:
            return flex
        if dynamic not in self._compiled:
            import torch

            self._compiled[dynamic] = torch.compile(flex, dynamic=dynamic)
        return self._compiled[dynamic]

    def _mods(self, case: Case, slopes, device) -> tuple[Any, Any]:
        """``(score_mod, block_mask)`` for ``case``, cached so compiled graphs are reused."""
        key = (case.entry, case.batch, case.seqlen_q, case.seqlen_k, case.seqlens_q,
               case.seqlens_k, case.mask_window, case.sink_tokens, case.softcap,
               None if slopes is None else tuple(slopes.flatten().tolist()), str(device))
        if key not in self._masks:
            if len(self._masks) >= MASK_CACHE_SIZE:  # oldest first: exploration draws many
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = build_mods(self._module, case, slopes, device)
        return self._masks[key]

    def forward(self, inputs, *, deterministic: bool = True):

        from harness.exact.outputs import Outputs

        case = inputs.case
        if self.target is None and case.case_id != self._case_id:
            import torch

            torch._dynamo.reset()  # this case's graph, as a fresh process compiles it
            self._case_id = case.case_id
        if case.entry == "varlen":
            q, k, v = (t[None].transpose(1, 2) for t in (inputs.q, inputs.k, inputs.v))
        else:
            q, k, v = (t.transpose(1, 2) for t in (inputs.q, inputs.k, inputs.v))
        score_mod, block_mask = self._mods(case, inputs.alibi_slopes, q.device)
        kwargs: dict[str, Any] = {"score_mod": score_mod, "block_mask": block_mask,
                                  "scale": case.scale}
        if case.heads_kv != case.heads_q:
            kwargs["enable_gqa"] = True
        want_lse = self.capabilities.returns_lse
        if want_lse:
            kwargs.update(lse_request(self._module))
        result = self._call(q, k, v, kwargs, case.case_id)
        # `out`; `(out, lse)` with return_lse=True; `(out, AuxOutput)` with return_aux
        convention = ("(out, lse)" if kwargs.get("return_lse")
                      else "(out, aux)" if "return_aux" in kwargs else "out")
        take_return(result, "flex_attention", convention)
        out, lse = unpack(result)
        if case.entry == "varlen":
            out = out[0].transpose(0, 1)
            lse = lse[0] if lse is not None else None
        else:
            out = out.transpose(1, 2)
        return Outputs(out=out, lse=lse if want_lse else None)


    def _call(self, q, k, v, kwargs: dict[str, Any], case_id: str = ""):
        """One call; torch's refusals become skips; a failed dynamic compile falls back to a
        static one, for this case only (the reason in :attr:`dynamic_failure`): a replay of
        another case compiles what the run compiled for it."""
        import torch

        patch = _recompile_patch() if self.target is None else {}
        dynamic = self.target is None and case_id not in self._static
        try:
            with torch._dynamo.config.patch(**patch):
                return self._function(dynamic)(q, k, v, **kwargs)
        except Exception as exc:  # noqa: BLE001 - torch's refusal becomes the skip reason
            if _is_refusal(exc):
                raise Unsupported(f"torch refused flex-attention: {refusal_text(exc)}") from None
            if not dynamic or not _is_compile_error(exc):
                raise
            self.dynamic_failure = self.dynamic_failure or first_line(exc)
            self._static.add(case_id)
        with torch._dynamo.config.patch(**patch):
            return self._function(False)(q, k, v, **kwargs)


def _is_compile_error(exc: BaseException) -> bool:
    return type(exc).__name__ in ("InductorError", "BackendCompilerFailed", "CppCompileError",
                                  "LoweringException")


def lse_request(module: Any) -> dict[str, Any]:
    """How this torch asks flex_attention for the lse: ``return_aux=AuxRequest(lse=True)`` where
    it exists (newer torch deprecates ``return_lse``), else ``return_lse=True``."""
    sig = Signature.of(module.flex_attention)
    aux = getattr(module, "AuxRequest", None)
    if aux is not None and "return_aux" in sig.params:
        return {"return_aux": aux(lse=True)}
    return {"return_lse": True}


def unpack(result: Any) -> tuple[Any, Any]:
    """``(out, lse)`` from ``out``, ``(out, lse)`` or ``(out, AuxOutput)``."""
    if isinstance(result, (tuple, list)):
        out, extra = result[0], result[1] if len(result) > 1 else None
        lse = getattr(extra, "lse", extra)
        return out, lse
    return result, None


def _is_refusal(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, NotImplementedError) or "NotImplementedError" in text \
        or "does not support" in text


def refusal_text(exc: BaseException) -> str:
    """The line of torch's message that says why (not the lowering dump around it)."""
    for line in str(exc).splitlines():
        if "NotImplementedError:" in line:
            return line.split("NotImplementedError:", 1)[1].strip()[:300]
        if "does not support" in line:
            return line.strip()[:300]
    return first_line(exc)


def build_mods(module: Any, case: Case, slopes, device) -> tuple[Any, Any]:
    """flash-attn's semantics as flex's ``score_mod`` and block mask.

    Query ``i`` of a sequence with ``sq`` queries and ``sk`` keys sees key ``j`` when
    ``-right <= i + sk - sq - j <= left`` (``case.mask_window``, ``-1`` = unbounded), the left
    bound sparing the sink tokens ``j < case.sink_tokens`` (harness.exact.scores); softcap is
    ``c * tanh(s / c)``, then ALiBi subtracts ``slope * |i + sk - sq - j|``. Varlen sequences are
    told apart by document ids over the packed tokens.
    """
    import torch

    left, right = case.mask_window
    varlen = case.entry == "varlen"
    if varlen:
        lens_q, lens_k = list(case.seqlens_q), list(case.seqlens_k)
    else:
        lens_q, lens_k = [case.seqlen_q], [case.seqlen_k]
    # Every number the mods read is a captured tensor, never a Python int: torch.compile then
    # reuses one dynamic-shape graph across lengths and windows (a captured int is guarded on
    # its value, and with dynamic shapes torch 2.13's CPU lowering failed to compile it).
    def tensor(values):
        return torch.tensor(values, device=device)

    doc_q = torch.repeat_interleave(tensor(list(range(len(lens_q)))), tensor(lens_q))
    doc_k = torch.repeat_interleave(tensor(list(range(len(lens_k)))), tensor(lens_k))
    start_q = tensor([0, *lens_q[:-1]]).cumsum(0)
    start_k = tensor([0, *lens_k[:-1]]).cumsum(0)
    offset = tensor(lens_k) - tensor(lens_q)
    dense_offset = tensor(case.seqlen_k - case.seqlen_q)
    left_t, right_t = tensor(left), tensor(right)
    sink_t = tensor(case.sink_tokens)
    bounded_left, bounded_right = left >= 0, right >= 0
    sinks = bool(case.sink_tokens)

    def rel(q_idx, kv_idx):
        if not varlen:
            return q_idx + dense_offset - kv_idx
        dq = doc_q[q_idx]
        return (q_idx - start_q[dq]) + offset[dq] - (kv_idx - start_k[doc_k[kv_idx]])

    def mask_mod(b, h, q_idx, kv_idx):
        d = rel(q_idx, kv_idx)
        ok = d == d
        if varlen:
            ok = ok & (doc_q[q_idx] == doc_k[kv_idx])
        if bounded_right:
            ok = ok & (d >= -right_t)
        if bounded_left:
            if sinks:  # sink tokens: spared the left bound only
                key = kv_idx - start_k[doc_k[kv_idx]] if varlen else kv_idx
                ok = ok & ((d <= left_t) | (key < sink_t))
            else:
                ok = ok & (d <= left_t)
        return ok

    capped = case.softcap > 0
    cap = torch.tensor(case.softcap, dtype=torch.float32, device=device)
    table = None if slopes is None else slopes.to(device=device, dtype=torch.float32)
    per_batch = table is not None and table.dim() == 2

    def score_mod(score, b, h, q_idx, kv_idx):
        if capped:
            score = cap * torch.tanh(score / cap)
        if table is not None:
            row = (doc_q[q_idx] if varlen else b)
            slope = table[row, h] if per_batch else table[h]
            score = score - slope * torch.abs(rel(q_idx, kv_idx)).to(score.dtype)
        return score

    needs_mask = varlen or bounded_left or bounded_right
    total_q, total_k = (sum(lens_q), sum(lens_k)) if varlen else (case.seqlen_q, case.seqlen_k)
    block_mask = (module.create_block_mask(mask_mod, None, None, total_q, total_k, device=device)
                  if needs_mask else None)
    return (score_mod if (capped or table is not None) else None), block_mask
