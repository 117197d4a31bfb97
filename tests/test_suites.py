"""The case library in cases/: every file loads, model shapes match their configs, sizes are
labelled honestly, and the corners edge.toml promises are there."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.case.suites import load_file
from harness.checks.plan import MEMORY_HEADROOM, estimated_bytes, work_reasons
from harness.target import Target
from harness.vocab import CHECK_NAMES as CHECKS

CASES_DIR = Path(__file__).resolve().parent.parent / "harness" / "case" / "library"
FILES = sorted(p for p in CASES_DIR.glob("*.toml") if p.name != "known_issues.toml")
#: The machine "(cpu-sized)" promises: 2 cores, 24 GiB, the default limits.
CPU_24G = Target(vendor="cpu", device_name="2-core CPU", arch="x86_64", memory_bytes=24 * 2**30)

#: (heads_q, heads_kv, head_dim, softcap, scale, window left) per model, from the configs cited.
MODELS = {
    "llama-3-8b": (32, 8, 128, 0.0, None, -1),
    "llama-3-70b": (64, 8, 128, 0.0, None, -1),
    "mistral-7b": (32, 8, 128, 0.0, None, 4095),
    "gemma-2-9b": (16, 8, 256, 50.0, None, None),  # window on local layers only
    "gemma-2-27b": (32, 16, 128, 50.0, 1 / 12, None),
    "qwen2-7b": (28, 4, 128, 0.0, None, -1),
    "phi-3-mini": (32, 32, 96, 0.0, None, None),
    "falcon-7b": (71, 1, 64, 0.0, None, -1),
    "gpt2": (12, 12, 64, 0.0, None, -1),
    "bert-base": (12, 12, 64, 0.0, None, -1),
    # inference/model.py: 192 ** -0.5 * (0.1 * ln 40 + 1) ** 2
    "deepseek-v3": (128, 128, 192, 0.0, 0.1352337788608801, -1),
    "deepseek-v3-absorbed": (128, 1, 576, 0.0, 0.1352337788608801, -1),
    "gpt-oss-20b": (64, 8, 64, 0.0, None, None),  # window on sliding layers only
}


def load(name: str):
    return load_file(CASES_DIR / f"{name}.toml")


def fits_cpu(case) -> bool:
    checks = case.checks or CHECKS
    memory = estimated_bytes(case, tuple(checks)) <= MEMORY_HEADROOM * CPU_24G.memory_bytes
    return memory and not work_reasons(case, CPU_24G, tuple(checks), None)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_case_file_loads(path):
    suite = load_file(path)
    assert suite.cases and suite.description


def test_the_library_is_there():
    names = {p.stem for p in FILES}
    assert {"smoke", "models", "edge", "long_context"} <= names


@pytest.mark.parametrize("name", ["models", "long_context"])
def test_every_case_is_named_and_cites_its_source(name):
    for case in load(name).cases:
        assert case.name, case.label
        assert case.source.startswith("https://huggingface.co/") and "config.json" in \
            case.source, case.name


def test_model_shapes_match_their_configs():
    seen = set()
    for case in load("models").cases:
        model = next(m for m in MODELS if case.name.startswith(m + " "))
        seen.add(model)
        heads_q, heads_kv, head_dim, softcap, scale, left = MODELS[model]
        assert (case.heads_q, case.heads_kv, case.head_dim) == (heads_q, heads_kv, head_dim)
        assert case.softcap == softcap, case.name
        assert case.scale == (pytest.approx(scale) if scale else None), case.name
        if left is not None:
            assert case.window[0] == left, case.name
        assert case.causal or case.seqlen_q == 1 or model == "bert-base", case.name
    assert seen == set(MODELS)


def test_every_model_has_prefill_and_decode_variants():
    names = [c.name for c in load("models").cases]
    for model in MODELS:
        mine = [n for n in names if n.startswith(model + " ")]
        if model == "bert-base":  # an encoder: no decode
            assert any("encoder" in n for n in mine) and any("packed" in n for n in mine)
            continue
        assert any(" prefill " in n for n in mine), model
        assert any(" decode " in n for n in mine), model


def test_decode_cases_are_inference_only():
    for case in load("models").cases + load("long_context").cases:
        if case.seqlen_q == 1:
            assert case.checks is not None and "bwd" not in case.checks, case.name


def test_gemma_2_has_global_and_local_layers():
    gemma = [c for c in load("models").cases if c.name.startswith("gemma-2-9b")]
    assert {c.window for c in gemma} >= {(-1, -1), (4095, 0)}


@pytest.mark.parametrize("name", ["models", "long_context"])
def test_cpu_sized_label_is_honest(name):
    """'(cpu-sized)' marks exactly the dense cases a 2-core, 24 GiB CPU runs within its limits."""
    for case in load(name).cases:
        labelled = case.name.endswith("(cpu-sized)")
        if labelled:
            assert case.entry == "dense" and fits_cpu(case), case.name
        elif case.entry == "dense":
            assert not fits_cpu(case), f"{case.name}: fits a CPU, label it (cpu-sized)"


def test_every_case_fits_an_80_gb_gpu():
    for case in load("models").cases + load("long_context").cases:
        checks = tuple(case.checks or CHECKS)
        assert estimated_bytes(case, checks) <= MEMORY_HEADROOM * 80 * 2**30, case.name  # H100


def test_long_context_reaches_a_million_tokens_forward_only():
    cases = load("long_context").cases
    assert max(c.seqlen_k for c in cases) == 1_048_576
    assert all(c.checks == ("fwd",) for c in cases)
    assert {c.entry for c in cases} == {"dense", "kvcache"}
    assert any(c.paged_block_size == 256 for c in cases)
    assert any(c.causal and 1 < c.seqlen_q < c.seqlen_k for c in cases)  # chunked prefill
    assert any(fits_cpu(c) for c in cases) and not all(fits_cpu(c) for c in cases)


def test_edge_covers_the_corners():
    cases = load("edge").cases
    pairs = {(c.seqlen_q, c.seqlen_k) for c in cases}
    assert {(1, 1), (1, 147), (147, 1)} <= pairs
    lengths = {n for pair in pairs for n in pair}
    for block in (64, 128, 256):
        assert {block - 1, block, block + 1} <= lengths, block
    dims = {c.head_dim for c in cases if c.dv == c.head_dim}  # MLA's 576/512: issue 26
    assert min(dims) == 8 and max(dims) == 256 and any(d % 32 for d in dims)
    ratios = {c.heads_q // c.heads_kv for c in cases}
    assert {1, 2, 4, 8, 16, 71} <= ratios
    assert any(c.window[0] >= 0 and c.window[0] < c.seqlen_k // 2 for c in cases)
    assert any(c.has_mask and c.seqlen_q > c.seqlen_k for c in cases)  # rows with no key
    assert any(0 < c.softcap <= 1 for c in cases) and any(c.alibi for c in cases)
    assert any(c.entry == "varlen" and 0 in c.seqlens_q and 0 in c.seqlens_k for c in cases)
    assert {c.paged_block_size for c in cases} >= {128, 256, 512}
    assert all(fits_cpu(c) for c in cases)  # the whole file runs on a CPU
