"""Count the share of flash-attn's own test grid the harness can pose and reproduce (issue 13).

Not a test (pytest collects ``test_*.py`` only): run ``python tests/peer_grid.py``.

Method. Every ``@pytest.mark.parametrize`` of ``tests/test_flash_attn.py`` is expanded as a
Cartesian product; combinations that the test body skips on its parameters alone (``if softcap >
0.0 and dropout_p > 0.0: pytest.skip()``, the kv-cache test's four skips) are removed; skips that
depend on the machine (GPU memory, ``is_sm8x``) and ``@pytest.mark.skip`` decorators are not
(the combinations exist in the grid). Each remaining combination is then classified twice, for
the harness at main 23eb10b (``BEFORE``) and for the working tree (``after``, read from
``harness.case`` itself, so the number follows the code):

* **pose**: the harness can construct the same attention problem (entry point, shapes, masks,
  softcap, ALiBi, dropout probability, appends, rotary, leftpad, batch index, paged caches) as
  a :class:`~harness.case.Case`; how the tensors are packed is not part of the problem;
* **reproduce**: it can also call it the way the test does and check what the test asserts
  with inputs of the same kind: the packed entry points, the output (and gradients) against a
  reference with flash-attn's parity rule, the in-place cache update after an append, forced
  ``num_splits``, ALiBi slopes of shape ``(batch, heads)`` with random values, scaled inputs, a
  non-contiguous dout, bitwise determinism. Never reproduced: the exact dropout
  pattern (``S_dmask``; the harness judges dropout statistically), backward with
  ``deterministic=False`` (the harness's determinism check demands repeatable gradients, the
  test does not; counted as reproduce only for the forward-only kv-cache test), and the race
  test's 250 repeats.

Grids. ``UPSTREAM`` is flash-attn 2.x's ``tests/test_flash_attn.py`` as its parametrize lists
stand in 2.8.x: the kv-cache test's lists are quoted from the 2.8 file (``tests/test_flash_attn.py
L1858-L1907`` and skips L1925-L1932, as cited in a public walkthrough of that file); the other
tests' lists follow the structure of the ROCm fork's copy with the upstream values (both dtypes,
``local``, ``deterministic``, ``kvpacked``, ``softcap`` [0, 50], paged [None, 256, 512]). The
stored index holds no 2.8.3 copy of the file, so this grid is a reconstruction; it counts
312,356 combinations, the number ``facts.md`` gives, and at main 23eb10b it classifies 59% as
posed and 8% as reproduced, the shares ``facts.md`` and issue 13 give (so the rules match the
earlier count). ``ROCM_TRITON`` is the ROCm Triton variant of the file exactly as stored
(dtype float16 only, ``local``/``deterministic`` False, ...): it counts 34,252, the number
``facts.md`` gives for the Triton AMD tests.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

D12 = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
D11_OUT = [32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256]
D11_VAR = [32, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
D10 = [32, 59, 64, 80, 96, 128, 160, 192, 224, 256]
PAIRS_OUT = [(113, 203), (128, 217), (113, 211), (108, 256), (256, 512), (512, 256),
             (1024, 1024), (1023, 1024), (1024, 1023), (2048, 2048)]
PAIRS_CAUSAL = [(1, 239), (3, 799), (127, 512), (127, 513), (113, 203), (128, 217),
                (113, 211), (108, 256), (256, 512), (1023, 1024)]
PAIRS_SPLITKV = [(3, 1024), (1, 339), (64, 800), (3, 799), (64, 2048), (16, 20000),
                 (16, 100000), (128, 128), (256, 256)]
PAIRS_KVCACHE = [(1, 128), (1, 339), (3, 1024), (64, 800), (64, 256), (3, 799), (64, 2048),
                 (16, 20000), (1, 128 * 1024), (16, 128 * 1024), (128, 128)]
PAIRS_RACE = [(1, 239), (239, 1), (3, 799), (799, 3), (1024, 128), (97, 97), (128, 128),
              (200, 200), (256, 256), (257, 257), (384, 384), (512, 512), (768, 768),
              (1024, 1024)]
TF = [False, True]


@dataclass(frozen=True)
class Grid:
    """One parametrised test: its API, its parameter lists and its parameter-only skips."""

    name: str
    params: Mapping[str, list]
    skip: Callable[[dict], bool] = field(default=lambda p: False)

    def combinations(self):
        names = list(self.params)
        for values in itertools.product(*self.params.values()):
            p = dict(zip(names, values, strict=True))
            if not self.skip(p):
                yield p


def _softcap_dropout(p) -> bool:
    return p.get("softcap", 0.0) > 0 and p.get("dropout_p", 0.0) > 0


def _kvcache_skip(p) -> bool:
    sq, sk = p["seqlen_q,seqlen_k"]
    return ((sq > sk and p["new_kv"]) or (not p["new_kv"] and p["rotary_fraction"] > 0)
            or (p["has_batch_idx"] and p["paged_kv_block_size"] is not None)
            or (p["has_leftpad"] and p["paged_kv_block_size"] is not None))


def grids(dtypes, local, deterministic, kvpacked, softcap, swap, paged_varlen, kv_paged,
          kv_leftpad, kv_local, kv_d=None) -> list[Grid]:
    common = dict(dtype=dtypes, deterministic=deterministic, alibi=TF, local=local, causal=TF)
    return [
        Grid("test_flash_attn_qkvpacked", dict(**common, d=D12,
             seqlen=[97, 128, 200, 384, 768, 1024, 1025, 2048], dropout_p=[0.0, 0.17])),
        Grid("test_flash_attn_varlen_qkvpacked", dict(**common, d=D10,
             seqlen=[97, 128, 200, 257, 384, 512, 768, 1025, 2048], dropout_p=[0.0, 0.17])),
        Grid("test_flash_attn_output", dict(kvpacked=kvpacked, mha_type=["mha", "mqa", "gqa"],
             **common, d=D11_OUT, **{"seqlen_q,seqlen_k": PAIRS_OUT}, dropout_p=[0.0, 0.17],
             softcap=softcap), _softcap_dropout),
        Grid("test_flash_attn_varlen_output", dict(kvpacked=kvpacked,
             mha_type=["mha", "mqa", "gqa"], **common, d=D11_VAR,
             **{"seqlen_q,seqlen_k": [(1, 147), *PAIRS_OUT]}, dropout_p=[0.0, 0.17],
             softcap=softcap), _softcap_dropout),
        Grid("test_flash_attn_causal", dict(dtype=dtypes, local=local, d=D12, swap_sq_sk=swap,
             **{"seqlen_q,seqlen_k": PAIRS_CAUSAL})),
        Grid("test_flash_attn_varlen_causal", dict(dtype=dtypes, local=local, d=D12,
             swap_sq_sk=swap, **{"seqlen_q,seqlen_k": PAIRS_CAUSAL},
             paged_kv_block_size=paged_varlen)),
        Grid("test_flash_attn_splitkv", dict(**common, d=D12, swap_sq_sk=swap,
             **{"seqlen_q,seqlen_k": PAIRS_SPLITKV})),
        Grid("test_flash_attn_kvcache", dict(dtype=["float16"], num_splits=[1, 0],
             mha_type=["mha", "mqa", "gqa"], new_kv=TF, alibi=TF, local=kv_local, causal=TF,
             seqlen_new_eq_seqlen_q=[True, False], rotary_interleaved=TF,
             rotary_fraction=[0.0, 0.5, 1.0], paged_kv_block_size=kv_paged,
             has_leftpad=kv_leftpad, has_batch_idx=[False],
             d=kv_d or [32, 59, 64, 80, 128, 256], **{"seqlen_q,seqlen_k": PAIRS_KVCACHE}),
             _kvcache_skip),
        Grid("test_flash_attn_race_condition", dict(dtype=["float16"], causal=TF, d=D12,
             **{"seqlen_q,seqlen_k": PAIRS_RACE}, dropout_p=[0.0, 0.17])),
        Grid("test_flash_attn_bwd_overflow", dict(dtype=["float16"], causal=TF, d=[16, 32, 64],
             seqlen=[1, 2, 5, 17, 128])),
        Grid("test_flash_attn_bwd_transpose", dict(dtype=dtypes, causal=TF, d=[64, 128],
             seqlen=[97, 128, 200, 256])),
        Grid("test_flash_attn_bwd_varlen_overflow", dict(dtype=["float16"], causal=TF,
             d=[16, 32, 64])),
        Grid("test_flash_attn_deterministic", dict(dtype=dtypes, local=local, causal=TF, d=D12,
             swap_sq_sk=swap, **{"seqlen_q,seqlen_k": PAIRS_CAUSAL})),
        Grid("test_flash_attn_varlen_deterministic", dict(dtype=dtypes, local=local, causal=TF,
             d=D12, swap_sq_sk=swap, **{"seqlen_q,seqlen_k": PAIRS_CAUSAL})),
    ]


UPSTREAM = grids(dtypes=["float16", "bfloat16"], local=TF, deterministic=TF, kvpacked=TF,
                 softcap=[0.0, 50.0], swap=TF, paged_varlen=[None, 256, 512],
                 kv_paged=[None, 256], kv_leftpad=TF, kv_local=TF)
ROCM_TRITON = grids(dtypes=["float16"], local=[False], deterministic=[False], kvpacked=[False],
                    softcap=[0.0], swap=[False], paged_varlen=[None], kv_paged=[None],
                    kv_leftpad=[False], kv_local=[False])


# ------------------------------------------------------------------ what the harness can do


@dataclass(frozen=True)
class Harness:
    """What a harness version can pose and check (flags, each a capability of the code)."""

    packed_api: bool          # qkvpacked / kvpacked entry points (layout packed-qkv/kv)
    append: bool              # kv-cache appends (seqlen_new) and the cache-after reference
    rotary: bool
    leftpad: bool
    batch_idx: bool
    splits: bool              # num_splits passed through (1 = forced, 0 = heuristic)
    paged_varlen: bool
    random_alibi: bool        # (batch, heads) slopes with random values
    scaled_values: bool       # q, k times a factor (bwd_overflow)
    dout_strided: bool        # non-contiguous dout (bwd_transpose)


#: main 23eb10b: none of issue 12's and 13's additions.
BEFORE = Harness(False, False, False, False, False, False, False, False, False, False)


def after() -> Harness:
    """The working tree's harness, read from its data model."""
    from harness import case as case_module

    fields = {f.name for f in dataclasses.fields(case_module.Case)}
    layouts = set(case_module.LAYOUTS)
    values = set(getattr(case_module, "VALUES", ()))
    slopes = set(getattr(case_module, "ALIBI_SLOPES", ()))
    try:  # paged varlen: the case validates
        case_module.Case(entry="varlen", batch=1, seqlens_q=(1,), seqlens_k=(1,),
                         paged_block_size=16)
        paged_varlen = True
    except Exception:  # noqa: BLE001 - any refusal means "cannot pose"
        paged_varlen = False
    return Harness(packed_api={"packed-qkv", "packed-kv"} <= layouts,
                   append="seqlen_new" in fields and _has_cache_after(),
                   rotary="rotary_dim" in fields, leftpad="cache_leftpad" in fields,
                   batch_idx="cache_batch_idx" in fields, splits="num_splits" in fields,
                   paged_varlen=paged_varlen, random_alibi="random-per-batch" in slopes,
                   scaled_values="scaled" in values, dout_strided="dout-strided" in layouts)


def _has_cache_after() -> bool:
    try:
        from harness.exact.reference import cache_after  # noqa: F401
    except ImportError:
        return False
    return True


def classify(test: str, p: dict, h: Harness) -> tuple[bool, bool]:  # noqa: C901 - one table
    """``(pose, reproduce)`` of one combination under harness ``h``."""
    packed = test in ("test_flash_attn_qkvpacked", "test_flash_attn_varlen_qkvpacked") \
        or p.get("kvpacked", False)
    pose = True  # packing is how the API is called, not the problem
    reproduce = not packed or h.packed_api
    if p.get("dropout_p", 0.0) > 0:
        reproduce = False  # the exact dropout pattern (S_dmask)
    if p.get("alibi") and not h.random_alibi:
        reproduce = False  # torch.rand(batch, nheads) * 0.3
    backward = test not in ("test_flash_attn_kvcache",)
    if backward and p.get("deterministic") is False and test not in (
            "test_flash_attn_causal", "test_flash_attn_varlen_causal"):
        reproduce = False
    if test == "test_flash_attn_varlen_causal" and p["paged_kv_block_size"] is not None:
        pose = pose and h.paged_varlen
        reproduce = reproduce and pose
    if test == "test_flash_attn_kvcache":
        if p["new_kv"]:
            pose = pose and h.append
        if p["rotary_fraction"] > 0 and p["new_kv"]:
            pose = pose and h.rotary
        if p["has_leftpad"]:
            pose = pose and h.leftpad
        if p["has_batch_idx"]:
            pose = pose and h.batch_idx
        reproduce = reproduce and pose and (p["num_splits"] == 0 or h.splits)
    if test == "test_flash_attn_race_condition":
        reproduce = False  # 250 repeats with the dropout pattern compared bitwise
    if test == "test_flash_attn_bwd_overflow":
        reproduce = reproduce and h.scaled_values
    if test == "test_flash_attn_bwd_transpose":
        reproduce = reproduce and h.dout_strided
    return pose, reproduce


def count(grid_set: list[Grid], h: Harness) -> dict[str, tuple[int, int, int]]:
    """Per test: ``(combinations, posed, reproduced)``."""
    out = {}
    for g in grid_set:
        n = posed = reproduced = 0
        for p in g.combinations():
            n += 1
            a, b = classify(g.name, p, h)
            posed += a
            reproduced += b
        out[g.name] = (n, posed, reproduced)
    return out


def report(title: str, grid_set: list[Grid], harnesses: dict[str, Harness]) -> str:
    lines = [title]
    totals = {}
    for label, h in harnesses.items():
        per = count(grid_set, h)
        n = sum(v[0] for v in per.values())
        posed = sum(v[1] for v in per.values())
        reproduced = sum(v[2] for v in per.values())
        totals[label] = (n, posed, reproduced)
        lines.append(f"  {label}: {n:,} combinations, pose {posed:,} ({posed / n:.0%}), "
                     f"reproduce {reproduced:,} ({reproduced / n:.0%})")
        for name, (m, a, b) in per.items():
            lines.append(f"    {name:40s} {m:8,} pose {a:8,} reproduce {b:8,}")
    return "\n".join(lines)


def main() -> int:
    now = after()
    # Issue 13's kv-cache work alone: the working tree less issue 12's packing, values, dout.
    kv_only = dataclasses.replace(now, packed_api=False, scaled_values=False, dout_strided=False)
    harnesses = {"before (23eb10b)": BEFORE, "issue-13 kv-cache work only": kv_only,
                 "after (working tree)": now}
    print("harness after:", after())
    print(report("flash-attn upstream grid (reconstructed, see the module docstring)", UPSTREAM,
                 harnesses))
    print(report("ROCm Triton variant (as stored)", ROCM_TRITON, harnesses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
