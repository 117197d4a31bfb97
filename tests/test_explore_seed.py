"""The same seed draws the same exploration cases whatever modules the process has loaded.

Hypothesis (6.131 and later) mixes constants from "local" modules (outside site-packages) into
its draws. A clone's editable install of the harness, a user's kernel file or any other module
of the user's own then changed which cases ``--seed 0`` explored
(:func:`harness.run.explore.seed_only_draws`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

#: Draws the quick profile's 20 cases for sdpa-math without judging them, and prints their
#: labels; with an argument it first imports that module file (a user's own code).
DRAW = textwrap.dedent("""
    import importlib.util, sys, tempfile
    if len(sys.argv) > 1:
        spec = importlib.util.spec_from_file_location("users_own_module", sys.argv[1])
        module = importlib.util.module_from_spec(spec)
        sys.modules["users_own_module"] = module
        spec.loader.exec_module(module)
    from harness.backends import load_backend
    from harness.run.explore import explore
    labels = []
    def run_case(case):
        labels.append(case.label)
        return []
    explore("sdpa-math", load_backend("sdpa-math").capabilities, run_case, profile="quick",
            examples=20, seed=0, database_dir=tempfile.mkdtemp())
    print("\\n".join(labels))
""")


def _draws(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", DRAW, *args], capture_output=True, text=True,
                          timeout=300, check=True)
    return done.stdout.splitlines()


def test_a_users_own_module_does_not_change_the_cases_a_seed_draws(tmp_path):
    # a module of the user's, outside site-packages, full of the integers and floats the
    # input space is made of (sizes, head dims, scales)
    own = tmp_path / "users_kernels" / "constants.py"
    own.parent.mkdir()
    own.write_text("SIZES = (1, 2, 3, 7, 12, 77, 200, 300, 513, 1025, 4097, 12345)\n"
                   "SCALES = (0.125, 3.25, 0.7)\n", encoding="utf-8")
    plain = _draws()
    assert len(plain) == 20
    assert _draws(str(own)) == plain
