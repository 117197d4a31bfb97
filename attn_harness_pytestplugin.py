"""attn-harness's pytest plugin (the ``pytest11`` entry point), inert until asked.

Like Hypothesis's ``_hypothesis_pytestplugin``, this is a top-level module apart from the
``harness`` package: loading it registers the ``--attn-*`` options, the ``attn_parity`` marker and
the fixtures, and imports nothing of the harness, torch or hypothesis. Everything else (checking
options, reading suites, starting a worker, pinning GPUs under ``pytest -n``) happens only in a
session that asks for it: one given an ``--attn-*`` option, or with a test that uses the plugin's
fixtures (``attn``, ``attn_backend``, ``attn_case``).

The run options are declared once, in :data:`OPTIONS`, and registered by both front ends with
:func:`add_options`: here with the prefix ``attn-`` (``--attn-explore``), in ``attn-harness run``
with none (``--explore``); same names, same defaults, same parsers.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

GROUP = "attn-harness"
PREFIX = "attn-"
#: Seconds accepted as a real time limit; above this (or "none", "inf") there is no limit.
MAX_TIMEOUT_S = 1e6


# ----------------------------------------------------------------------------- parsers
# Each raises argparse.ArgumentTypeError("could not parse 'VALUE': ..."), which argparse and
# pytest both turn into a one-line usage error. Imports of the harness stay inside them: they run
# only when an option is given.


def _fail(value: str, why: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"could not parse {value!r}: {why}")


def parse_checks(value: str) -> tuple[str, ...]:
    """A comma-separated subset of the checks in ``harness.vocab.CHECKS``."""
    from harness.vocab import CHECK_NAMES

    items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not items or any(v not in CHECK_NAMES for v in items):
        raise _fail(value, f"checks are a comma-separated subset of {','.join(CHECK_NAMES)}")
    return items


def parse_profile(value: str) -> str:
    from harness.profile import PROFILES

    if value not in PROFILES:
        raise _fail(value, f"one of {', '.join(PROFILES)}")
    return value


def _number(value: str, kind: Callable = float):
    try:
        return kind(value)
    except ValueError:
        raise _fail(value, "not an integer" if kind is int else "not a number") from None


def parse_count(value: str) -> int:
    """An integer >= 0."""
    n = _number(value, int)
    if n < 0:
        raise _fail(value, "must be >= 0")
    return n


def parse_seed(value: str) -> int:
    """An integer >= 0; an integral float such as ``7.0`` or ``1e3`` is accepted as that
    integer (replay commands always write the integer)."""
    try:
        return parse_count(value)
    except argparse.ArgumentTypeError:
        x = _number(value)
        if not (math.isfinite(x) and x == int(x) and x >= 0):
            raise _fail(value, "a seed is an integer >= 0") from None
        return int(x)


def parse_positive(value: str) -> float:
    """A finite number > 0 (seconds, fractions)."""
    x = _number(value)
    if not (x > 0 and math.isfinite(x)):
        raise _fail(value, "must be a finite number > 0")
    return x


def parse_non_negative(value: str) -> float:
    """A finite number >= 0 (0 often meaning: no limit)."""
    x = _number(value)
    if not (x >= 0 and math.isfinite(x)):
        raise _fail(value, "must be a finite number >= 0")
    return x


def parse_timeout(value: str) -> float:
    """Seconds > 0; ``none``, ``inf`` or anything above 1e6 s means no limit (``math.inf``)."""
    if value.strip().lower() in ("none", "inf", "infinity", "0"):
        if value.strip() == "0":
            raise _fail(value, "must be > 0 (or 'none' for no limit)")
        return math.inf
    x = _number(value)
    if x != x or x <= 0:
        raise _fail(value, "must be > 0 (or 'none' for no limit)")
    return math.inf if x > MAX_TIMEOUT_S else x


# ------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Option:
    """One run option, registered by both front ends (see :func:`add_options`).

    Attributes:
        name: the option without its prefix (``explore`` -> ``--explore`` / ``--attn-explore``).
        help: what it does; the default is appended as ``(default: ...)``.
        default_text: how the default reads in ``--help``.
        metavar: the value's placeholder; None for a flag.
        type: the parser of its value.
        default: the value when not given.
        append: repeatable, values collected in a list.
        flag: takes no value (``store_true``).
        alias: the plugin's former spelling, still accepted (deprecated, one release).
    """

    name: str
    help: str
    default_text: str
    metavar: str | None = None
    type: Callable[[str], Any] | None = None
    default: Any = None
    append: bool = False
    flag: bool = False
    alias: str = ""

    def dest(self, prefix: str) -> str:
        return (prefix + self.name).replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("backend", "backend to test, repeatable: a name, FAMILY@MODULE, FAMILY@FILE.py, "
                      "FILE.py:FUNC or a plugin", "every backend available here",
           metavar="NAME|FAMILY@MODULE|FILE.py:FUNC", append=True),
    Option("suite", "case suite by name (shipped with the harness, or in ./cases or "
                    "--cases-dir) or path, repeatable", "smoke",
           metavar="NAME|FILE.toml", append=True),
    Option("cases-dir", "a directory of the project's own suites and known_issues.toml, added "
                        "to the shipped ones (same names shadow them)", "./cases when it exists",
           metavar="DIR"),
    # No string defaults with a parser: argparse and pytest would parse them at start-up, which
    # imports the harness in every session. A None default means the documented one.
    Option("profile", "effort per check, exploration examples and cost budget", "quick",
           metavar="quick|nightly|exhaustive", type=parse_profile),
    Option("checks", "comma-separated checks", "every check: fwd,bwd,determinism,throughput",
           metavar="LIST", type=parse_checks),
    Option("seed", "seed of every input tensor, dropout draw and hypothesis", "0",
           metavar="N", type=parse_seed, default=0),
    Option("explore", "hypothesis-generated cases per backend after the suites, shrunk to the "
                      "minimal failure (0 = none)", "the profile's, 20 for quick",
           metavar="N", type=parse_count, alias="examples"),
    Option("timeout", "seconds one check may run before it is recorded as a timeout ('none' "
                      "for no limit)", "the profile's, 300 for quick",
           metavar="S", type=parse_timeout),
    Option("max-gflop", "skip checks whose forward (or forward + backward) pass needs more than "
                        "N GFLOP, recording why; 0 = no limit", "2 on a CPU, no limit on a GPU",
           metavar="N", type=parse_non_negative),
    Option("audit", "also run cases a backend does not claim, and classify how it treats them",
           "off", flag=True),
    Option("out", "where results.jsonl and report.md go", "reports/<target-id>/",
           metavar="DIR", alias="records"),
    Option("regressions", "where minimal failing cases found by exploration are written as TOML",
           "cases/regressions", metavar="DIR", default="cases/regressions"),
    Option("graph-replay", "throughput: capture each timed call in a CUDA/HIP graph and time its "
                           "replays (tiny problems); records say when capture was impossible",
           "plain calls", flag=True),
)


def add_options(addoption: Callable[..., Any], prefix: str,
                options: tuple[Option, ...] = OPTIONS) -> None:
    """Register ``options`` with ``addoption`` (argparse's ``add_argument`` or pytest's
    ``group.addoption``) as ``--{prefix}{name}``; a deprecated alias is registered as a second
    spelling of the same option where ``prefix`` is the plugin's."""
    for opt in options:
        names = [f"--{prefix}{opt.name}"]
        if opt.alias and prefix == PREFIX:
            names.append(f"--{prefix}{opt.alias}")
        kwargs: dict[str, Any] = {"dest": opt.dest(prefix),
                                  "help": f"{opt.help} (default: {opt.default_text})"}
        if opt.flag:
            kwargs.update(action="store_true", default=False)
        else:
            kwargs.update(metavar=opt.metavar, default=opt.default)
            if opt.type is not None:
                kwargs["type"] = opt.type
            if opt.append:
                kwargs["action"] = "append"
        addoption(*names, **kwargs)


def option_values(get: Callable[[str], Any], prefix: str) -> dict[str, Any]:
    """``{name: value}`` of every run option, read with ``get(dest)``."""
    return {opt.name: get(opt.dest(prefix)) for opt in OPTIONS}


# ------------------------------------------------------------------------- pytest hooks


def pytest_addoption(parser) -> None:
    group = parser.getgroup(GROUP, "attention kernel parity (attn-harness)")
    add_options(group.addoption, PREFIX)


def _given(config) -> list[str]:
    """The ``--attn-*`` options given a value other than their default."""
    return [f"--{PREFIX}{opt.name}" for opt in OPTIONS
            if config.getoption(opt.dest(PREFIX)) != (False if opt.flag else opt.default)]


def _state(config) -> dict[str, Any]:
    key = _STATE_KEY
    if key not in config.stash:
        config.stash[key] = {"active": False, "session": None}
    return config.stash[key]


_STATE_KEY = pytest.StashKey[dict]()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "attn_parity: a parity test driven by the --attn- options")
    if _given(config):
        _activate(config)


def _activate(config) -> None:
    """Turn the plugin on: validate the options (one-line usage errors) and register the
    hypothesis profiles. Runs once per session."""
    state = _state(config)
    if state["active"]:
        return
    state["active"] = True
    from harness.errors import HarnessError
    from harness.session import validate_options

    try:
        state["options"] = validate_options(option_values(config.getoption, PREFIX),
                                            where="--attn-")
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    from harness.explore import register_profiles

    register_profiles()  # attn-quick, attn-nightly, attn-exhaustive: --hypothesis-profile


def _session(config):
    """The session's :class:`harness.session.PytestSession`, started on first use."""
    _activate(config)
    state = _state(config)
    if state["session"] is None:
        from harness.errors import HarnessError
        from harness.session import PytestSession

        try:
            worker = getattr(config, "workerinput", {}).get("workerid")
            state["session"] = PytestSession(state["options"], worker_id=worker)
        except HarnessError as exc:  # e.g. FILE.py:FUNC without FUNC: one line, exit 4
            pytest.exit(f"ERROR: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
    return state["session"]


def pytest_generate_tests(metafunc) -> None:
    names = metafunc.fixturenames
    if "attn_backend" not in names and "attn_case" not in names:
        return
    session = _session(metafunc.config)
    if "attn_backend" in names:
        metafunc.parametrize("attn_backend", session.backends, ids=session.backends,
                             scope="session")
    if "attn_case" in names:
        cases = session.suite_cases()
        ids = [f"{suite}:{case.name or case.label}:{case.case_id}".replace(" ", "_")
               for suite, case in cases]
        metafunc.parametrize("attn_case", cases, ids=ids)


@pytest.fixture(scope="session")
def attn(request):
    """The parity session: runs cases on backends in an isolated worker process."""
    return _session(request.config)


def pytest_sessionfinish(session, exitstatus) -> None:
    state = session.config.stash.get(_STATE_KEY, None)
    if state and state.get("session") is not None:
        state["session"].close(controller=not hasattr(session.config, "workerinput"))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    state = config.stash.get(_STATE_KEY, None)
    if not state or state.get("session") is None:
        return
    lines = state["session"].summary_lines()
    if lines:
        terminalreporter.section("attn-harness")
        for line in lines:
            terminalreporter.write_line(line)


# ------------------------------------------------------- several GPUs: one per xdist worker
# `pytest -n N` pins xdist worker gwI to the I-th visible GPU (CUDA_VISIBLE_DEVICES /
# HIP_VISIBLE_DEVICES, see harness.devices) in the earliest hook a plugin gets, before any
# conftest or test module can start a GPU runtime -- but only in a session that gives an
# --attn-* option: an unrelated project's `pytest -n` keeps its environment.


def pytest_load_initial_conftests(early_config, parser, args) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if not any(str(a).startswith(f"--{PREFIX}") for a in args):
        return
    from harness.devices import pin_xdist_worker
    from harness.errors import HarnessError

    try:
        early_config.stash[_PINNED_KEY] = pin_xdist_worker()
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None


_PINNED_KEY = pytest.StashKey[str]()


def pytest_report_header(config) -> list[str]:
    lines = []
    pinned = config.stash.get(_PINNED_KEY, "")
    if pinned:
        lines.append(f"attn-harness: {pinned}")
    args = [str(a) for a in config.invocation_params.args]
    for opt in OPTIONS:
        if opt.alias and any(a.split("=")[0] == f"--{PREFIX}{opt.alias}" for a in args):
            lines.append(f"attn-harness: --{PREFIX}{opt.alias} is deprecated and will be removed "
                         f"in the next release; use --{PREFIX}{opt.name}")
    return lines
