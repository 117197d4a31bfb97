"""A capabilities value of the wrong type is one line naming the field and the type it takes,
exit 2 (tests/fixtures/kernels/bad_capabilities.py). Before, ``{"dtypes": 5}`` printed a worker
traceback and ``{"head_dim_max": "abc"}`` was taken and failed on every case."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.backends.base import Capabilities
from harness.errors import UsageError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kernels"


@pytest.mark.parametrize("value, expected", [
    ({"dtypes": 5}, "capabilities['dtypes'] must be a list of names, got int 5"),
    ({"dtypes": "float16"}, "capabilities['dtypes'] must be a list of names, got str 'float16'"),
    ({"features": [1, 2]}, "capabilities['features'] must be a list of names, got list [1, 2]"),
    ({"head_dim_max": "abc"}, "capabilities['head_dim_max'] must be an integer >= 0, got str "
                              "'abc'"),
    ({"head_dim_max": 12.5}, "capabilities['head_dim_max'] must be an integer >= 0"),
    ({"head_dim_multiple": 0}, "capabilities['head_dim_multiple'] must be an integer >= 1"),
    ({"paged_block_multiple": True}, "capabilities['paged_block_multiple'] must be an integer"),
    ({"backward": "no"}, "capabilities['backward'] must be true or false, got str 'no'"),
    ({"returns_lse": 1}, "capabilities['returns_lse'] must be true or false, got int 1"),
    ({"exclusive": ["softcap", "dropout"]}, "capabilities['exclusive'] must be a list of "
                                            "[feature, feature] pairs"),
    ({"notes": ["why"]}, "capabilities['notes'] must be a table of feature = reason strings"),
])
def test_a_value_of_the_wrong_type_names_the_field_and_the_type(value, expected):
    with pytest.raises(UsageError) as info:
        Capabilities.from_mapping(value, "k.py:f.capabilities")
    assert str(info.value).startswith(f"k.py:f.capabilities: {expected}"), str(info.value)
    assert "\n" not in str(info.value)


def test_well_typed_values_are_taken():
    caps = Capabilities.from_mapping({"dtypes": ("float16",), "head_dim_max": 128,
                                      "exclusive": [("softcap", "dropout")], "backward": False,
                                      "notes": {"softcap": "not yet"}}, "k")
    assert caps.dtypes == {"float16"} and caps.head_dim_max == 128 and not caps.backward
    assert caps.exclusive == (("softcap", "dropout"),) and caps.notes == {"softcap": "not yet"}


@pytest.mark.parametrize("kernel, field", [("dtypes_a_number", "dtypes"),
                                           ("head_dim_max_text", "head_dim_max")])
def test_the_run_is_one_line_and_exit_2(tmp_path, kernel, field):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--backend",
         f"{FIXTURES / 'bad_capabilities.py'}:{kernel}", "--checks", "fwd", "--explore", "0",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and f"capabilities[{field!r}] must be" \
        in result.stderr, result.stderr
