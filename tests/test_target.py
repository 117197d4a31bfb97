"""The machine fingerprint, tested against platform facts recorded on other machines.

The fixtures in ``tests/fixtures/platforms`` are recordings of real ROCm and CUDA machines
(see their README); nothing in them was measured here. ``probe()`` itself runs for real on
this CPU machine.
"""

from __future__ import annotations

import math
import re
import sys
import types
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from harness import target as tgt
from harness.backends.flash_attn import ARCH_RULES, arch_reasons, detect_flavor

PLATFORMS = Path(__file__).parent / "fixtures" / "platforms"


def _load() -> list[dict]:
    entries = []
    for path in sorted(PLATFORMS.glob("*.toml")):
        for entry in tomllib.loads(path.read_text())["platform"]:
            entries.append({**entry, "file": path.name})
    return entries


RECORDS = _load()
IDS = [r["id"] for r in RECORDS]


# --------------------------------------------------------------------------- the fixtures


def test_fixtures_cover_rocm6_and_cuda11_to_13():
    rocm = {tgt.rocm_version(r["facts"]["torch_version_hip"]) for r in RECORDS
            if "torch_version_hip" in r["facts"]}
    cuda = {r["facts"]["torch_version_cuda"] for r in RECORDS if "torch_version_cuda" in r["facts"]}
    assert {"6.0", "6.1", "6.2", "6.3", "6.4"} <= rocm
    assert {"11.8", "12.1", "12.4", "12.6", "12.8", "13.0"} <= cuda
    archs = {r["expect"]["arch"] for r in RECORDS}
    assert {"gfx90a", "gfx942", "gfx950", "gfx1100", "sm_75", "sm_80", "sm_89", "sm_90"} <= archs


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_every_recording_says_where_it_was_seen(record):
    assert len(record["seen"]) > 20, "say what was recorded and on what"
    assert record["source"].strip(), "cite the thread or say why there is no URL"
    observed, typical = set(record["observed"]), set(record["typical"])
    assert not observed & typical
    assert set(record["facts"]) == observed | typical, (
        "every fact is either copied from the source (observed) or filled in (typical)")
    if not observed:
        assert "TYPICAL FORMAT" in record["seen"]
    else:
        assert record["source"].startswith("https://github.com/") or "index" in record["source"]


# ------------------------------------------------------------------ detection from facts


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_from_facts_derives_the_fingerprint(record):
    t = tgt.from_facts(record["facts"])
    want = record["expect"]
    assert t.vendor == want["vendor"]
    assert t.arch == want["arch"]
    assert t.runtime_version == want["runtime_version"]
    assert t.target_id == want["target_id"]
    assert t.device_name == record["facts"]["device_name"]
    assert t.device_count == record["facts"]["device_count"]
    if "peak_tflops" in want:
        assert t.peak_tflops == pytest.approx(want["peak_tflops"])
        assert t.peak_source
    else:
        assert t.peak_tflops is None
    if t.vendor == "amd":
        assert t.arch_raw == record["facts"]["gcn_arch_name"], "the raw string is kept"
        assert t.extra["torch_version_hip"] == record["facts"]["torch_version_hip"]
        assert t.runtime == f"ROCm {want['runtime_version']}"
    else:
        assert t.runtime == f"CUDA {want['runtime_version']}"


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_flash_attn_arch_reasons_per_flavor(record):
    t = tgt.from_facts(record["facts"])
    checked = 0
    for flavor in ARCH_RULES:
        key = "fa_" + flavor.replace("-", "_")
        if key not in record["expect"]:
            continue
        checked += 1
        reasons = arch_reasons(flavor, t)
        want = record["expect"][key]
        if want:
            assert len(reasons) == 1 and want in reasons[0], reasons
        else:
            assert reasons == []
    assert checked, "each recording states at least one flavor's verdict"


def test_target_round_trips_through_a_dict():
    t = tgt.from_facts(RECORDS[0]["facts"])
    again = tgt.Target.from_dict(t.to_dict())
    assert again == t
    assert t.to_dict()["target_id"] == t.target_id


# -------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("raw, want", [
    ("gfx942:sramecc+:xnack-", "gfx942"),
    ("gfx90a:sramecc+:xnack-", "gfx90a"),
    ("gfx1010:xnack-", "gfx1010"),
    ("gfx1100", "gfx1100"),
    # rocminfo's ISA name, as in ROCm/legacy-rocm-build issue 3460 (MI210)
    ("amdgcn-amd-amdhsa--gfx90a:sramecc+:xnack-", "gfx90a"),
])
def test_normalize_arch_amd(raw, want):
    assert tgt.normalize_arch("amd", raw) == want


@pytest.mark.parametrize("name, want", [
    ("AMD Instinct MI250X", "gfx90a"), ("AMD Instinct MI300X", "gfx942"),
    ("AMD Instinct MI355X", "gfx950"), ("Radeon RX 7900 XTX", "gfx1100"),
    ("AMD Radeon Graphics", "gfx-unknown"),
])
def test_normalize_arch_amd_without_gcn_arch_name_uses_the_name(name, want):
    assert tgt.normalize_arch("amd", "", name) == want


@pytest.mark.parametrize("raw, want", [((9, 0), "sm_90"), ([8, 9], "sm_89"), ("12.0", "sm_120"),
                                       ((7, 5), "sm_75"), ("", "sm_unknown")])
def test_normalize_arch_nvidia(raw, want):
    assert tgt.normalize_arch("nvidia", raw) == want


@pytest.mark.parametrize("hip, version_file, want", [
    ("6.2.41133-dd7f95766", "", "6.2"),             # the third field is a HIP build, not 6.2.4
    ("6.2.41133-dd7f95766", "6.2.4-120\n", "6.2.4"),  # the install's own file wins
    ("6.3.42131-fa1d09cbd", "6.3.1", "6.3.1"),
    ("6.1.40091-a8dbc0c19", "not a version", "6.1"),  # unreadable file: fall back to torch
    ("5.7.31921-d1770ee1b", "   ", "5.7"),
    ("", "", ""),
])
def test_rocm_version_prefers_the_install_file(hip, version_file, want):
    assert tgt.rocm_version(hip, version_file) == want


def test_cpu_target_ids():
    assert tgt.from_facts({"machine": "x86_64", "device_count": 0}).target_id == "cpu-x86_64"
    assert tgt.from_facts({"machine": "aarch64", "device_count": 0}).target_id == "cpu-aarch64"
    assert tgt.from_facts({"device_count": 0}).target_id == "cpu-unknown"


def test_rocm_version_file_changes_only_the_patch_level_of_the_id():
    facts = dict(RECORDS[IDS.index("mi300x-rocm6.2")]["facts"], rocm_version_file="6.2.4-120\n")
    t = tgt.from_facts(facts)
    assert t.runtime == "ROCm 6.2.4" and t.target_id == "rocm6.2-gfx942-mi300x"
    assert t.extra["rocm_version_file"] == "6.2.4-120"


# ---------------------------------------------------------------------------- the peaks


def _numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", text)]


def test_every_peak_cites_a_source_that_states_the_number():
    for needle, peak in tgt.PEAKS:
        assert len(peak.source) > 20, needle
        if peak.tflops is None:
            continue
        stated = _numbers(peak.source)
        # The dense figure itself, or the 2:4-sparse / two-GCD figure it is half of.
        assert any(math.isclose(x, peak.tflops, abs_tol=0.06)
                   or math.isclose(x, 2 * peak.tflops, abs_tol=0.6) for x in stated), needle


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 80GB HBM3", 989.4),
    ("AMD Instinct MI300X", 1307.4), ("AMD Instinct MI250X", 191.5), ("NVIDIA H100 PCIe", 756.5),
])
def test_peak_values(name, tflops):
    assert tgt.peak_for(name).tflops == tflops


@pytest.mark.parametrize("name, needle_value", [
    ("NVIDIA L40S", 362.05),        # not the L4 (121)
    ("NVIDIA L40", 181.05),         # not the L4 either
    ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None),          # not the A10's figure
    ("NVIDIA H200 NVL", None),      # not the SXM figure
])
def test_peaks_match_whole_words(name, needle_value):
    assert tgt.peak_for(name).tflops == needle_value


def test_gh200_is_not_an_h200():
    assert "GH200" in tgt.peak_for("NVIDIA GH200 480GB").source
    assert tgt.short_name("NVIDIA GH200 480GB") == "gh200"


def test_unknown_device_has_no_peak_and_a_readable_short_name():
    assert tgt.peak_for("NVIDIA GeForce GTX 1080") is None
    assert tgt.short_name("NVIDIA GeForce GTX 1080") == "geforce-gtx-1080"


# ------------------------------------------------------------------- flash-attn's flavor


@pytest.mark.parametrize("hip, env, want", [
    ("", {}, "cuda"),
    ("6.2.41133-dd7f95766", {}, "rocm-ck"),
    ("6.2.41133-dd7f95766", {"FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE"}, "rocm-triton"),
    ("", {"FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE"}, "rocm-triton"),  # upstream on NVIDIA
    # flash_attn_interface compares with "TRUE" exactly: these do not select Triton
    ("6.2.41133-dd7f95766", {"FLASH_ATTENTION_TRITON_AMD_ENABLE": "true"}, "rocm-ck"),
    ("", {"FLASH_ATTENTION_TRITON_AMD_ENABLE": "1"}, "cuda"),
])
def test_flavor_detection(hip, env, want):
    assert detect_flavor(hip, env) == want


def test_flavor_from_the_imported_module_wins_over_the_environment():
    triton_module = types.SimpleNamespace(USE_TRITON_ROCM=True)
    compiled_module = types.SimpleNamespace(USE_TRITON_ROCM=False)
    assert detect_flavor("", {}, triton_module) == "rocm-triton"
    assert detect_flavor("6.2", {"FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE"},
                         compiled_module) == "rocm-ck"


def test_ck_refuses_rocm_older_than_6_on_a_ck_architecture():
    mi250x = dict(RECORDS[IDS.index("mi250x-rocm6.2")]["facts"])
    # modified on purpose: the ROCm 5.7 string recorded on another machine
    mi250x["torch_version_hip"] = "5.7.31921-d1770ee1b"
    reasons = arch_reasons("rocm-ck", tgt.from_facts(mi250x))
    assert reasons == ["ROCm 5.7 is older than flash-attn's minimum ROCm 6.0"]


def test_triton_amd_on_nvidia_runs_only_its_decode_kernel():
    # Seen on an H200: prefill kernels fail at launch (waves_per_eu), the kv-cache kernel runs.
    h100 = tgt.from_facts(RECORDS[IDS.index("h100-cuda12.4")]["facts"])
    for entry in ("dense", "varlen"):
        assert "waves_per_eu" in arch_reasons("rocm-triton", h100, entry)[0]
    assert arch_reasons("rocm-triton", h100, "kvcache") == []
    assert arch_reasons("rocm-ck", h100, "kvcache") != []


def test_unknown_flavor_is_a_reason_not_a_crash():
    t = tgt.from_facts(RECORDS[0]["facts"])
    assert "unknown flash-attn flavor" in arch_reasons("rocm-aiter", t)[0]


# --------------------------------------------------------------- probing and helpers


def test_probe_on_this_machine_is_a_cpu_fingerprint():
    import torch

    if torch.cuda.is_available():  # pragma: no cover - the self-tests run on CPU machines
        pytest.skip("a GPU is visible: this test describes the CPU machines CI runs on")
    facts = tgt.probe()
    assert facts["device_count"] == 0 and facts["torch"] == torch.__version__
    t = tgt.from_facts(facts)
    assert t.vendor == "cpu" and t.target_id.startswith("cpu-") and t.memory_bytes > 0
    assert t.peak_tflops is None and t.cpu_threads == torch.get_num_threads()


@pytest.mark.parametrize("module", ["pynvml", "amdsmi"])
def test_absent_optional_helpers_are_not_errors(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # "import pynvml" now raises ImportError
    assert tgt._optional_driver_version(module) == ""


def test_failing_optional_helper_is_not_an_error(monkeypatch):
    def broken():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=broken))
    assert tgt._optional_driver_version("pynvml") == ""


def test_present_optional_helpers_enrich_the_driver(monkeypatch):
    calls = []
    fake_nvml = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlSystemGetDriverVersion=lambda: b"550.54.15")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    assert tgt._optional_driver_version("pynvml") == "550.54.15"
    assert calls == ["init", "shutdown"]
    fake_amdsmi = types.SimpleNamespace(
        amdsmi_init=lambda: None, amdsmi_shut_down=lambda: None,
        amdsmi_get_processor_handles=lambda: ["gpu0"],
        amdsmi_get_gpu_driver_info=lambda handle: {"driver_version": "6.8.5"})
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi)
    assert tgt._optional_driver_version("amdsmi") == "6.8.5"


def test_git_revision_without_git_metadata_comes_from_the_environment(tmp_path, monkeypatch):
    # A copied tree (no .git) records the revision it was told, or nothing; never a guess.
    monkeypatch.setattr(tgt, "REPO_ROOT", tmp_path)
    monkeypatch.delenv(tgt.REVISION_ENV, raising=False)
    assert tgt.git_revision() == ""
    monkeypatch.setenv(tgt.REVISION_ENV, "545764d1e2f3")
    assert tgt.git_revision() == "545764d1e2f3"


def test_git_revision_from_the_environment_wins_over_a_stale_checkout(monkeypatch):
    # A synced copy can carry an old .git (seen on a lent GPU machine): the given revision wins.
    monkeypatch.setenv(tgt.REVISION_ENV, "074f0168d57c")
    assert tgt.git_revision() == "074f0168d57c"
    monkeypatch.delenv(tgt.REVISION_ENV)
    if (tgt.REPO_ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?", tgt.git_revision())


@pytest.mark.parametrize("text, want", [
    # The proprietary module's line (format as printed by 535-series drivers).
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.154.05  Thu Dec 28 20:34:44 UTC 2023\n"
     "GCC version:  gcc version 12.2.0", "535.154.05"),
    # The open module's line: a plain "Kernel Module\s+(\S+)" read "for" here on an H200.
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.03  Release Build  "
     "(dvs-builder@U16-I2-C03-12-4)  Thu Oct 30 05:43:01 UTC 2025", "580.159.03"),
    ("", ""),
])
def test_nvidia_driver_version_from_proc(text, want):
    assert tgt.nvidia_driver_from_proc(text) == want


# ---------------------------------------------------- ROCm 7 and the newest targets (issue 13)


def test_fixtures_cover_rocm6_2_to_7_2_on_gfx90a_gfx942_gfx950():
    amd = [r for r in RECORDS if "torch_version_hip" in r["facts"]]
    versions = {tgt.rocm_version(r["facts"]["torch_version_hip"]) for r in amd}
    assert {"6.2", "6.3", "6.4", "7.0", "7.1", "7.2"} <= versions
    rocm7_archs = {r["expect"]["arch"] for r in amd
                   if tgt.rocm_version(r["facts"]["torch_version_hip"]).startswith("7.")}
    assert {"gfx90a", "gfx942", "gfx950"} <= rocm7_archs
    names = {r["facts"]["device_name"] for r in amd}
    assert {"AMD Instinct MI350X", "AMD Instinct MI355X", "AMD Instinct MI325X"} <= names


@pytest.mark.parametrize("name, dense, fp8", [
    ("AMD Instinct MI355X", 2516.6, 5033.2),
    ("AMD Instinct MI350X", 2306.9, 4613.7),
    ("AMD Instinct MI325X", 1307.4, 2614.9),
    ("AMD Instinct MI300X", 1307.4, 2614.9),
    ("NVIDIA B200", 2250.0, 4500.0),
    ("NVIDIA GB200", 2500.0, 5000.0),
    ("NVIDIA H100 80GB HBM3", 989.4, 1978.9),
    ("NVIDIA H200", 989.4, 1978.9),
])
def test_newest_peaks_with_their_fp8_figures(name, dense, fp8):
    peak = tgt.peak_for(name)
    assert peak.tflops == pytest.approx(dense) and peak.fp8_tflops == pytest.approx(fp8)
    assert re.search(r"\d", peak.source)


def test_every_peak_figure_is_cited_and_secondary_copies_say_so():
    for needle, peak in tgt.PEAKS:
        assert len(peak.source) > 20 and re.search(r"\d", peak.source), needle
    for needle in ("mi355x", "mi350x", "mi325x", "b200", "gb200"):
        source = dict(tgt.PEAKS)[needle].source
        assert "secondary" in source, f"{needle}: say that the figure rests on a secondary copy"


def test_b200_and_gb200_are_told_apart():
    assert tgt.short_name("NVIDIA B200") == "b200"
    assert tgt.short_name("NVIDIA GB200") == "gb200"
    assert tgt.peak_for("NVIDIA GB200").tflops != tgt.peak_for("NVIDIA B200").tflops
