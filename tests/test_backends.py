"""SDPA backends, user kernels (FILE.py:FUNC) and entry-point plugins.

What runs for real here: the SDPA math and flash kernels of this CPU torch, the user kernels in
``tests/fixtures/kernels``, and the plugin package in ``tests/fixtures/plugin`` (installed by
writing its dist-info onto ``sys.path``, which is what ``importlib.metadata`` reads). The GPU
rules of the SDPA backends are checked as data, by describing a GPU machine to the backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import torch

from harness.backends import known_backends, load_backend
from harness.backends.base import Capabilities
from harness.backends.sdpa import SdpaBackend, rocm_fa_library
from harness.backends.user import FunctionBackend, load_function
from harness.case import Case
from harness.checks.context import CaseRun
from harness.errors import UsageError
from harness.options import get_profile
from harness.target import from_facts

FIXTURES = Path(__file__).parent / "fixtures"
KERNELS = FIXTURES / "kernels" / "softcap_kernels.py"
PLUGIN = FIXTURES / "plugin"
CPU = from_facts({"machine": "x86_64", "device_count": 0})
H100 = from_facts({"torch_version_cuda": "12.4", "device_count": 1, "device_name": "NVIDIA H100",
                   "capability": [9, 0]})


def _fwd(case: Case, backend, seed: int = 0):
    run = CaseRun(case, backend, CPU, seed=seed, profile=get_profile("quick"), device="cpu")
    return run.run("fwd")


# ------------------------------------------------------------------- SDPA on this CPU


@pytest.mark.parametrize("name", ["sdpa-math", "sdpa-flash"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_sdpa_math_and_flash_run_on_cpu(name, dtype):
    backend = SdpaBackend(name)
    assert backend.availability() is None and backend.flavor == "cpu"
    case = Case(batch=1, seqlen_q=24, seqlen_k=40, heads_q=4, heads_kv=2, head_dim=32,
                dtype=dtype, causal=True)  # bottom-right causal goes in as an explicit mask
    assert backend.unsupported_reasons(case, CPU) == []
    verdict = _fwd(case, backend)
    assert verdict.status == "pass", verdict.reason


@pytest.mark.parametrize("name", ["sdpa-efficient", "sdpa-cudnn"])
def test_sdpa_efficient_and_cudnn_are_unavailable_on_cpu(name):
    reason = SdpaBackend(name).availability()
    assert reason == f"no GPU here: torch {torch.__version__} has no CPU kernel for {name}"


def test_sdpa_flash_on_cpu_claims_no_dropout():
    case = Case(batch=1, seqlen_q=8, seqlen_k=8, heads_q=1, head_dim=16, dropout_p=0.1)
    assert SdpaBackend("sdpa-flash").unsupported_reasons(case, CPU) == [
        "sdpa-flash on the CPU has no dropout"]
    assert SdpaBackend("sdpa-math").unsupported_reasons(case, CPU) == []


def test_torch_refusal_becomes_the_skip_reason():
    """Run anyway (as --audit does): torch's own warning text is the reason, not a warning."""
    from harness.exact.inputs import make_inputs

    case = Case(batch=1, seqlen_q=8, seqlen_k=8, heads_q=1, head_dim=16, dtype="float32",
                dropout_p=0.1)
    backend = SdpaBackend("sdpa-flash")
    from harness.backends.base import Unsupported

    with pytest.raises(Unsupported) as info:
        backend.forward(make_inputs(case, "cpu", 0))
    assert str(info.value) == ("torch refused sdpa-flash: Both fused kernels do not support "
                               "non-zero dropout.")


def test_sdpa_has_no_softcap_paged_varlen_or_kvcache():
    backend = SdpaBackend("sdpa-math")
    softcap = Case(batch=1, seqlen_q=8, heads_q=1, head_dim=16, softcap=5.0)
    assert backend.unsupported_reasons(softcap, CPU) == ["softcap is not a parameter of SDPA"]
    varlen = Case(entry="varlen", batch=2, seqlens_q=(3, 4), seqlens_k=(3, 4), heads_q=1,
                  head_dim=16)
    assert backend.unsupported_reasons(varlen, CPU) == ["sdpa-math has no varlen entry point"]


# ------------------------------------------------------- SDPA on GPUs, from torch's rules


def test_sdpa_flash_on_gpu_takes_no_mask():
    flash = SdpaBackend("sdpa-flash", device_type="cuda", rocm=False, enable_gqa=True)
    assert flash.flavor == "cuda"
    plain = Case(batch=1, seqlen_q=64, seqlen_k=64, heads_q=8, heads_kv=2, head_dim=128,
                 causal=True)
    assert flash.unsupported_reasons(plain, H100) == []  # is_causal, aligned when sq == sk
    bottom_right = plain.replace(seqlen_q=16)
    assert any("bottom-right causal with seqlen_q != seqlen_k cannot be expressed" in r
               for r in flash.unsupported_reasons(bottom_right, H100))
    for change, feature in ((dict(window=(8, 0)), "window"), (dict(alibi=True), "alibi")):
        reasons = flash.unsupported_reasons(plain.replace(**change), H100)
        assert f"sdpa-flash takes no attn_mask on GPUs, so {feature} cannot be expressed" in reasons
    f32 = flash.unsupported_reasons(plain.replace(dtype="float32"), H100)
    assert f32 == ["dtype=float32 is not supported by sdpa-flash (bfloat16, float16)"]
    assert flash.unsupported_reasons(plain.replace(head_dim=320), H100) == ["head_dim=320 > 256"]


def test_sdpa_efficient_on_gpu_takes_masks_but_no_gqa():
    efficient = SdpaBackend("sdpa-efficient", device_type="cuda", rocm=False, enable_gqa=True)
    case = Case(batch=1, seqlen_q=16, seqlen_k=64, heads_q=8, head_dim=64, dtype="float32",
                causal=True, window=(8, 0), alibi=True)
    assert efficient.unsupported_reasons(case, H100) == []
    gqa = case.replace(heads_kv=2)
    assert efficient.unsupported_reasons(gqa, H100) == ["sdpa-efficient has no GQA (enable_gqa)"]


def test_torch_before_2_5_has_no_enable_gqa():
    flash = SdpaBackend("sdpa-flash", device_type="cuda", rocm=False, enable_gqa=False)
    case = Case(batch=1, seqlen_q=64, heads_q=8, heads_kv=2, head_dim=64)
    assert flash.unsupported_reasons(case, H100) == ["this torch has no enable_gqa (torch >= 2.5)"]


def test_sdpa_on_rocm_reports_the_library_and_has_no_cudnn():
    mi300x = from_facts({"torch_version_hip": "6.2.41133-dd7f95766", "device_count": 1,
                         "device_name": "AMD Instinct MI300X",
                         "gcn_arch_name": "gfx942:sramecc+:xnack-"})
    for name in ("sdpa-flash", "sdpa-efficient"):
        backend = SdpaBackend(name, device_type="cuda", rocm=True)
        assert backend.flavor == "rocm-" + rocm_fa_library()
    assert SdpaBackend("sdpa-math", device_type="cuda", rocm=True).flavor == "rocm"
    cudnn = SdpaBackend("sdpa-cudnn", device_type="cuda", rocm=True)
    assert cudnn.availability() == "cuDNN does not exist on ROCm"
    efficient = SdpaBackend("sdpa-efficient", device_type="cuda", rocm=True)
    gqa = Case(batch=1, seqlen_q=64, heads_q=8, heads_kv=2, head_dim=64)
    assert efficient.unsupported_reasons(gqa, mi300x) == ["sdpa-efficient has no GQA (enable_gqa)"]


def _fake_torch(pref=None, ck=None):
    cuda = types.SimpleNamespace()
    if pref is not None:
        cuda.preferred_rocm_fa_library = pref
    if ck is not None:
        cuda.is_ck_sdpa_available = ck
    return types.SimpleNamespace(backends=types.SimpleNamespace(cuda=cuda))


def _raise():
    raise RuntimeError("not a ROCm build")


@pytest.mark.parametrize("torch_module, want", [
    (_fake_torch(), "aotriton"),                                    # torch 2.3-2.5
    (_fake_torch(lambda: "_ROCmFABackend.Default"), "aotriton"),    # the default is AOTriton
    (_fake_torch(lambda: "_ROCmFABackend.AOTriton"), "aotriton"),
    (_fake_torch(lambda: "_ROCmFABackend.Ck", lambda: True), "ck"),
    (_fake_torch(lambda: "_ROCmFABackend.Ck", lambda: False), "aotriton"),  # CK not built
    (_fake_torch(_raise), "aotriton"),
])
def test_rocm_fa_library(torch_module, want):
    assert rocm_fa_library(torch_module) == want


def test_rocm_fa_library_of_this_torch_is_the_default():
    assert str(torch.backends.cuda.preferred_rocm_fa_library()).endswith("Default")
    assert rocm_fa_library() == "aotriton"


# -------------------------------------------------------------------- user kernels


def _user(func: str) -> FunctionBackend:
    return load_backend(f"{KERNELS}:{func}")


SOFTCAP = Case(batch=1, seqlen_q=32, seqlen_k=32, heads_q=2, head_dim=32, dtype="float32",
               softcap=1.0, causal=True)


def test_declared_capabilities_exclude_softcap():
    backend = _user("ignores_softcap")
    assert backend.family == "user" and "softcap" not in backend.capabilities.features
    assert backend.unsupported_reasons(SOFTCAP, CPU) == [
        f"softcap is not supported by {KERNELS}:ignores_softcap"]
    assert backend.unsupported_reasons(SOFTCAP.replace(softcap=0.0), CPU) == []


def test_a_correct_user_kernel_passes_and_a_wrong_one_fails():
    honest = FunctionBackend("honours", load_function(f"{KERNELS}:honours_softcap"))
    assert _fwd(SOFTCAP, honest).status == "pass"
    assert _fwd(SOFTCAP, _user("ignores_softcap")).status == "fail"


def test_a_kernel_without_the_parameter_cannot_be_audited():
    backend = _user("no_softcap_parameter")
    assert backend.call_reasons(SOFTCAP, CPU) == [
        f"{KERNELS}:no_softcap_parameter takes no softcap argument, which softcap needs"]


def _cli_run(tmp_path, backend: str, *extra: str):
    from harness.cli import main
    from harness.results.records import read_records

    out = tmp_path / backend.rsplit(":", 1)[-1]
    code = main(["run", "--backend", backend, "--case", SOFTCAP.to_inline_toml(),
                 "--checks", "fwd,bwd", "--out", str(out), "--no-isolation", *extra])
    return code, read_records(out / "results.jsonl")


def test_run_records_softcap_cases_as_skips_with_the_reason(tmp_path):
    code, records = _cli_run(tmp_path, f"{KERNELS}:ignores_softcap")
    assert code == 0
    assert [(r.check, r.status) for r in records] == [("fwd", "skip"), ("bwd", "skip")]
    assert all(r.reason == f"softcap is not supported by {KERNELS}:ignores_softcap"
               for r in records)


def test_audit_flags_the_kernel_that_silently_ignores_softcap(tmp_path):
    code, records = _cli_run(tmp_path, f"{KERNELS}:ignores_softcap", "--audit")
    assert code == 1
    fwd = next(r for r in records if r.check == "fwd")
    assert fwd.status == "fail" and fwd.metrics["audit"] == "silent"
    assert "SILENT" in fwd.reason and "softcap is not supported" in fwd.reason


def test_audit_calls_the_kernel_that_raises_rejected(tmp_path):
    code, records = _cli_run(tmp_path, f"{KERNELS}:rejects_softcap", "--audit")
    assert code == 0
    assert {r.status for r in records} == {"skip"}
    assert all(r.metrics["audit"] == "rejected" for r in records)
    assert "softcap is not implemented by this kernel" in records[0].reason


@pytest.mark.parametrize("spec, message", [
    (f"{FIXTURES}/kernels/missing.py:f", "no such file"),
    (f"{KERNELS}:nope", "has no function 'nope' (it defines: "),
    (f"{KERNELS}:bad_capabilities",
     "capabilities['features'] has unknown values ['sliding-window']"),
    ("not-a-backend", "unknown backend"),
])
def test_bad_backend_specs_are_one_line_usage_errors(spec, message):
    with pytest.raises(UsageError, match=None) as info:
        load_backend(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_capabilities_reject_unknown_keys():
    with pytest.raises(UsageError, match="unknown capability 'head_dim'"):
        Capabilities.from_mapping({"head_dim": 128}, "kernel.capabilities")


def test_bad_backend_on_the_command_line_exits_2(tmp_path, capsys):
    from harness.cli import main

    code = main(["run", "--backend", f"{KERNELS}:nope", "--case", SOFTCAP.to_inline_toml(),
                 "--out", str(tmp_path), "--no-isolation"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has no function 'nope'" in err


# ----------------------------------------------------------- entry-point plugins


def _install_plugin(root: Path) -> dict[str, str]:
    """Install tests/fixtures/plugin into ``root`` the way a wheel would: the module and a
    dist-info whose entry_points.txt comes from the fixture's own pyproject.toml."""
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    points = project["entry-points"]["attn_harness.backends"]
    (root / "toy_attn_plugin.py").write_text((PLUGIN / "toy_attn_plugin.py").read_text())
    dist = root / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = ["[attn_harness.backends]"] + [f"{k} = {v}" for k, v in points.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return points


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    points = _install_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield points
    sys.modules.pop("toy_attn_plugin", None)


def test_entry_point_plugins_are_known_backends(plugin):
    assert set(plugin) <= set(known_backends())
    assert known_backends()[:5] == ["flash-attn", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                                    "sdpa-math"]


def test_a_plugin_function_is_a_backend_with_its_distribution_version(plugin):
    backend = load_backend("toy-attention")
    assert backend.describe() == {"name": "toy-attention", "family": "plugin", "flavor": "",
                                  "version": "0.1.0"}
    case = Case(batch=1, seqlen_q=16, seqlen_k=24, heads_q=2, head_dim=16, dtype="float32",
                scale=0.5)
    assert _fwd(case, backend).status == "pass"
    assert backend.unsupported_reasons(case.replace(causal=True), CPU) == [
        "toy-attention takes no causal argument, which causal needs",
        "causal is not supported by toy-attention"]


def test_a_plugin_backend_class_gets_the_entry_point_name(plugin):
    backend = load_backend("toy-class")
    assert (backend.name, backend.family, backend.flavor) == ("toy-class", "plugin", "toy")
    case = Case(batch=1, seqlen_q=16, heads_q=2, head_dim=16, dtype="float32")
    assert _fwd(case, backend).status == "pass"


def test_a_broken_plugin_is_a_one_line_error(plugin):
    with pytest.raises(UsageError) as info:
        load_backend("toy-broken")
    assert str(info.value).startswith("--backend toy-broken: loading entry point "
                                      "toy_attn_plugin:does_not_exist failed: AttributeError")


def test_info_json_lists_every_family_with_reasons(tmp_path):
    """``attn-harness info --json`` in a fresh process, with the plugin installed."""
    _install_plugin(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "info", "--json"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert set(info) == {"target", "backends"}
    assert info["target"]["target_id"] == "cpu-" + info["target"]["arch"].lower()
    by_name = {b["name"]: b for b in info["backends"]}
    assert list(by_name)[:5] == ["flash-attn", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                                 "sdpa-math"]
    for b in info["backends"]:
        assert {"name", "available", "reason", "family", "flavor", "version"} <= set(b)
        assert b["available"] == (b["reason"] == ""), b
    assert by_name["sdpa-math"]["available"] and by_name["sdpa-flash"]["available"]
    if not torch.cuda.is_available():
        assert by_name["sdpa-efficient"]["reason"].startswith("no GPU here")
        assert by_name["sdpa-cudnn"]["reason"].startswith("no GPU here")
    assert by_name["toy-attention"]["available"] and by_name["toy-attention"]["family"] == "plugin"
    assert not by_name["toy-broken"]["available"]
    assert "does_not_exist" in by_name["toy-broken"]["reason"]


def test_gpu_sdpa_kernels_do_not_promise_a_deterministic_backward():
    from harness.backends.sdpa import SdpaBackend

    for name in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn"):
        caps = SdpaBackend(name, device_type="cuda", rocm=False).capabilities
        assert caps.deterministic_backward is False
        assert "deterministic" in caps.notes["deterministic_backward"]
    math = SdpaBackend("sdpa-math", device_type="cuda", rocm=False)
    assert math.capabilities.deterministic_backward
    assert SdpaBackend("sdpa-flash", device_type="cpu").capabilities.deterministic_backward
