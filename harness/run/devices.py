"""Several GPUs in one machine: which devices a run uses, and how a process is pinned to one.

Two ways to use every GPU of a machine, one worker process per GPU:

* ``attn-harness run --devices all|0,1,...`` starts one runner worker per device index
  (:func:`parse_devices`, :func:`resolve_devices`; the runner calls ``torch.cuda.set_device``).
* ``pytest -n N`` (pytest-xdist) pins xdist worker ``gwI`` to the I-th visible GPU by setting the
  vendor's visibility variable before the worker touches the device (:func:`pin_env`,
  :func:`pin_xdist_worker`, called from the pytest plugin).

Visibility variables, in the order each vendor's runtime reads them: NVIDIA reads
``CUDA_VISIBLE_DEVICES``; AMD's HIP reads ``HIP_VISIBLE_DEVICES`` and, when that is unset,
``CUDA_VISIBLE_DEVICES`` (``ROCR_VISIBLE_DEVICES`` filters below both and is left alone, so
indices stay relative to it). Pinning sets the first variable of the vendor's list to one
device and unsets the others, so no two variables can disagree. Nothing here imports torch:
the vendor is read from device files, so pinning happens before any GPU runtime starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path

from harness.errors import UsageError

#: Visibility variables per vendor, the one that wins first.
VISIBILITY: dict[str, tuple[str, ...]] = {
    "nvidia": ("CUDA_VISIBLE_DEVICES",),
    "amd": ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"),
}

#: Files whose presence tells which vendor's GPUs this machine (or container) exposes.
VENDOR_MARKERS: tuple[tuple[str, str], ...] = (
    ("amd", "/dev/kfd"),
    ("nvidia", "/dev/nvidiactl"),
    ("nvidia", "/proc/driver/nvidia/version"),
)

ALL = "all"
#: Overrides the vendor read from device files (containers may hide them): amd, nvidia or cpu.
VENDOR_ENV = "ATTN_HARNESS_GPU_VENDOR"


# ------------------------------------------------------------------------------ --devices


def parse_devices(value: str) -> str | tuple[int, ...]:
    """Parse ``--devices``: ``all`` or a comma-separated list of distinct device indices.

    Raises:
        ValueError: with a message saying what is wrong and what is accepted.
    """
    text = value.strip().lower()
    if text == ALL:
        return ALL
    items = [item.strip() for item in text.split(",")]
    if not text or any(not re.fullmatch(r"\d+", item) for item in items):
        raise ValueError(f"could not parse {value!r}: give 'all' or device indices such as 0,1,3")
    indices = tuple(int(item) for item in items)
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise ValueError(f"could not parse {value!r}: device {repeated[0]} is listed twice")
    return indices


def resolve_devices(spec: str | tuple[int, ...], device_count: int, vendor: str) -> list[int]:
    """The device indices a run uses, given what the machine has.

    ``all`` on a machine without GPUs returns ``[]`` (the caller runs on the CPU and says so);
    explicit indices there, or indices past the last device, are a usage error.
    """
    if spec == ALL:
        return list(range(device_count)) if vendor != "cpu" else []
    assert isinstance(spec, tuple)
    listed = ",".join(str(i) for i in spec)
    if vendor == "cpu" or device_count == 0:
        raise UsageError(f"--devices {listed}: this machine has no GPU that torch can see; "
                         "drop --devices to run on the CPU")
    missing = [i for i in spec if i >= device_count]
    if missing:
        raise UsageError(f"--devices {listed}: device {missing[0]} does not exist (torch sees "
                         f"{device_count} device(s): 0..{device_count - 1}); use --devices all")
    return list(spec)


# ------------------------------------------------------------------------------ pinning


def visible_list(environ: Mapping[str, str], vendor: str) -> list[str] | None:
    """The devices the vendor's runtime would see, as written in the variable in effect
    (indices or UUIDs); None when no variable restricts them."""
    for name in VISIBILITY.get(vendor, ()):
        value = environ.get(name)
        if value is not None:
            return [item.strip() for item in value.split(",") if item.strip()]
    return None


def pin_env(environ: Mapping[str, str], vendor: str, slot: int) -> dict[str, str | None]:
    """Environment changes that show worker ``slot`` exactly one GPU.

    The slot picks the ``slot``-th entry of the list already visible (wrapping around when
    there are more workers than devices), or device ``slot`` when nothing restricts them.
    Returns variable -> value, where None means unset it; empty when ``vendor`` has no GPUs.

    Raises:
        UsageError: when the visible list is empty (a variable hides every device).
    """
    names = VISIBILITY.get(vendor)
    if not names:
        return {}
    visible = visible_list(environ, vendor)
    if visible is None:
        device = str(slot)
    elif not visible:
        raise UsageError(f"{names[0]} is set but empty, so no GPU is visible to pin worker "
                         f"{slot} to; unset it or list devices")
    else:
        device = visible[slot % len(visible)]
    changes: dict[str, str | None] = {names[0]: device}
    for other in names[1:]:
        if other in environ:
            changes[other] = None
    return changes


def apply_env(changes: Mapping[str, str | None], environ: MutableMapping[str, str]) -> None:
    """Apply :func:`pin_env`'s changes to ``environ`` (None unsets)."""
    for name, value in changes.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value


def xdist_slot(environ: Mapping[str, str]) -> int | None:
    """The index of this pytest-xdist worker (``gw3`` -> 3); None outside xdist workers."""
    match = re.fullmatch(r"gw(\d+)", environ.get("PYTEST_XDIST_WORKER", ""))
    return int(match.group(1)) if match else None


def detect_vendor(markers: Sequence[tuple[str, str]] = VENDOR_MARKERS) -> str:
    """amd, nvidia or cpu, from device files (no GPU runtime is started)."""
    for vendor, path in markers:
        if Path(path).exists():
            return vendor
    return "cpu"


def pin_xdist_worker(environ: MutableMapping[str, str] | None = None,
                     vendor: str | None = None) -> str:
    """Pin this pytest-xdist worker to its own GPU; call before anything touches the GPU.

    Returns a one-line description for the test report header ('' when nothing was done:
    not an xdist worker, or no GPU here).
    """
    env = os.environ if environ is None else environ
    slot = xdist_slot(env)
    if slot is None:
        return ""
    vendor = vendor or env.get(VENDOR_ENV) or detect_vendor()
    if vendor not in (*VISIBILITY, "cpu"):
        raise UsageError(f"{VENDOR_ENV}={vendor!r}: must be one of amd, nvidia, cpu")
    changes = pin_env(env, vendor, slot)
    if not changes:
        return ""
    apply_env(changes, env)
    shown = ", ".join(f"{k}={v}" if v is not None else f"{k} unset" for k, v in changes.items())
    return f"xdist worker gw{slot} pinned to one {vendor} GPU: {shown}"
