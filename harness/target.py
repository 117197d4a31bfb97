"""The machine fingerprint: what ran the kernels, in enough detail to compare machines.

Detection is split in two so it can be tested without the hardware: :func:`probe` reads the
raw platform facts (torch's version strings, device properties, files) into a plain dict, and
:func:`from_facts` turns such a dict into a :class:`Target`. Tests feed :func:`from_facts` facts
recorded on real ROCm and CUDA machines (``tests/fixtures/platforms``).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from harness import __version__

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Peak:
    """Dense fp16/bf16 tensor throughput of one device, with where the number comes from.

    ``tflops`` is None for a device that is recognised but has no public dense figure we trust
    (so it is not mistaken for a sibling with a different clock or die).
    """

    tflops: float | None
    source: str
    #: Dense fp8 tensor throughput (TFLOP/s), for fp8 cases (issue 14); None when not recorded.
    fp8_tflops: float | None = None


#: Dense (no sparsity) fp16/bf16 tensor-core peak per device, with fp32 accumulation where the
#: vendor distinguishes (attention kernels accumulate in fp32). Matched against the lower-cased
#: device name as whole words, in order (first match wins, so specific names come first:
#: ``h100 nvl`` before ``h100``). NVIDIA datasheets quote 2:4-sparse figures with an asterisk;
#: the dense figure is half of it. AMD multi-die packages (MI250X, MI250) appear to torch as one
#: device per GCD, so the per-GCD half of the package figure is used.
PEAKS: tuple[tuple[str, Peak], ...] = (
    ("h100 pcie", Peak(756.5, "NVIDIA H100 datasheet (PCIe): 1,513 TFLOPS FP16 with sparsity, "
                              "756.5 dense")),
    ("h100 nvl", Peak(835.5, "NVIDIA H100 NVL datasheet: 1,671 TFLOPS FP16 per GPU with sparsity, "
                             "half dense")),
    ("h100", Peak(989.4, "NVIDIA H100 datasheet (SXM): 1,979 TFLOPS FP16 with sparsity, half "
                         "dense; FP8 3,958 with sparsity, 1,978.9 dense", 1978.9)),
    ("h200 nvl", Peak(None, "H200 NVL runs at a lower power limit than H200 SXM; no dense figure "
                            "recorded here")),
    ("h200", Peak(989.4, "NVIDIA H200 datasheet (SXM): 1,979 TFLOPS FP16 with sparsity, half "
                         "dense; FP8 3,958 with sparsity, 1,978.9 dense", 1978.9)),
    ("h800", Peak(989.4, "NVIDIA H800 SXM: same tensor cores and clocks as H100 SXM, 989.4 TFLOPS "
                         "dense FP16")),
    ("gh200", Peak(989.4, "NVIDIA GH200 datasheet: 1,979 TFLOPS FP16 with sparsity, half dense")),
    ("a100", Peak(312.0, "NVIDIA A100 datasheet: 312 TFLOPS FP16/BF16 tensor, dense (624 with "
                         "sparsity)")),
    ("a800", Peak(312.0, "NVIDIA A800: same tensor cores as A100, 312 TFLOPS dense")),
    ("l40s", Peak(362.05, "NVIDIA L40S datasheet: 733 TFLOPS FP16 with sparsity, 362.05 dense")),
    ("l40", Peak(181.05, "NVIDIA L40 datasheet: 362.1 TFLOPS FP16 with sparsity, 181.05 dense")),
    ("a10g", Peak(None, "A10G is an AWS-specific part without a public NVIDIA datasheet figure")),
    ("a10", Peak(125.0, "NVIDIA A10 datasheet: 250 TFLOPS FP16 with sparsity, 125 dense")),
    ("l4", Peak(121.0, "NVIDIA L4 datasheet: 242 TFLOPS FP16 with sparsity, half dense")),
    ("t4", Peak(65.0, "NVIDIA T4 datasheet: 65 TFLOPS mixed precision (FP16/FP32)")),
    ("rtx 4090", Peak(165.2, "NVIDIA Ada Lovelace whitepaper, RTX 4090: 165.2 TFLOPS FP16 "
                             "tensor with FP32 accumulate, dense (330.3 with FP16 accumulate)")),
    ("gb200", Peak(2500.0, "NVIDIA GB200 (B200 at 1,200 W): 2,500 TFLOPS FP16/BF16 dense, 5,000 "
                           "FP8 dense (NVIDIA's Blackwell figures as tabulated at "
                           "glennklockwood.com/garden/processors/B200: a secondary copy)", 5000.0)),
    ("b200", Peak(2250.0, "NVIDIA HGX B200 (1,000 W): 2,250 TFLOPS FP16/BF16 dense (4,500 with "
                          "sparsity), 4,500 FP8 dense (NVIDIA's Blackwell figures as tabulated at "
                          "glennklockwood.com/garden/processors/B200: a secondary copy)", 4500.0)),
    ("mi355x", Peak(2516.6, "AMD Instinct MI355X (CDNA 4, 2.4 GHz): 2,516.6 TFLOPS FP16/BF16 "
                            "dense, 5,033.2 FP8 dense (AMD's figures via secondary copies: the "
                            "vendor sheet was not found in the search index; 256 CUs x 2.4 GHz x "
                            "4,096 FLOP/clock agrees)", 5033.2)),
    ("mi350x", Peak(2306.9, "AMD Instinct MI350X (CDNA 4, 2.2 GHz): 4.61 PFLOPS FP16 with sparsity "
                            "(a secondary copy of AMD's table), half dense; 256 CUs x 2.2 GHz x "
                            "4,096 FLOP/clock = 2,306.9; FP8 dense twice that", 4613.7)),
    ("mi325x", Peak(1307.4, "AMD Instinct MI325X datasheet: 1,307.4 TFLOPS FP16/BF16 dense, "
                            "2,614.9 FP8 dense (5,229.8 with sparsity); figures as copied by "
                            "secondary sources (awesomeagents.ai, slicast.com), same compute as "
                            "MI300X",
                    2614.9)),
    ("mi300x", Peak(1307.4, "AMD Instinct MI300X datasheet: 1,307.4 TFLOPS FP16/BF16 dense "
                            "(2,614.9 with sparsity); FP8 2,614.9 dense", 2614.9)),
    ("mi300a", Peak(980.6, "AMD Instinct MI300A datasheet: 980.6 TFLOPS FP16/BF16 dense")),
    ("mi250x", Peak(191.5, "AMD Instinct MI250X datasheet: 383 TFLOPS FP16 per package of two "
                           "GCDs, 191.5 per GCD")),
    ("mi250", Peak(181.05, "AMD Instinct MI250 datasheet: 362.1 TFLOPS FP16 per package of two "
                           "GCDs, 181.05 per GCD")),
    ("mi210", Peak(181.0, "AMD Instinct MI210 datasheet: 181 TFLOPS FP16/BF16 dense")),
    ("7900 xtx", Peak(122.8, "AMD Radeon RX 7900 XTX specifications: 122.8 TFLOPS FP16 (WMMA)")),
    ("w7900", Peak(122.6, "AMD Radeon PRO W7900 datasheet: 122.6 TFLOPS FP16 (WMMA)")),
)

#: Short device names for target ids, matched like PEAKS.
SHORT_NAMES: tuple[tuple[str, str], ...] = (
    ("h100 pcie", "h100-pcie"), ("h100 nvl", "h100-nvl"), ("gh200", "gh200"), ("h100", "h100"),
    ("h200 nvl", "h200-nvl"), ("h200", "h200"), ("h800", "h800"), ("h20", "h20"), ("a100", "a100"),
    ("a800", "a800"), ("l40s", "l40s"), ("l40", "l40"), ("a10g", "a10g"), ("a10", "a10"),
    ("l4", "l4"), ("t4", "t4"), ("rtx 4090", "rtx4090"), ("gb200", "gb200"), ("b200", "b200"),
    ("mi355x", "mi355x"),
    ("mi350x", "mi350x"), ("mi325x", "mi325x"), ("mi300x", "mi300x"), ("mi300a", "mi300a"),
    ("mi250x", "mi250x"), ("mi250", "mi250"), ("mi210", "mi210"), ("7900 xtx", "rx7900xtx"),
    ("w7900", "w7900"),
)

#: AMD architectures by the marketing name torch reports when gcnArchName is missing (old torch).
GFX_BY_NAME = (("mi355", "gfx950"), ("mi350", "gfx950"), ("mi300", "gfx942"), ("mi325", "gfx942"),
               ("mi250", "gfx90a"), ("mi210", "gfx90a"), ("7900", "gfx1100"))


def _lookup(table: tuple[tuple[str, Any], ...], device_name: str) -> Any:
    """The value of the first ``needle`` found in ``device_name`` as whole words, or None.

    Whole words: ``l4`` matches ``NVIDIA L4`` but not ``NVIDIA L40S``; ``a100`` matches
    ``NVIDIA A100-SXM4-80GB``; ``h200`` does not match ``GH200``.
    """
    lowered = " ".join(device_name.lower().split())
    for needle, value in table:
        if re.search(rf"(?<![a-z0-9]){re.escape(needle)}(?![a-z0-9])", lowered):
            return value
    return None


@dataclass(frozen=True)
class Target:
    """Where a result was measured.

    Attributes:
        vendor: nvidia, amd or cpu.
        device_name: as torch reports it (``AMD Instinct MI300X``); the CPU model on the CPU.
        arch: ``sm_90``, ``gfx942`` (without feature flags) or the CPU architecture.
        arch_raw: the unabridged architecture string (``gfx942:sramecc+:xnack-``).
        runtime: ``CUDA 12.4``, ``ROCm 6.2.1`` or ``CPU``.
        runtime_version: ``12.4`` / ``6.2.1``; empty on the CPU.
        driver: GPU driver version where known.
        device_count: visible devices of this vendor.
        memory_bytes: memory of one device (system memory on the CPU).
        torch, triton: package versions (empty when absent).
        libraries: what the backend families contribute (:func:`harness.backends.machine_facts`
            through :func:`harness.run.machine.detect`): kernel package versions and builds, e.g.
            ``flash_attn``, ``flash_attn_flavor``, ``sdpa_rocm_library``. This module knows no
            backend.
        harness, git_revision, python: the harness build and interpreter.
        cpu_threads: torch's intra-op threads (timings on the CPU depend on it).
        peak_tflops: the device's dense fp16/bf16 peak, None when unknown.
        peak_source: the citation for ``peak_tflops``.
    """

    vendor: str
    device_name: str
    arch: str
    arch_raw: str = ""
    runtime: str = "CPU"
    runtime_version: str = ""
    driver: str = ""
    device_count: int = 0
    memory_bytes: int = 0
    torch: str = ""
    triton: str = ""
    libraries: dict[str, str] = field(default_factory=dict)
    harness: str = __version__
    git_revision: str = ""
    python: str = ""
    cpu_threads: int = 0
    peak_tflops: float | None = None
    peak_source: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def target_id(self) -> str:
        """Short, readable, stable.

        For example ``rocm6.2-gfx942-mi300x``, ``cuda12.4-sm90-h100``, ``cpu-x86_64``.
        """
        if self.vendor == "cpu":
            return "cpu-" + (re.sub(r"[^a-z0-9_]+", "-", self.arch.lower()).strip("-") or "unknown")
        major_minor = ".".join(self.runtime_version.split(".")[:2])
        runtime = ("rocm" if self.vendor == "amd" else "cuda") + major_minor
        arch = self.arch.replace("_", "")
        return f"{runtime}-{arch}-{short_name(self.device_name)}"

    @property
    def device_type(self) -> str:
        """torch's device type for this target (ROCm uses ``cuda`` too)."""
        return "cpu" if self.vendor == "cpu" else "cuda"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_id"] = self.target_id
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def short_name(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``; unknown names become a slug of the name."""
    short = _lookup(SHORT_NAMES, device_name)
    if short:
        return short
    return _slug(re.sub(r"^(nvidia|amd instinct|amd|geforce)\s+", "", device_name.lower())) or "gpu"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def peak_for(device_name: str) -> Peak | None:
    """The PEAKS entry for a device name, None when the device is not in the table."""
    return _lookup(PEAKS, device_name)


def normalize_arch(vendor: str, raw: Any, device_name: str = "") -> str:
    """The architecture without decorations.

    AMD: ``gfx942:sramecc+:xnack-`` (torch's ``gcnArchName``) or ``amdgcn-amd-amdhsa--gfx90a:
    sramecc+:xnack-`` (rocminfo's ISA name) -> ``gfx942`` / ``gfx90a``; without a raw string, from
    the marketing name. NVIDIA: ``(9, 0)``, ``[9, 0]`` or ``"9.0"`` -> ``sm_90``.
    """
    if vendor == "amd":
        text = str(raw or "").strip()
        if text:
            return text.rsplit("--", 1)[-1].split(":")[0].strip()
        lowered = device_name.lower()
        for needle, gfx in GFX_BY_NAME:
            if needle in lowered:
                return gfx
        return "gfx-unknown"
    if vendor == "nvidia":
        parts = (list(raw) if isinstance(raw, (tuple, list))
                 else re.findall(r"\d+", str(raw or "")))
        if len(parts) >= 2:
            return f"sm_{int(parts[0])}{int(parts[1])}"
        return "sm_unknown"
    return str(raw or "")


def rocm_version(hip: str, version_file_text: str = "") -> str:
    """The ROCm release.

    Preferred: the install's own ``$ROCM_PATH/.info/version`` (``6.2.4-120`` -> ``6.2.4``).
    Otherwise ``torch.version.hip``, whose third field is a HIP build number, not a patch
    release (``6.2.41133-dd7f95766`` -> ``6.2``). Empty when neither says.
    """
    match = re.match(r"\s*(\d+\.\d+(?:\.\d+)?)", version_file_text or "")
    if match:
        return match.group(1)
    match = re.match(r"\s*(\d+)\.(\d+)", hip or "")
    return f"{match.group(1)}.{match.group(2)}" if match else ""


#: Library facts older records and fixtures carry at the top level of the facts.
LEGACY_LIBRARY_FACTS = ("flash_attn", "flash_attn_flavor", "sdpa_rocm_library")


def _libraries(facts: dict[str, Any]) -> dict[str, str]:
    out = {k: str(v) for k, v in (facts.get("libraries") or {}).items() if v not in ("", None)}
    for key in LEGACY_LIBRARY_FACTS:
        if facts.get(key):
            out.setdefault(key, str(facts[key]))
    return out


def from_facts(facts: dict[str, Any]) -> Target:
    """Build a Target from raw platform facts (see :func:`probe` for the keys).

    ``extra`` keeps the raw strings the summary fields were derived from
    (``torch_version_hip``, ``rocm_version_file``, AMD ``capability``), so a report can show
    exactly what the machine said.
    """
    hip = facts.get("torch_version_hip") or ""
    cuda = facts.get("torch_version_cuda") or ""
    has_gpu = bool(facts.get("device_count"))
    common = dict(
        torch=facts.get("torch", ""), triton=facts.get("triton", ""),
        libraries=_libraries(facts),
        git_revision=facts.get("git_revision", ""), python=facts.get("python", ""),
        cpu_threads=int(facts.get("cpu_threads", 0) or 0),
    )
    if not has_gpu:
        return Target(vendor="cpu", device_name=facts.get("cpu_name", "") or "CPU",
                      arch=facts.get("machine", "") or "unknown", arch_raw=facts.get("machine", ""),
                      memory_bytes=int(facts.get("system_memory_bytes", 0) or 0), **common)
    name = facts.get("device_name", "")
    peak = peak_for(name)
    device = dict(
        device_name=name, driver=facts.get("driver", ""), device_count=int(facts["device_count"]),
        memory_bytes=int(facts.get("device_memory_bytes", 0) or 0),
        peak_tflops=peak.tflops if peak else None, peak_source=peak.source if peak else "",
    )
    if hip:
        raw = facts.get("gcn_arch_name", "") or ""
        version = rocm_version(hip, facts.get("rocm_version_file", ""))
        extra = {"torch_version_hip": hip}
        if (facts.get("rocm_version_file") or "").strip():
            extra["rocm_version_file"] = facts["rocm_version_file"].strip()
        if facts.get("capability"):
            extra["capability"] = ".".join(str(x) for x in facts["capability"])
        return Target(vendor="amd", arch=normalize_arch("amd", raw, name), arch_raw=raw,
                      runtime=f"ROCm {version}".strip(), runtime_version=version,
                      extra=extra,
                      **device, **common)
    capability = facts.get("capability") or (0, 0)
    return Target(vendor="nvidia", arch=normalize_arch("nvidia", capability),
                  arch_raw=".".join(str(x) for x in capability), runtime=f"CUDA {cuda}".strip(),
                  runtime_version=cuda, **device, **common)


# ------------------------------------------------------------------------------ probing


def probe(device_index: int = 0) -> dict[str, Any]:
    """Read this machine's raw platform facts. Optional helpers only enrich them."""
    import torch

    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_version_cuda": torch.version.cuda or "",
        "torch_version_hip": getattr(torch.version, "hip", None) or "",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_name": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "system_memory_bytes": _system_memory(),
        "git_revision": git_revision(),
        "triton": (_package_version("triton") or _package_version("pytorch-triton-rocm")
                   or _package_version("pytorch-triton")),
        "device_count": 0,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device_index)
        facts.update(
            device_count=torch.cuda.device_count(),
            device_name=props.name,
            device_memory_bytes=props.total_memory,
            capability=(props.major, props.minor),
            gcn_arch_name=getattr(props, "gcnArchName", "") or "",
            driver=_driver_version(bool(facts["torch_version_hip"])),
        )
        if facts["torch_version_hip"]:
            rocm_path = os.environ.get("ROCM_PATH") or "/opt/rocm"
            facts["rocm_version_file"] = _read(f"{rocm_path}/.info/version")
    return facts


def detect(device_index: int = 0) -> Target:
    """This machine's fingerprint."""
    return from_facts(probe(device_index))


#: The revision the sources were taken from, recorded as given and preferred to ``.git``: for
#: copies without git metadata (an unpacked tarball) or with stale metadata (a synced tree).
REVISION_ENV = "ATTN_HARNESS_GIT_REVISION"


def git_revision() -> str:
    """:data:`REVISION_ENV` when set; else the checkout's short revision (``-dirty`` with
    uncommitted changes to tracked files); else empty."""
    given = os.environ.get(REVISION_ENV, "").strip()
    if given or not (REPO_ROOT / ".git").exists():
        return given
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=5,
                               check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    rev = out.stdout.strip()
    return rev + ("-dirty" if rev and dirty.stdout.strip() else "")


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def _cpu_name() -> str:
    text = _read("/proc/cpuinfo")
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _system_memory() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _driver_version(rocm: bool) -> str:
    """The kernel driver version from sysfs/procfs, else from an optional helper library
    (amdsmi on ROCm, nvidia-ml-py on CUDA) when one is installed; empty when nothing says."""
    if rocm:
        text = _read("/sys/module/amdgpu/version").strip()
        return text or _optional_driver_version("amdsmi")
    return (nvidia_driver_from_proc(_read("/proc/driver/nvidia/version"))
            or _optional_driver_version("pynvml"))


def nvidia_driver_from_proc(text: str) -> str:
    """The driver version in ``/proc/driver/nvidia/version``: the first dotted number after
    "Kernel Module" (the open module writes "Open Kernel Module for x86_64  580.159.03")."""
    match = re.search(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)?)\b", text)
    return match.group(1) if match else ""


def _optional_driver_version(module: str) -> str:
    """The driver version through ``amdsmi`` or ``pynvml``; any failure (not installed, no
    device, an API that changed) only means less detail, never an error."""
    try:
        if module == "pynvml":
            import pynvml

            pynvml.nvmlInit()
            try:
                version = pynvml.nvmlSystemGetDriverVersion()
            finally:
                pynvml.nvmlShutdown()
        else:
            import amdsmi

            amdsmi.amdsmi_init()
            try:
                handle = amdsmi.amdsmi_get_processor_handles()[0]
                version = amdsmi.amdsmi_get_gpu_driver_info(handle)["driver_version"]
            finally:
                amdsmi.amdsmi_shut_down()
    except Exception:  # noqa: BLE001 - an absent or failing helper only means less detail
        return ""
    return version.decode() if isinstance(version, bytes) else str(version)
