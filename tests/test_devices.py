"""Several GPUs per machine: --devices parsing and resolution, and pinning xdist workers to GPUs.

No GPU is needed: device counts and vendors are given, and the pytest-xdist run forces the
vendor through ATTN_HARNESS_GPU_VENDOR, so the variables are set exactly as on a GPU machine.
"""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.errors import UsageError
from harness.run.devices import (
    VENDOR_ENV,
    apply_env,
    detect_vendor,
    parse_devices,
    pin_env,
    pin_xdist_worker,
    resolve_devices,
    xdist_slot,
)

pytest_plugins = ["pytester"]


@pytest.mark.parametrize("text, expected", [
    ("all", "all"), ("ALL", "all"), ("0", (0,)), ("0,1,3", (0, 1, 3)), (" 2, 0 ", (2, 0)),
])
def test_parse_devices(text, expected):
    assert parse_devices(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "give 'all' or device indices"), ("gpu0", "give 'all' or device indices"),
    ("0,,1", "give 'all' or device indices"), ("-1", "give 'all' or device indices"),
    ("1,0,1", "device 1 is listed twice"),
])
def test_parse_devices_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_devices(text)


def test_resolve_devices():
    assert resolve_devices("all", 4, "amd") == [0, 1, 2, 3]
    assert resolve_devices((3, 1), 4, "nvidia") == [3, 1]
    assert resolve_devices("all", 0, "cpu") == []  # the caller notes it and runs on the CPU
    with pytest.raises(UsageError, match=r"--devices 0,1: this machine has no GPU .* drop "
                                         r"--devices to run on the CPU"):
        resolve_devices((0, 1), 0, "cpu")
    with pytest.raises(UsageError, match=r"device 4 does not exist \(torch sees 4 device\(s\): "
                                         r"0..3\)"):
        resolve_devices((0, 4), 4, "amd")


@pytest.mark.parametrize("vendor, environ, slot, expected", [
    ("nvidia", {}, 2, {"CUDA_VISIBLE_DEVICES": "2"}),
    ("nvidia", {"CUDA_VISIBLE_DEVICES": "4,5"}, 1, {"CUDA_VISIBLE_DEVICES": "5"}),
    ("nvidia", {"CUDA_VISIBLE_DEVICES": "4,5"}, 3, {"CUDA_VISIBLE_DEVICES": "5"}),  # wraps
    ("nvidia", {"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2"}, 1, {"CUDA_VISIBLE_DEVICES": "GPU-b2"}),
    ("nvidia", {"HIP_VISIBLE_DEVICES": "7"}, 0, {"CUDA_VISIBLE_DEVICES": "0"}),  # ignored there
    ("amd", {}, 1, {"HIP_VISIBLE_DEVICES": "1"}),
    ("amd", {"CUDA_VISIBLE_DEVICES": "2,3"}, 1,
     {"HIP_VISIBLE_DEVICES": "3", "CUDA_VISIBLE_DEVICES": None}),
    ("amd", {"HIP_VISIBLE_DEVICES": "6,7", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 0,
     {"HIP_VISIBLE_DEVICES": "6", "CUDA_VISIBLE_DEVICES": None}),
    ("amd", {"ROCR_VISIBLE_DEVICES": "4,5", "HIP_VISIBLE_DEVICES": "0,1"}, 1,
     {"HIP_VISIBLE_DEVICES": "1"}),  # ROCR filters first and is left alone
    ("cpu", {"CUDA_VISIBLE_DEVICES": "0"}, 0, {}),
])
def test_pin_env(vendor, environ, slot, expected):
    assert pin_env(environ, vendor, slot) == expected


def test_pin_env_with_nothing_visible_is_a_usage_error():
    with pytest.raises(UsageError, match="CUDA_VISIBLE_DEVICES is set but empty"):
        pin_env({"CUDA_VISIBLE_DEVICES": ""}, "nvidia", 0)


def test_xdist_slot():
    assert xdist_slot({"PYTEST_XDIST_WORKER": "gw0"}) == 0
    assert xdist_slot({"PYTEST_XDIST_WORKER": "gw12"}) == 12
    assert xdist_slot({"PYTEST_XDIST_WORKER": "master"}) is None
    assert xdist_slot({}) is None


def test_pin_xdist_worker_applies_and_describes():
    env = {"PYTEST_XDIST_WORKER": "gw1", "CUDA_VISIBLE_DEVICES": "2,3"}
    line = pin_xdist_worker(env, vendor="amd")
    assert env == {"PYTEST_XDIST_WORKER": "gw1", "HIP_VISIBLE_DEVICES": "3"}
    assert line == ("xdist worker gw1 pinned to one amd GPU: HIP_VISIBLE_DEVICES=3, "
                    "CUDA_VISIBLE_DEVICES unset")
    untouched = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert pin_xdist_worker(untouched, vendor="nvidia") == ""  # not an xdist worker
    assert untouched == {"CUDA_VISIBLE_DEVICES": "2,3"}
    with pytest.raises(UsageError, match=f"{VENDOR_ENV}='intel': must be one of"):
        pin_xdist_worker({"PYTEST_XDIST_WORKER": "gw0", VENDOR_ENV: "intel"})


def test_apply_env_unsets():
    env = {"A": "1", "B": "2"}
    apply_env({"A": None, "C": "3"}, env)
    assert env == {"B": "2", "C": "3"}


def test_detect_vendor_from_device_files(tmp_path):
    (tmp_path / "kfd").touch()
    markers = [("amd", str(tmp_path / "kfd")), ("nvidia", str(tmp_path / "nvidiactl"))]
    assert detect_vendor(markers) == "amd"
    assert detect_vendor(markers[1:]) == "cpu"


def test_xdist_workers_are_pinned_one_gpu_each(pytester, monkeypatch):
    """pytest -n 2 through the installed plugin: each worker sees its own device."""
    monkeypatch.setenv(VENDOR_ENV, "amd")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # when this suite runs under -n
    pytester.makepyfile("""
        import json, os, pathlib, pytest

        @pytest.mark.parametrize("i", range(4))
        def test_env(i):
            name = os.environ["PYTEST_XDIST_WORKER"]
            seen = {k: os.environ.get(k) for k in ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")}
            pathlib.Path(name + ".json").write_text(json.dumps(seen))
    """)
    # pinning happens only in a session that asks for the harness (an --attn-* option)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "--attn-seed=0")
    result.assert_outcomes(passed=4)
    seen = {p.stem: json.loads(p.read_text()) for p in pytester.path.glob("gw*.json")}
    assert seen == {"gw0": {"HIP_VISIBLE_DEVICES": "4", "CUDA_VISIBLE_DEVICES": None},
                    "gw1": {"HIP_VISIBLE_DEVICES": "5", "CUDA_VISIBLE_DEVICES": None}}


def test_cli_devices_on_a_cpu(capsys):
    assert main(["run", "--devices", "0", "--case", "{seqlen_q = 4}", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "attn-harness run: error: --devices 0: this machine has no GPU that torch can see; "
        "drop --devices to run on the CPU"]


def test_cli_devices_parse_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--devices", "gpu1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("attn-harness run: error: argument --devices: could not parse 'gpu1': give "
                   "'all' or device indices such as 0,1,3 (see attn-harness run --help)")
